// The Ultimus block on the CPU: forward and backward, parallel over the batch, fp32 accumulation.
//
// Math, per sample x in R^D, attention width d, scale s = 1/sqrt(d):
//   q = Wq x + bq, k = Wk x + bk, v = Wv x + bv             (R^d; W* are (d, D), nn.Linear layout)
//   A[i, j] = softmax_j(s q[i] k[j]);  z[j] = sum_i v[i] A[i, j];  y = Wo z + bo (+ x)   (Wo is (D, d))
// Backward, given gy:
//   gz = Wo^T gy; r[i] = sum_j A[i, j] gz[j]; gv = r; gS[i, j] = A[i, j] v[i] (gz[j] - r[i])
//   gq[i] = s sum_j gS[i, j] k[j]; gk[j] = s sum_i gS[i, j] q[i]; gx = Wq^T gq + Wk^T gk + Wv^T gv (+ gy)
//
// Layout. Rows are processed in chunks of kChunk samples stored transposed ("structure of arrays":
// xt[n][c] is feature n of sample c of the chunk), so that every inner loop runs over the kChunk
// samples with unit stride and the compiler vectorises it. The batch is split into a number of tasks
// that depends only on B; each task owns a row of parameter-gradient partials, and the partial rows
// are summed in a fixed order: the gradients do not depend on the thread count or the schedule.
//
// This file also defines the ops (TORCH_LIBRARY) that the CUDA file implements for CUDA tensors.
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <Python.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "ultimus.h"

namespace ultimus {
namespace {

constexpr int kChunk = 16;  // samples per chunk: two AVX2 (or four SSE) float vectors

// exp for x <= 0 (the argument is always a score minus its row max), written without calls or
// branches so that loops over it vectorise. Cody-Waite range reduction, degree-5 polynomial
// (Cephes expf), relative error ~2e-7. A NaN argument gives NaN (the select keeps it).
inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;  // exp(-87) ~ 1.6e-38: the smallest normal float, and 0 to the softmax
  // Round x log2(e) to the nearest integer; truncation of (t - 0.5) does that for t <= 0 and,
  // unlike nearbyint, vectorises without SSE4.1.
  const float n = static_cast<float>(static_cast<int32_t>(x * 1.44269504088896341f - 0.5f));
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
inline double exp_nonpositive(double x) { return std::exp(x); }  // float64 is for gradcheck: exact libm

template <typename acc_t>
struct Params {  // contiguous accumulation-dtype views of the weights; biases may be null
  const acc_t *wq, *wk, *wv, *wo, *bq, *bk, *bv, *bo;
  int64_t D, d;
  acc_t scale;
};

// Per-chunk state, transposed: [feature][sample of the chunk].
template <typename acc_t>
struct Chunk {
  acc_t x[kMaxDim][kChunk];
  acc_t q[kMaxAttnDim][kChunk], k[kMaxAttnDim][kChunk], v[kMaxAttnDim][kChunk];
  acc_t attn_row[kMaxAttnDim][kChunk];  // one row A[i, :] at a time
  acc_t z[kMaxAttnDim][kChunk];
};

template <typename scalar_t, typename acc_t>
void load_transposed(const scalar_t* src, int64_t s0, int64_t s1, int64_t row0, int64_t rows, int64_t D,
                     acc_t (*dst)[kChunk]) {
  for (int64_t n = 0; n < D; ++n)
    for (int c = 0; c < kChunk; ++c)
      dst[n][c] = c < rows ? static_cast<acc_t>(src[(row0 + c) * s0 + n * s1]) : acc_t(0);
}

// out[i][c] = b[i] + sum_n W[i][n] x[n][c]
template <typename acc_t>
void project(const acc_t* w, const acc_t* b, const acc_t (*x)[kChunk], int64_t D, int64_t d, acc_t (*out)[kChunk]) {
  for (int64_t i = 0; i < d; ++i) {
    acc_t acc[kChunk];
    for (int c = 0; c < kChunk; ++c) acc[c] = b ? b[i] : acc_t(0);
    for (int64_t n = 0; n < D; ++n) {
      const acc_t wv = w[i * D + n];
      for (int c = 0; c < kChunk; ++c) acc[c] += wv * x[n][c];
    }
    for (int c = 0; c < kChunk; ++c) out[i][c] = acc[c];
  }
}

// q, k, v of the chunk from its x.
template <typename acc_t>
void project_qkv(const Params<acc_t>& p, Chunk<acc_t>& s) {
  project(p.wq, p.bq, s.x, p.D, p.d, s.q);
  project(p.wk, p.bk, s.x, p.D, p.d, s.k);
  project(p.wv, p.bv, s.x, p.D, p.d, s.v);
}

// Row i of A for every sample of the chunk, into s.attn_row.
template <typename acc_t>
void attention_row(const Params<acc_t>& p, Chunk<acc_t>& s, int64_t i) {
  acc_t row_max[kChunk], total[kChunk];
  for (int c = 0; c < kChunk; ++c) row_max[c] = -std::numeric_limits<acc_t>::infinity();
  for (int64_t j = 0; j < p.d; ++j)
    for (int c = 0; c < kChunk; ++c) {
      const acc_t score = p.scale * s.q[i][c] * s.k[j][c];
      row_max[c] = score > row_max[c] ? score : row_max[c];
    }
  for (int c = 0; c < kChunk; ++c) total[c] = acc_t(0);
  for (int64_t j = 0; j < p.d; ++j)
    for (int c = 0; c < kChunk; ++c) {
      const acc_t e = exp_nonpositive(p.scale * s.q[i][c] * s.k[j][c] - row_max[c]);
      s.attn_row[j][c] = e;
      total[c] += e;
    }
  for (int c = 0; c < kChunk; ++c) total[c] = acc_t(1) / total[c];
  for (int64_t j = 0; j < p.d; ++j)
    for (int c = 0; c < kChunk; ++c) s.attn_row[j][c] *= total[c];
}

template <typename scalar_t, typename acc_t>
void forward_rows(const scalar_t* x, int64_t sx0, int64_t sx1, scalar_t* y, int64_t row0, int64_t rows,
                  const Params<acc_t>& p, bool residual, Chunk<acc_t>& s) {
  load_transposed(x, sx0, sx1, row0, rows, p.D, s.x);
  project_qkv(p, s);
  for (int64_t j = 0; j < p.d; ++j)
    for (int c = 0; c < kChunk; ++c) s.z[j][c] = acc_t(0);
  for (int64_t i = 0; i < p.d; ++i) {
    attention_row(p, s, i);
    for (int64_t j = 0; j < p.d; ++j)
      for (int c = 0; c < kChunk; ++c) s.z[j][c] += s.v[i][c] * s.attn_row[j][c];
  }
  for (int64_t n = 0; n < p.D; ++n) {
    acc_t out[kChunk];
    for (int c = 0; c < kChunk; ++c) out[c] = (p.bo ? p.bo[n] : acc_t(0)) + (residual ? s.x[n][c] : acc_t(0));
    for (int64_t j = 0; j < p.d; ++j) {
      const acc_t w = p.wo[n * p.d + j];
      for (int c = 0; c < kChunk; ++c) out[c] += w * s.z[j][c];
    }
    for (int c = 0; c < rows; ++c) y[(row0 + c) * p.D + n] = static_cast<scalar_t>(out[c]);
  }
}

// Backward state beyond the forward's.
template <typename acc_t>
struct GradChunk {
  acc_t gy[kMaxDim][kChunk];
  acc_t gz[kMaxAttnDim][kChunk], gq[kMaxAttnDim][kChunk], gk[kMaxAttnDim][kChunk], gv[kMaxAttnDim][kChunk];
};

// partial[e] += sum_c a[i][c] * b[n][c] over an (I x N) block of a partial row.
template <typename acc_t>
void accumulate_outer(const acc_t (*a)[kChunk], int64_t I, const acc_t (*b)[kChunk], int64_t N, acc_t* partial) {
  for (int64_t i = 0; i < I; ++i)
    for (int64_t n = 0; n < N; ++n) {
      acc_t sum = 0;
      for (int c = 0; c < kChunk; ++c) sum += a[i][c] * b[n][c];
      partial[i * N + n] += sum;
    }
}

template <typename acc_t>
void accumulate_rowsum(const acc_t (*a)[kChunk], int64_t I, acc_t* partial) {
  for (int64_t i = 0; i < I; ++i) {
    acc_t sum = 0;
    for (int c = 0; c < kChunk; ++c) sum += a[i][c];
    partial[i] += sum;
  }
}

template <typename scalar_t, typename acc_t>
void backward_rows(const scalar_t* gy, int64_t sg0, int64_t sg1, const scalar_t* x, int64_t sx0, int64_t sx1,
                   scalar_t* gx, acc_t* partial, int64_t row0, int64_t rows, const Params<acc_t>& p, bool residual,
                   Chunk<acc_t>& s, GradChunk<acc_t>& g) {
  const int64_t D = p.D, d = p.d;
  load_transposed(x, sx0, sx1, row0, rows, D, s.x);
  load_transposed(gy, sg0, sg1, row0, rows, D, g.gy);  // rows past the batch load as 0: they add nothing
  project_qkv(p, s);
  // gz[j] = sum_n Wo[n][j] gy[n]
  for (int64_t j = 0; j < d; ++j)
    for (int c = 0; c < kChunk; ++c) g.gz[j][c] = acc_t(0);
  for (int64_t n = 0; n < D; ++n)
    for (int64_t j = 0; j < d; ++j) {
      const acc_t w = p.wo[n * d + j];
      for (int c = 0; c < kChunk; ++c) g.gz[j][c] += w * g.gy[n][c];
    }
  for (int64_t j = 0; j < d; ++j)
    for (int c = 0; c < kChunk; ++c) s.z[j][c] = g.gk[j][c] = acc_t(0);
  for (int64_t i = 0; i < d; ++i) {
    attention_row(p, s, i);
    acc_t r[kChunk], gqi[kChunk];
    for (int c = 0; c < kChunk; ++c) r[c] = gqi[c] = acc_t(0);
    for (int64_t j = 0; j < d; ++j)
      for (int c = 0; c < kChunk; ++c) {
        r[c] += s.attn_row[j][c] * g.gz[j][c];
        s.z[j][c] += s.v[i][c] * s.attn_row[j][c];
      }
    for (int64_t j = 0; j < d; ++j)
      for (int c = 0; c < kChunk; ++c) {
        const acc_t g_score = s.attn_row[j][c] * s.v[i][c] * (g.gz[j][c] - r[c]) * p.scale;
        gqi[c] += g_score * s.k[j][c];
        g.gk[j][c] += g_score * s.q[i][c];
      }
    for (int c = 0; c < kChunk; ++c) {
      g.gv[i][c] = r[c];
      g.gq[i][c] = gqi[c];
    }
  }
  if (gx) {
    for (int64_t n = 0; n < D; ++n) {
      acc_t out[kChunk];
      for (int c = 0; c < kChunk; ++c) out[c] = residual ? g.gy[n][c] : acc_t(0);
      for (int64_t i = 0; i < d; ++i) {
        const acc_t wq = p.wq[i * D + n], wk = p.wk[i * D + n], wv = p.wv[i * D + n];
        for (int c = 0; c < kChunk; ++c) out[c] += wq * g.gq[i][c] + wk * g.gk[i][c] + wv * g.gv[i][c];
      }
      for (int c = 0; c < rows; ++c) gx[(row0 + c) * D + n] = static_cast<scalar_t>(out[c]);
    }
  }
  if (partial) {
    accumulate_outer(g.gq, d, s.x, D, partial);
    accumulate_outer(g.gk, d, s.x, D, partial + d * D);
    accumulate_outer(g.gv, d, s.x, D, partial + 2 * d * D);
    accumulate_outer(g.gy, D, s.z, d, partial + 3 * d * D);
    acc_t* biases = partial + 4 * d * D;
    accumulate_rowsum(g.gq, d, biases);
    accumulate_rowsum(g.gk, d, biases + d);
    accumulate_rowsum(g.gv, d, biases + 2 * d);
    accumulate_rowsum(g.gy, D, biases + 3 * d);
  }
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

struct AccParams {  // owns the accumulation-dtype copies that Params points into
  at::Tensor wq, wk, wv, wo, bq, bk, bv, bo;
  AccParams(const at::Tensor& x, const at::Tensor& wq_, const OptTensor& bq_, const at::Tensor& wk_,
            const OptTensor& bk_, const at::Tensor& wv_, const OptTensor& bv_, const at::Tensor& wo_,
            const OptTensor& bo_) {
    const auto acc = acc_type(x);
    wq = as_acc(wq_, acc), wk = as_acc(wk_, acc), wv = as_acc(wv_, acc), wo = as_acc(wo_, acc);
    bq = as_acc(bq_, acc), bk = as_acc(bk_, acc), bv = as_acc(bv_, acc), bo = as_acc(bo_, acc);
  }
  template <typename acc_t>
  Params<acc_t> view(int64_t D, int64_t d) const {
    auto ptr = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<acc_t>() : nullptr; };
    return {ptr(wq), ptr(wk), ptr(wv), ptr(wo), ptr(bq), ptr(bk), ptr(bv), ptr(bo), D, d,
            static_cast<acc_t>(1.0 / std::sqrt(static_cast<double>(d)))};
  }
};

at::Tensor ultimus_fwd_cpu(const at::Tensor& x, const at::Tensor& wq, const OptTensor& bq, const at::Tensor& wk,
                           const OptTensor& bk, const at::Tensor& wv, const OptTensor& bv, const at::Tensor& wo,
                           const OptTensor& bo, bool residual) {
  const auto [D, d] = check_inputs(x, wq, bq, wk, bk, wv, bv, wo, bo);
  const int64_t B = x.size(0);
  at::Tensor y = at::empty({B, D}, x.options());
  if (B == 0) return y;
  const AccParams params(x, wq, bq, wk, bk, wv, bv, wo, bo);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ultimus_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto p = params.view<acc_t>(D, d);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const int64_t num_chunks = (B + kChunk - 1) / kChunk;
    at::parallel_for(0, num_chunks, 16, [&](int64_t begin, int64_t end) {
      auto state = std::make_unique<Chunk<acc_t>>();
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        const int64_t row0 = chunk * kChunk;
        forward_rows(xp, x.stride(0), x.stride(1), yp, row0, std::min<int64_t>(kChunk, B - row0), p, residual,
                     *state);
      }
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
ultimus_bwd_cpu(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& wq, const OptTensor& bq,
                const at::Tensor& wk, const OptTensor& bk, const at::Tensor& wv, const OptTensor& bv,
                const at::Tensor& wo, const OptTensor& bo, bool residual, bool need_gx, bool need_gw) {
  const auto [D, d] = check_inputs(x, wq, bq, wk, bk, wv, bv, wo, bo);
  const int64_t B = x.size(0);
  TORCH_CHECK_VALUE(gy.sizes() == x.sizes(), "ultimus: gy must have x's shape ", x.sizes(), ", got ", gy.sizes());
  const auto acc = acc_type(x);
  at::Tensor gx = at::empty(need_gx ? std::vector<int64_t>{B, D} : std::vector<int64_t>{0}, x.options());
  const TaskSplit split = split_batch(B);
  at::Tensor partials = at::zeros({need_gw && B > 0 ? split.num_tasks : 0, num_params(D, d)}, x.options().dtype(acc));
  at::Tensor gy_c = gy.to(x.scalar_type());
  if (B > 0 && (need_gx || need_gw)) {
    const AccParams params(x, wq, bq, wk, bk, wv, bv, wo, bo);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ultimus_bwd_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const auto p = params.view<acc_t>(D, d);
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const scalar_t* gyp = gy_c.const_data_ptr<scalar_t>();
      scalar_t* gxp = need_gx ? gx.mutable_data_ptr<scalar_t>() : nullptr;
      acc_t* part = need_gw ? partials.mutable_data_ptr<acc_t>() : nullptr;
      at::parallel_for(0, split.num_tasks, 1, [&](int64_t begin, int64_t end) {
        auto state = std::make_unique<Chunk<acc_t>>();
        auto grad_state = std::make_unique<GradChunk<acc_t>>();
        for (int64_t task = begin; task < end; ++task) {
          acc_t* task_partial = part ? part + task * num_params(D, d) : nullptr;
          const int64_t task_end = std::min(B, (task + 1) * split.rows_per_task);
          for (int64_t row0 = task * split.rows_per_task; row0 < task_end; row0 += kChunk)
            backward_rows(gyp, gy_c.stride(0), gy_c.stride(1), xp, x.stride(0), x.stride(1), gxp, task_partial, row0,
                          std::min<int64_t>(kChunk, task_end - row0), p, residual, *state, *grad_state);
        }
      });
    });
  }
  if (!need_gw) {
    auto e = [&] { return at::empty({0}, x.options().dtype(acc)); };
    return {gx, e(), e(), e(), e(), e(), e(), e(), e()};
  }
  auto g = reduce_partials(partials, D, d);
  return {gx, g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7]};
}

}  // namespace

TORCH_LIBRARY(ultimus_ext, m) {
  m.def(
      "fwd(Tensor x, Tensor wq, Tensor? bq, Tensor wk, Tensor? bk, Tensor wv, Tensor? bv, Tensor wo, Tensor? bo, "
      "bool residual) -> Tensor");
  m.def(
      "bwd(Tensor gy, Tensor x, Tensor wq, Tensor? bq, Tensor wk, Tensor? bk, Tensor wv, Tensor? bv, Tensor wo, "
      "Tensor? bo, bool residual, bool need_gx, bool need_gw) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ultimus_ext, CPU, m) {
  m.impl("fwd", &ultimus_fwd_cpu);
  m.impl("bwd", &ultimus_bwd_cpu);
}

}  // namespace ultimus

// An empty Python module: importing ultimus_kernels._C runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
