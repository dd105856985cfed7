// The Ultimus block on the CPU: forward and backward, parallel over the batch, fp32 accumulation; and a
// stack of blocks in one pass, each chunk of samples carried through every block before it is stored.
//
// Math (docs/ULTIMUS_MATH.md): q, k, v = W* x + b*; A = softmax_j(s q_i k_j); z = V.A; y = Wo z + bo (+ x).
// The backward recomputes q, k, v and A from x; the softmax exponent is s q_i (k_j - k_ext), exact.
//
// Layout. Rows are processed in chunks of kChunk samples (one SIMD register of floats) stored
// transposed: x[n] is a Vec holding feature n of every sample of the chunk, so each step of the math
// is one vector operation across the chunk's samples. The batch is split into a number of tasks that
// depends only on B; within a task the parameter gradients accumulate per lane (Vec partial sums),
// then each task writes one row of partials (its lanes summed in order; a task of one chunk writes
// its row directly) and the rows are summed in a fixed order: the gradients depend neither on the
// thread count nor on the schedule. Working memory is per thread and kept between calls.
//
// The ops' schemas and autograd are in ultimus_ops.cpp.
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <Python.h>
#include <torch/library.h>

#include <cmath>
#include <algorithm>
#include <type_traits>
#include <limits>
#include <memory>
#include <vector>

#include "ultimus.h"

namespace ultimus {
namespace {

// Samples per chunk: one SIMD register of floats for the ISA compiled for (setup.py builds with
// -march=native unless ULTIMUS_CPU_ARCH says otherwise). A wider generic vector than the hardware's
// spills to the stack on GCC, so the chunk follows the register width.
#if defined(__AVX512F__)
constexpr int kChunk = 16;
#elif defined(__AVX__)
constexpr int kChunk = 8;
#else
constexpr int kChunk = 4;
#endif

// One feature of the kChunk samples of a chunk. GCC/Clang vector extensions: the compiler lowers
// each operation to the widest SIMD it targets (4 SSE, 2 AVX2 or 1 AVX-512 register for floats),
// so the code states the math once and vectorises by construction.
template <typename T>
struct VecOf {
  typedef T type __attribute__((vector_size(kChunk * sizeof(T))));
};
template <typename T>
using Vec = typename VecOf<T>::type;
using IntVec = VecOf<int32_t>::type;

template <typename T>
inline Vec<T> splat(T value) {
  return Vec<T>{} + value;
}

// exp for x <= 0 (a score minus its row max), branch-free: Cody-Waite range reduction and the
// degree-5 Cephes polynomial, relative error ~2e-7; exactly 0 below -87. A NaN lane stays NaN.
inline Vec<float> exp_nonpositive(Vec<float> x) {
  const auto underflow = x < -87.0f;  // exp(-87) ~ 1.6e-38, near the smallest normal: returned as 0
  x = underflow ? splat(-87.0f) : x;
  // Nearest integer to x log2(e): truncating t - 0.5 rounds to nearest for t <= 0.
  const IntVec n_int = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, IntVec);
  const Vec<float> n = __builtin_convertvector(n_int, Vec<float>);
  Vec<float> r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  Vec<float> p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  p = p * (Vec<float>)((n_int + 127) << 23);  // times 2^n, built in the exponent bits
  return underflow ? Vec<float>{} : p;
}
inline Vec<double> exp_nonpositive(Vec<double> x) {  // float64 is for gradcheck: exact libm
  for (int c = 0; c < kChunk; ++c) x[c] = std::exp(x[c]);
  return x;
}

template <typename acc_t>
using Params = ParamPtrs<acc_t, int64_t>;

// Per-chunk state: [feature] of Vec over the chunk's samples.
template <typename acc_t>
struct Chunk {
  using V = Vec<acc_t>;
  V x[kMaxDim];
  V q[kMaxAttnDim], k[kMaxAttnDim], v[kMaxAttnDim];
  V k_max, k_min;           // over j, per sample: the extremes of row i's logits (see attention_row)
  V attn_row[kMaxAttnDim];  // one row A[i, :] at a time
  V z[kMaxAttnDim];
};

// The element type of a Vec (template deduction cannot see through the vector_size typedef).
template <typename V>
using Elem = std::decay_t<decltype(V{}[0])>;

template <typename scalar_t, typename V>
void load_transposed(const scalar_t* src, int64_t s0, int64_t s1, int64_t row0, int64_t rows, int64_t D, V* dst) {
  using acc_t = Elem<V>;
  for (int64_t n = 0; n < D; ++n) dst[n] = V{};  // rows past the batch stay 0
  for (int64_t c = 0; c < rows; ++c)
    for (int64_t n = 0; n < D; ++n) dst[n][c] = static_cast<acc_t>(src[(row0 + c) * s0 + n * s1]);
}

template <typename scalar_t, typename V>
void store_transposed(const V* src, int64_t row0, int64_t rows, int64_t D, scalar_t* dst) {
  for (int64_t c = 0; c < rows; ++c)
    for (int64_t n = 0; n < D; ++n) dst[(row0 + c) * D + n] = static_cast<scalar_t>(src[n][c]);
}

// q, k, v of the chunk: three independent accumulation chains per step keep the FMA units busy.
template <typename acc_t>
void project_qkv(const Params<acc_t>& p, Chunk<acc_t>& s) {
  using V = Vec<acc_t>;
  const int64_t D = p.D;
  for (int64_t i = 0; i < p.d; ++i) {
    V aq = splat<acc_t>(p.bq ? p.bq[i] : 0), ak = splat<acc_t>(p.bk ? p.bk[i] : 0),
      av = splat<acc_t>(p.bv ? p.bv[i] : 0);
    const acc_t *wq = p.wq + i * D, *wk = p.wk + i * D, *wv = p.wv + i * D;
    for (int64_t n = 0; n < D; ++n) {
      const V xn = s.x[n];
      aq += wq[n] * xn;
      ak += wk[n] * xn;
      av += wv[n] * xn;
    }
    s.q[i] = aq, s.k[i] = ak, s.v[i] = av;
  }
  V k_max = s.k[0], k_min = s.k[0];
  for (int64_t j = 1; j < p.d; ++j) {
    k_max = s.k[j] > k_max ? s.k[j] : k_max;
    k_min = s.k[j] < k_min ? s.k[j] : k_min;
  }
  s.k_max = k_max, s.k_min = k_min;
}

// Row i of A for every sample of the chunk, into s.attn_row.
//
// The exponent of every entry, s q_i k_j - max_j' s q_i k_j', is computed as s q_i (k_j - k_ext), where
// k_ext is max_j k_j for q_i >= 0 and min_j k_j otherwise (the row's largest logit is at k_ext). Exact by
// construction: a rounded difference keeps its sign and is 0 only for equal operands, so every
// exponent is <= 0 and the largest is exactly 0 whatever the compiler contracts (a fused
// `q k - max` leaves the top entry a rounding error away from 0, which overflows exp for large finite
// logits). It also takes the row maximum in O(d) instead of O(d^2).
template <typename acc_t>
void attention_row(const Params<acc_t>& p, Chunk<acc_t>& s, int64_t i) {
  using V = Vec<acc_t>;
  const V sq = p.scale * s.q[i];
  const V k_ext = sq >= 0 ? s.k_max : s.k_min;
  const V zero = V{};
  V total = V{};
  for (int64_t j = 0; j < p.d; ++j) {
    // k_j - k_ext can overflow for |k| near the dtype's limit; with sq = 0 the logit is sq * k_j = 0.
    const V exponent = sq == zero ? sq * s.k[j] : sq * (s.k[j] - k_ext);
    const V e = exp_nonpositive(exponent);
    s.attn_row[j] = e;
    total += e;
  }
  const V inv = acc_t(1) / total;
  for (int64_t j = 0; j < p.d; ++j) s.attn_row[j] *= inv;
}

// One block on the chunk: s.x holds its input and, after, its output.
// What a block's backward reuses from the forward that the stack's backward runs before it, for one
// chunk: q, k, v, the extremes of k, and A, (3d + 2 + d^2) vectors. Keeping them instead of
// recomputing leaves the stack's backward one extra output projection per block (Wo z) over L single
// backwards, which get their inputs from memory.
inline int64_t kept_size(int64_t d) { return 3 * d + 2 + d * d; }

// One block on the chunk: s.x holds its input and, after, its output. `kept` (null: not needed)
// receives what block_backward reuses.
template <typename acc_t>
void block_forward(const Params<acc_t>& p, bool residual, Chunk<acc_t>& s, Vec<acc_t>* kept = nullptr) {
  using V = Vec<acc_t>;
  const int64_t d = p.d;
  project_qkv(p, s);
  if (kept) {
    std::copy(s.q, s.q + d, kept), std::copy(s.k, s.k + d, kept + d), std::copy(s.v, s.v + d, kept + 2 * d);
    kept[3 * d] = s.k_max, kept[3 * d + 1] = s.k_min;
  }
  for (int64_t j = 0; j < d; ++j) s.z[j] = V{};
  for (int64_t i = 0; i < d; ++i) {
    attention_row(p, s, i);
    if (kept) std::copy(s.attn_row, s.attn_row + d, kept + 3 * d + 2 + i * d);
    for (int64_t j = 0; j < d; ++j) s.z[j] += s.v[i] * s.attn_row[j];
  }
  for (int64_t n = 0; n < p.D; ++n) {  // y overwrites x feature by feature
    V out = splat<acc_t>(p.bo ? p.bo[n] : 0) + (residual ? s.x[n] : V{});
    const acc_t* wo = p.wo + n * p.d;
    for (int64_t j = 0; j < p.d; ++j) out += wo[j] * s.z[j];
    s.x[n] = out;
  }
}

// Rows [row0, row0 + rows) through the blocks of `blocks` in turn (one block, or a whole stack): the
// activations between blocks never leave the chunk's state.
template <typename scalar_t, typename acc_t>
void forward_rows(const scalar_t* x, int64_t sx0, int64_t sx1, scalar_t* y, int64_t row0, int64_t rows,
                  const std::vector<Params<acc_t>>& blocks, bool residual, Chunk<acc_t>& s) {
  const int64_t D = blocks[0].D;
  load_transposed(x, sx0, sx1, row0, rows, D, s.x);
  for (const auto& p : blocks) block_forward(p, residual, s);
  store_transposed(s.x, row0, rows, D, y);
}

// Backward state beyond the forward's.
template <typename acc_t>
struct GradChunk {
  using V = Vec<acc_t>;
  V gy[kMaxDim];
  V gz[kMaxAttnDim], gq[kMaxAttnDim], gk[kMaxAttnDim], gv[kMaxAttnDim];
};

// Where a chunk's parameter gradients go, element e of the partial-row layout (ultimus.h) at a time.
// LaneSums: per-lane partial sums for a task of several chunks, summed over the lanes when the task
// ends. RowSums: a task of one chunk (B <= kChunk) writes its partial row directly, each element the
// sum of the chunk's `active` lanes in lane order: the same numbers without clearing, accumulating and
// reducing np vectors (100 KB at D = 48, d = 8), which would dominate the kernel at B = 1. A chunk adds
// to each element of a block's range exactly once.
template <typename acc_t>
struct LaneSums {
  Vec<acc_t>* lanes;
  void add(int64_t e, Vec<acc_t> v) const { lanes[e] += v; }
  LaneSums at(int64_t offset) const { return {lanes + offset}; }
};
template <typename acc_t>
struct RowSums {
  acc_t* row;
  int64_t active;
  void add(int64_t e, Vec<acc_t> v) const {
    acc_t sum = 0;
    for (int64_t c = 0; c < active; ++c) sum += v[c];
    row[e] = sum;
  }
  RowSums at(int64_t offset) const { return {row + offset, active}; }
};

// sink[offset + i * N + n] += a[i] * b[n]: a block of a parameter gradient.
template <typename V, typename Sink>
void accumulate_outer(const V* a, int64_t I, const V* b, int64_t N, const Sink& sink, int64_t offset) {
  for (int64_t i = 0; i < I; ++i)
    for (int64_t n = 0; n < N; ++n) sink.add(offset + i * N + n, a[i] * b[n]);
}

// One block's backward on the chunk: s.x holds the block's input and g.gy the gradient of its output.
// Adds the parameter gradients to `*sink` (null: not needed) and, if `need_gx`, leaves the gradient of
// the input in s.x.
template <typename acc_t, typename Sink>
void block_backward(const Params<acc_t>& p, bool residual, const Sink* sink, bool need_gx, Chunk<acc_t>& s,
                    GradChunk<acc_t>& g, const Vec<acc_t>* kept = nullptr) {
  using V = Vec<acc_t>;
  const int64_t D = p.D, d = p.d;
  if (kept) {  // the forward's q, k, v and extremes of k (see kept_size)
    std::copy(kept, kept + d, s.q), std::copy(kept + d, kept + 2 * d, s.k), std::copy(kept + 2 * d, kept + 3 * d, s.v);
    s.k_max = kept[3 * d], s.k_min = kept[3 * d + 1];
  } else {
    project_qkv(p, s);
  }
  for (int64_t j = 0; j < d; ++j) s.z[j] = g.gk[j] = g.gz[j] = V{};
  for (int64_t n = 0; n < D; ++n) {  // gz[j] = sum_n Wo[n][j] gy[n]
    const acc_t* wo = p.wo + n * d;
    for (int64_t j = 0; j < d; ++j) g.gz[j] += wo[j] * g.gy[n];
  }
  for (int64_t i = 0; i < d; ++i) {
    const V* attn_row = kept ? kept + 3 * d + 2 + i * d : (attention_row(p, s, i), s.attn_row);
    V r = V{}, gqi = V{};
    for (int64_t j = 0; j < d; ++j) {
      r += attn_row[j] * g.gz[j];
      s.z[j] += s.v[i] * attn_row[j];
    }
    const V vi = p.scale * s.v[i];
    for (int64_t j = 0; j < d; ++j) {
      const V g_score = attn_row[j] * vi * (g.gz[j] - r);  // includes the scale s
      gqi += g_score * s.k[j];
      g.gk[j] += g_score * s.q[i];
    }
    g.gv[i] = r;
    g.gq[i] = gqi;
  }
  if (sink) {  // rows past the batch have gy = 0, hence gq = gk = gv = 0: they add nothing
    accumulate_outer(g.gq, d, s.x, D, *sink, 0);
    accumulate_outer(g.gk, d, s.x, D, *sink, d * D);
    accumulate_outer(g.gv, d, s.x, D, *sink, 2 * d * D);
    accumulate_outer(g.gy, D, s.z, d, *sink, 3 * d * D);
    const int64_t biases = 4 * d * D;
    for (int64_t i = 0; i < d; ++i)
      sink->add(biases + i, g.gq[i]), sink->add(biases + d + i, g.gk[i]), sink->add(biases + 2 * d + i, g.gv[i]);
    for (int64_t n = 0; n < D; ++n) sink->add(biases + 3 * d + n, g.gy[n]);
  }
  if (need_gx) {  // gx overwrites x, after the parameter gradients have used it
    for (int64_t n = 0; n < D; ++n) {
      V out = residual ? g.gy[n] : V{};
      for (int64_t i = 0; i < d; ++i)
        out += p.wq[i * D + n] * g.gq[i] + p.wk[i * D + n] * g.gk[i] + p.wv[i * D + n] * g.gv[i];
      s.x[n] = out;
    }
  }
}

// The backward of rows [row0, row0 + rows) through `blocks` (one block, or a whole stack). The forward
// runs first through all blocks but the last, keeping in `kept` each block's input and what its
// backward reuses (stack_kept_size vectors per block, tens of KB: in cache); then the blocks in
// reverse, the gradient of each block's input becoming the next one's gy. Block l's parameter
// gradients go to sink->at(l * num_params(D, d)) (sink null: not needed).
inline int64_t stack_kept_size(int64_t D, int64_t d) { return D + kept_size(d); }

template <typename scalar_t, typename acc_t, typename Sink>
void backward_rows(const scalar_t* gy, int64_t sg0, int64_t sg1, const scalar_t* x, int64_t sx0, int64_t sx1,
                   scalar_t* gx, const Sink* sink, int64_t row0, int64_t rows,
                   const std::vector<Params<acc_t>>& blocks, bool residual, Vec<acc_t>* kept, Chunk<acc_t>& s,
                   GradChunk<acc_t>& g) {
  const int64_t L = static_cast<int64_t>(blocks.size()), D = blocks[0].D, d = blocks[0].d;
  const int64_t np = num_params(D, d), per_block = stack_kept_size(D, d);
  load_transposed(x, sx0, sx1, row0, rows, D, s.x);
  for (int64_t l = 0; l + 1 < L; ++l) {
    std::copy(s.x, s.x + D, kept + l * per_block);
    block_forward(blocks[l], residual, s, kept + l * per_block + D);
  }
  load_transposed(gy, sg0, sg1, row0, rows, D, g.gy);  // rows past the batch load as 0: they add nothing
  for (int64_t l = L - 1; l >= 0; --l) {
    const Vec<acc_t>* block_kept = l + 1 < L ? kept + l * per_block : nullptr;  // (the last block: s.x)
    if (block_kept) std::copy(block_kept, block_kept + D, s.x);
    const Sink block_sink = sink ? sink->at(l * np) : Sink{};
    block_backward(blocks[l], residual, sink ? &block_sink : nullptr, l > 0 || gx, s, g,
                   block_kept ? block_kept + D : nullptr);
    if (l > 0) std::copy(s.x, s.x + D, g.gy);  // this block's gx is the previous block's gy
  }
  if (gx) store_transposed(s.x, row0, rows, D, gx);
}

// Each thread's working memory, kept from call to call: allocating and freeing it per call (chunk
// states and lanes, tens to hundreds of KB) costs malloc, page faults when the heap is trimmed, and a
// memset where value-initialised, as much as the whole kernel at the training batch. Nothing in it is
// read before the kernel writes it. A kernel never re-enters itself on one thread, so one per thread.
template <typename acc_t>
struct Scratch {
  Chunk<acc_t> state;
  GradChunk<acc_t> grad;
  std::unique_ptr<Vec<acc_t>[]> lanes, kept;  // backward: per-lane gradient sums, backward_rows' kept
  int64_t lanes_capacity = 0, kept_capacity = 0;
  Vec<acc_t>* lanes_for(int64_t n) { return grown(lanes, lanes_capacity, n); }
  Vec<acc_t>* kept_for(int64_t n) { return grown(kept, kept_capacity, n); }

 private:
  static Vec<acc_t>* grown(std::unique_ptr<Vec<acc_t>[]>& buf, int64_t& size, int64_t n) {
    if (n > size) buf.reset(new Vec<acc_t>[n]), size = n;
    return buf.get();
  }
};
template <typename acc_t>
Scratch<acc_t>& thread_scratch() {
  static thread_local std::unique_ptr<Scratch<acc_t>> scratch;
  if (!scratch) scratch.reset(new Scratch<acc_t>);
  return *scratch;
}

// The split of the batch into tasks depends on B alone (see the header comment).
struct TaskSplit {
  int64_t num_tasks, rows_per_task;
};
inline TaskSplit split_batch(int64_t B) {
  const int64_t max_tasks = 256, min_rows = 16 * kChunk;
  int64_t tasks = std::max<int64_t>(1, std::min(max_tasks, (B + min_rows - 1) / min_rows));
  int64_t rows = (B + tasks - 1) / tasks;
  rows = std::max<int64_t>(kChunk, (rows + kChunk - 1) / kChunk * kChunk);  // B = 0 too
  return {std::max<int64_t>(1, (B + rows - 1) / rows), rows};
}

// ------------------------------------------------------------------------------------------------
// Launchers: one block (fwd, bwd) and a stack of blocks (stack_fwd, stack_bwd) share the loops below.
// ------------------------------------------------------------------------------------------------

template <typename acc_t>
std::vector<Params<acc_t>> block_ptrs(const std::vector<AccParams>& blocks, int64_t D, int64_t d) {
  std::vector<Params<acc_t>> ptrs;
  for (const auto& b : blocks) ptrs.push_back(b.ptrs<acc_t>(D, d));
  return ptrs;
}

at::Tensor forward(const at::Tensor& x, const std::vector<AccParams>& blocks, int64_t D, int64_t d, bool residual) {
  const int64_t B = x.size(0);
  at::Tensor y = at::empty({B, D}, x.options());
  if (B == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ultimus_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto p = block_ptrs<acc_t>(blocks, D, d);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const int64_t num_chunks = (B + kChunk - 1) / kChunk;
    at::parallel_for(0, num_chunks, 16, [&](int64_t begin, int64_t end) {
      Chunk<acc_t>& state = thread_scratch<acc_t>().state;
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        const int64_t row0 = chunk * kChunk;
        forward_rows(xp, x.stride(0), x.stride(1), yp, row0, std::min<int64_t>(kChunk, B - row0), p, residual,
                     state);
      }
    });
  });
  return y;
}

// The parameter gradients come back as one flat vector: every block's partial-row layout in turn.
BackwardResult backward(const at::Tensor& gy, const at::Tensor& x, const std::vector<AccParams>& blocks, int64_t D,
                        int64_t d, bool residual, bool need_gx, bool need_gw) {
  const int64_t B = x.size(0), L = static_cast<int64_t>(blocks.size());
  const auto acc = acc_type(x);
  at::Tensor gx = at::empty(need_gx ? std::vector<int64_t>{B, D} : std::vector<int64_t>{0}, x.options());
  const TaskSplit split = split_batch(B);
  const int64_t np = L * num_params(D, d);
  at::Tensor partials = at::empty({need_gw && B > 0 ? split.num_tasks : 0, np}, x.options().dtype(acc));
  at::Tensor gy_c = gy.scalar_type() == x.scalar_type() ? gy : gy.to(x.scalar_type());
  if (B > 0 && (need_gx || need_gw)) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ultimus_bwd_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const auto p = block_ptrs<acc_t>(blocks, D, d);
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const scalar_t* gyp = gy_c.const_data_ptr<scalar_t>();
      scalar_t* gxp = need_gx ? gx.mutable_data_ptr<scalar_t>() : nullptr;
      acc_t* part = need_gw ? partials.mutable_data_ptr<acc_t>() : nullptr;
      at::parallel_for(0, split.num_tasks, 1, [&](int64_t begin, int64_t end) {
        Scratch<acc_t>& scratch = thread_scratch<acc_t>();
        Vec<acc_t>* kept = scratch.kept_for(L * stack_kept_size(D, d));
        Vec<acc_t>* lanes = part ? scratch.lanes_for(np) : nullptr;
        for (int64_t task = begin; task < end; ++task) {
          const int64_t task_begin = task * split.rows_per_task;
          const int64_t task_end = std::min(B, task_begin + split.rows_per_task);
          acc_t* row = part ? part + task * np : nullptr;  // the task's partial row
          auto rows_through = [&](const auto* sink) {
            for (int64_t row0 = task_begin; row0 < task_end; row0 += kChunk)
              backward_rows(gyp, gy_c.stride(0), gy_c.stride(1), xp, x.stride(0), x.stride(1), gxp, sink, row0,
                            std::min<int64_t>(kChunk, task_end - row0), p, residual, kept, scratch.state,
                            scratch.grad);
          };
          if (task_end - task_begin <= kChunk) {  // one chunk: straight into the row (see RowSums)
            const RowSums<acc_t> sink{row, task_end - task_begin};
            rows_through(row ? &sink : nullptr);
            continue;
          }
          const LaneSums<acc_t> sink{lanes};
          if (row) std::fill(lanes, lanes + np, Vec<acc_t>{});
          rows_through(row ? &sink : nullptr);
          for (int64_t e = 0; row && e < np; ++e) {  // the lanes summed in a fixed order
            acc_t sum = 0;
            for (int c = 0; c < kChunk; ++c) sum += lanes[e][c];
            row[e] = sum;
          }
        }
      });
    });
  }
  return backward_result(gx, partials, need_gw);
}

at::Tensor ultimus_fwd_cpu(const at::Tensor& x, const at::Tensor& wq, const OptTensor& bq, const at::Tensor& wk,
                           const OptTensor& bk, const at::Tensor& wv, const OptTensor& bv, const at::Tensor& wo,
                           const OptTensor& bo, bool residual) {
  const auto [D, d] = check_inputs("cpu", x, wq, bq, wk, bk, wv, bv, wo, bo);
  if (x.size(0) == 0) return at::empty({0, D}, x.options());
  return forward(x, {AccParams(x, wq, bq, wk, bk, wv, bv, wo, bo)}, D, d, residual);
}

BackwardResult ultimus_bwd_cpu(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& wq, const OptTensor& bq,
                               const at::Tensor& wk, const OptTensor& bk, const at::Tensor& wv, const OptTensor& bv,
                               const at::Tensor& wo, const OptTensor& bo, bool residual, bool need_gx, bool need_gw) {
  const auto [D, d] = check_inputs("cpu", x, wq, bq, wk, bk, wv, bv, wo, bo);
  check_grad_output(gy, x);
  return backward(gy, x, {AccParams(x, wq, bq, wk, bk, wv, bv, wo, bo)}, D, d, residual, need_gx, need_gw);
}

at::Tensor ultimus_stack_fwd_cpu(const at::Tensor& x, at::TensorList params, bool bias, bool residual) {
  const auto [L, D, d] = check_stack_inputs("cpu", x, params, bias);
  return forward(x, stack_acc_params(x, params, bias), D, d, residual);
}

BackwardResult ultimus_stack_bwd_cpu(const at::Tensor& gy, const at::Tensor& x, at::TensorList params, bool bias,
                                     bool residual, bool need_gx, bool need_gw) {
  const auto [L, D, d] = check_stack_inputs("cpu", x, params, bias);
  check_grad_output(gy, x);
  return backward(gy, x, stack_acc_params(x, params, bias), D, d, residual, need_gx, need_gw);
}

}  // namespace

TORCH_LIBRARY_IMPL(ultimus_ext, CPU, m) {
  m.impl("fwd", &ultimus_fwd_cpu);
  m.impl("bwd", &ultimus_bwd_cpu);
  m.impl("stack_fwd", &ultimus_stack_fwd_cpu);
  m.impl("stack_bwd", &ultimus_stack_bwd_cpu);
}

}  // namespace ultimus

// An empty Python module: importing ultimus_kernels._C runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
