// The Ultimus block on CUDA: one fused kernel for the forward, one for the backward; and the same for a
// stack of blocks (see ultimus_stack_fwd_kernel).
//
// Math (docs/ULTIMUS_MATH.md): q, k, v = W* x + b*; A = softmax_j(s q_i k_j); z = V.A; y = Wo z + bo (+ x).
// The backward recomputes q, k, v and A from x; the softmax exponent is s q_i (k_j - k_ext), exact.
//
// Layout. One thread owns one sample (row); a thread block owns a tile of `rows` = blockDim.x rows
// and walks the batch with a grid stride. Shared memory holds, in this order:
//   params [gWq-style layout: wq (d*D) | wk | wv | wo (D*d) | bq (d) | bk | bv | bo (D)], absent
//          biases as zeros; every thread of a warp reads the same weight, a broadcast;
//   x tile [rows][D + 1] (and the gy tile in the backward), loaded and stored coalesced; the +1
//          pad puts the rows of consecutive threads in different banks;
//   backward only: gq, gk, gv, z of every row [rows][4d + 1], for the parameter gradients.
// Per-sample vectors (q, k, v, z, a row of A...) live in registers: the loops over d are unrolled
// up to the compile-time bound MAXA (8 or 32) with `i < d` guards, so indices are constants.
//
// Determinism. Each thread block owns one row of parameter-gradient partials, which it zeroes and
// then accumulates into tile after tile in a fixed order; the host sums the rows in a fixed order.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <Python.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <mutex>
#include <unordered_map>

#include "../ultimus.h"

namespace ultimus {
namespace {

template <typename acc_t>
using DeviceParams = ParamPtrs<acc_t, int>;

// Copies the parameters into shared memory in the partial-row layout of ultimus.h.
template <typename acc_t>
__device__ void load_params(acc_t* sp, const DeviceParams<acc_t>& p) {
  const int D = p.D, d = p.d, dD = d * D;
  const int total = 4 * dD + 3 * d + D;
  for (int e = threadIdx.x; e < total; e += blockDim.x) {
    acc_t val;
    if (e < 4 * dD) {
      const acc_t* w = e < dD ? p.wq : e < 2 * dD ? p.wk : e < 3 * dD ? p.wv : p.wo;
      val = w[e % dD];
    } else {
      const int b = e - 4 * dD;
      const acc_t* bias = b < d ? p.bq : b < 2 * d ? p.bk : b < 3 * d ? p.bv : p.bo;
      val = bias ? bias[b < 3 * d ? b % d : b - 3 * d] : acc_t(0);
    }
    sp[e] = val;
  }
}

template <typename acc_t, int MAXA>
__device__ __forceinline__ void project_qkv(const acc_t* sp, const acc_t* xrow, int D, int d, acc_t (&q)[MAXA],
                                            acc_t (&k)[MAXA], acc_t (&v)[MAXA]) {
  const acc_t *wq = sp, *wk = sp + d * D, *wv = sp + 2 * d * D, *bias = sp + 4 * d * D;
#pragma unroll
  for (int i = 0; i < MAXA; ++i) {
    q[i] = i < d ? bias[i] : acc_t(0);
    k[i] = i < d ? bias[d + i] : acc_t(0);
    v[i] = i < d ? bias[2 * d + i] : acc_t(0);
  }
  for (int n = 0; n < D; ++n) {
    const acc_t xn = xrow[n];
#pragma unroll
    for (int i = 0; i < MAXA; ++i)
      if (i < d) {
        q[i] += wq[i * D + n] * xn;
        k[i] += wk[i * D + n] * xn;
        v[i] += wv[i * D + n] * xn;
      }
  }
}

// The extremes of k over j: row i's largest logit s q_i k_j is at k_max when q_i >= 0, else at k_min.
template <typename acc_t, int MAXA>
__device__ __forceinline__ void k_extremes(const acc_t (&k)[MAXA], int d, acc_t& k_max, acc_t& k_min) {
  k_max = k_min = k[0];
#pragma unroll
  for (int j = 1; j < MAXA; ++j)
    if (j < d) {
      k_max = k[j] > k_max ? k[j] : k_max;
      k_min = k[j] < k_min ? k[j] : k_min;
    }
}

// a[j] = A[i, j] = softmax_j(s q_i k[j]), for one row i. The exponent s q_i k_j - max is computed as
// s q_i (k_j - k_ext): a rounded difference keeps its sign and is 0 only for equal operands, so every
// exponent is <= 0 and the largest is exactly 0 however nvcc contracts (a fused `q k - max` leaves the
// top entry a rounding error from 0, and exp overflows for large finite logits). See ultimus_cpu.cpp.
template <typename acc_t, int MAXA>
__device__ __forceinline__ void attention_row(acc_t q_i, const acc_t (&k)[MAXA], acc_t k_max, acc_t k_min, int d,
                                              acc_t scale, acc_t (&a)[MAXA]) {
  const acc_t sq = scale * q_i;
  const acc_t k_ext = sq >= acc_t(0) ? k_max : k_min;
  acc_t total = 0;
#pragma unroll
  for (int j = 0; j < MAXA; ++j) {
    // k_j - k_ext can overflow for |k| near the dtype's limit; with sq = 0 the logit is sq * k_j = 0.
    const acc_t exponent = sq == acc_t(0) ? sq * k[j] : sq * (k[j] - k_ext);
    a[j] = j < d ? exp(exponent) : acc_t(0);
    total += a[j];
  }
  const acc_t inv = acc_t(1) / total;
#pragma unroll
  for (int j = 0; j < MAXA; ++j) a[j] *= inv;
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_tile(const scalar_t* src, int64_t s0, int64_t s1, int64_t row0, int64_t B,
                                          int D, acc_t* tile) {
  const int rows = blockDim.x, ld = D + 1;
  for (int e = threadIdx.x; e < rows * D; e += rows) {
    const int r = e / D, n = e % D;
    const int64_t b = row0 + r;
    tile[r * ld + n] = b < B ? static_cast<acc_t>(src[b * s0 + n * s1]) : acc_t(0);
  }
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_tile(const acc_t* tile, int64_t row0, int64_t B, int D, scalar_t* dst) {
  const int rows = blockDim.x, ld = D + 1;
  for (int e = threadIdx.x; e < rows * D; e += rows) {
    const int r = e / D, n = e % D;
    const int64_t b = row0 + r;
    if (b < B) dst[b * D + n] = static_cast<scalar_t>(tile[r * ld + n]);
  }
}

// Copies a packed parameter row (a stack's block, already in the partial-row layout) into shared memory.
template <typename acc_t>
__device__ __forceinline__ void load_packed(acc_t* sp, const acc_t* __restrict__ row, int np) {
  for (int e = threadIdx.x; e < np; e += blockDim.x) sp[e] = row[e];
}

// One block's forward on this thread's row of a tile, in place; the block's parameters in shared memory.
template <typename acc_t, int MAXA>
__device__ __forceinline__ void block_forward_row(const acc_t* sp, acc_t* xrow, int D, int d, acc_t scale,
                                                  bool residual) {
  const acc_t* wo = sp + 3 * d * D;
  const acc_t* bo = sp + 4 * d * D + 3 * d;
  acc_t q[MAXA], k[MAXA], v[MAXA], z[MAXA], a[MAXA];
  project_qkv<acc_t, MAXA>(sp, xrow, D, d, q, k, v);
  acc_t k_max, k_min;
  k_extremes<acc_t, MAXA>(k, d, k_max, k_min);
#pragma unroll
  for (int j = 0; j < MAXA; ++j) z[j] = 0;
#pragma unroll
  for (int i = 0; i < MAXA; ++i)
    if (i < d) {
      attention_row<acc_t, MAXA>(q[i], k, k_max, k_min, d, scale, a);
#pragma unroll
      for (int j = 0; j < MAXA; ++j) z[j] += v[i] * a[j];
    }
  for (int n = 0; n < D; ++n) {  // y overwrites x: each output feature reads only its own input feature
    acc_t out = bo[n] + (residual ? xrow[n] : acc_t(0));
#pragma unroll
    for (int j = 0; j < MAXA; ++j)
      if (j < d) out += wo[n * d + j] * z[j];
    xrow[n] = out;
  }
}

// One block's backward on this thread's row: recomputes q, k, v and A from the block's input xrow,
// returns gq, gk, gv (for the input gradient) and writes gq | gk | gv | z to grow (for the parameter
// gradients, which the whole thread block sums over its rows).
template <typename acc_t, int MAXA>
__device__ __forceinline__ void block_backward_row(const acc_t* sp, const acc_t* xrow, const acc_t* gyrow, int D,
                                                   int d, acc_t scale, acc_t* grow, acc_t (&gq)[MAXA],
                                                   acc_t (&gk)[MAXA], acc_t (&gv)[MAXA]) {
  const acc_t* wo = sp + 3 * d * D;
  acc_t q[MAXA], k[MAXA], v[MAXA], a[MAXA], gz[MAXA], z[MAXA];
  project_qkv<acc_t, MAXA>(sp, xrow, D, d, q, k, v);
  acc_t k_max, k_min;
  k_extremes<acc_t, MAXA>(k, d, k_max, k_min);
#pragma unroll
  for (int j = 0; j < MAXA; ++j) gz[j] = gk[j] = z[j] = gq[j] = gv[j] = 0;
  for (int n = 0; n < D; ++n) {
    const acc_t g = gyrow[n];
#pragma unroll
    for (int j = 0; j < MAXA; ++j)
      if (j < d) gz[j] += wo[n * d + j] * g;
  }
#pragma unroll
  for (int i = 0; i < MAXA; ++i)
    if (i < d) {
      attention_row<acc_t, MAXA>(q[i], k, k_max, k_min, d, scale, a);
      acc_t r = 0;
#pragma unroll
      for (int j = 0; j < MAXA; ++j) {
        r += a[j] * gz[j];
        z[j] += v[i] * a[j];
      }
      gv[i] = r;
#pragma unroll
      for (int j = 0; j < MAXA; ++j) {
        const acc_t g_score = a[j] * v[i] * (gz[j] - r) * scale;
        gq[i] += g_score * k[j];
        gk[j] += g_score * q[i];
      }
    }
#pragma unroll
  for (int i = 0; i < MAXA; ++i)
    if (i < d) {
      grow[i] = gq[i];
      grow[d + i] = gk[i];
      grow[2 * d + i] = gv[i];
      grow[3 * d + i] = z[i];
    }
}

// The tile's contribution to one block's partial row: xs holds the block's inputs, gys the gradients
// of its outputs, gs every row's gq | gk | gv | z. Element e is always handled by thread e % blockDim.x
// (here and where the row is zeroed), so the row needs no barrier of its own.
template <typename acc_t>
__device__ void accumulate_partials(acc_t* my_partial, const acc_t* xs, const acc_t* gys, const acc_t* gs, int D,
                                    int d) {
  const int rows = blockDim.x, ld = D + 1, ldg = 4 * d + 1, dD = d * D, np = num_params(D, d);
  for (int e = threadIdx.x; e < np; e += rows) {
    acc_t sum = 0;
    if (e < 3 * dD) {  // gWq, gWk, gWv [i][n] = sum_r g*[r][i] x[r][n]
      const int m = e / dD, i = (e % dD) / D, n = e % D;
      for (int r = 0; r < rows; ++r) sum += gs[r * ldg + m * d + i] * xs[r * ld + n];
    } else if (e < 4 * dD) {  // gWo[n][j] = sum_r gy[r][n] z[r][j]
      const int n = (e - 3 * dD) / d, j = (e - 3 * dD) % d;
      for (int r = 0; r < rows; ++r) sum += gys[r * ld + n] * gs[r * ldg + 3 * d + j];
    } else if (e < 4 * dD + 3 * d) {  // gbq, gbk, gbv
      const int b = e - 4 * dD;
      for (int r = 0; r < rows; ++r) sum += gs[r * ldg + b];
    } else {  // gbo
      const int n = e - 4 * dD - 3 * d;
      for (int r = 0; r < rows; ++r) sum += gys[r * ld + n];
    }
    my_partial[e] += sum;
  }
}

// This row's input gradient, written to out_row (which may be gyrow itself: each element is read
// before it is written).
template <typename acc_t, int MAXA>
__device__ __forceinline__ void input_grad_row(const acc_t* sp, const acc_t* gyrow, const acc_t (&gq)[MAXA],
                                               const acc_t (&gk)[MAXA], const acc_t (&gv)[MAXA], int D, int d,
                                               bool residual, acc_t* out_row) {
  const acc_t *wq = sp, *wk = sp + d * D, *wv = sp + 2 * d * D;
  for (int n = 0; n < D; ++n) {
    acc_t out = residual ? gyrow[n] : acc_t(0);
#pragma unroll
    for (int i = 0; i < MAXA; ++i)
      if (i < d) out += wq[i * D + n] * gq[i] + wk[i * D + n] * gk[i] + wv[i * D + n] * gv[i];
    out_row[n] = out;
  }
}

template <typename scalar_t, typename acc_t, int MAXA>
__global__ void ultimus_fwd_kernel(const scalar_t* __restrict__ x, int64_t sx0, int64_t sx1, scalar_t* __restrict__ y,
                                   DeviceParams<acc_t> p, int64_t B, bool residual) {
  extern __shared__ unsigned char smem_raw[];
  acc_t* sp = reinterpret_cast<acc_t*>(smem_raw);
  const int D = p.D, d = p.d, ld = D + 1;
  acc_t* xs = sp + num_params(D, d);
  load_params(sp, p);
  for (int64_t row0 = int64_t(blockIdx.x) * blockDim.x; row0 < B; row0 += int64_t(gridDim.x) * blockDim.x) {
    __syncthreads();  // parameters loaded; the previous tile stored
    load_tile(x, sx0, sx1, row0, B, D, xs);
    __syncthreads();
    block_forward_row<acc_t, MAXA>(sp, xs + threadIdx.x * ld, D, d, p.scale, residual);
    __syncthreads();
    store_tile(xs, row0, B, D, y);
  }
}

template <typename scalar_t, typename acc_t, int MAXA>
__global__ void ultimus_bwd_kernel(const scalar_t* __restrict__ gy, int64_t sg0, int64_t sg1,
                                   const scalar_t* __restrict__ x, int64_t sx0, int64_t sx1, scalar_t* __restrict__ gx,
                                   acc_t* __restrict__ partials, DeviceParams<acc_t> p, int64_t B, bool residual) {
  extern __shared__ unsigned char smem_raw[];
  acc_t* sp = reinterpret_cast<acc_t*>(smem_raw);
  const int D = p.D, d = p.d, ld = D + 1, rows = blockDim.x;
  const int np = num_params(D, d), ldg = 4 * d + 1;
  acc_t* xs = sp + np;
  acc_t* gys = xs + rows * ld;
  acc_t* gs = gys + rows * ld;  // per row: gq (d) | gk (d) | gv (d) | z (d)
  load_params(sp, p);
  acc_t* my_partial = partials ? partials + int64_t(blockIdx.x) * np : nullptr;
  if (my_partial)
    for (int e = threadIdx.x; e < np; e += rows) my_partial[e] = 0;

  for (int64_t row0 = int64_t(blockIdx.x) * rows; row0 < B; row0 += int64_t(gridDim.x) * rows) {
    __syncthreads();
    load_tile(x, sx0, sx1, row0, B, D, xs);
    load_tile(gy, sg0, sg1, row0, B, D, gys);  // rows past B load as 0: they add nothing below
    __syncthreads();
    acc_t* xrow = xs + threadIdx.x * ld;
    const acc_t* gyrow = gys + threadIdx.x * ld;
    acc_t gq[MAXA], gk[MAXA], gv[MAXA];
    block_backward_row<acc_t, MAXA>(sp, xrow, gyrow, D, d, p.scale, gs + threadIdx.x * ldg, gq, gk, gv);
    __syncthreads();
    if (my_partial) accumulate_partials(my_partial, xs, gys, gs, D, d);
    if (gx) {
      __syncthreads();  // everyone is done reading x before gx overwrites it
      input_grad_row<acc_t, MAXA>(sp, gyrow, gq, gk, gv, D, d, residual, xrow);
      __syncthreads();
      store_tile(xs, row0, B, D, gx);
    }
  }
}

// The stack: L blocks per launch, their parameters packed (L, np) in the partial-row layout. Shared
// memory holds one block's parameters at a time, reloaded (from L2) as the tile moves through the
// blocks: any number of blocks fits, at the cost of np loads per block per tile.
template <typename scalar_t, typename acc_t, int MAXA>
__global__ void ultimus_stack_fwd_kernel(const scalar_t* __restrict__ x, int64_t sx0, int64_t sx1,
                                         scalar_t* __restrict__ y, const acc_t* __restrict__ packed, int L, int D,
                                         int d, acc_t scale, int64_t B, bool residual) {
  extern __shared__ unsigned char smem_raw[];
  acc_t* sp = reinterpret_cast<acc_t*>(smem_raw);
  const int ld = D + 1, np = num_params(D, d);
  acc_t* xs = sp + np;
  for (int64_t row0 = int64_t(blockIdx.x) * blockDim.x; row0 < B; row0 += int64_t(gridDim.x) * blockDim.x) {
    __syncthreads();  // the previous tile stored
    load_tile(x, sx0, sx1, row0, B, D, xs);
    for (int block = 0; block < L; ++block) {
      __syncthreads();  // the previous block's parameters no longer read
      load_packed(sp, packed + int64_t(block) * np, np);
      __syncthreads();
      block_forward_row<acc_t, MAXA>(sp, xs + threadIdx.x * ld, D, d, scale, residual);
    }
    __syncthreads();
    store_tile(xs, row0, B, D, y);
  }
}

// Per tile, the blocks in reverse. Block l's input is recomputed from x through blocks 0..l-1 (about
// 1.2 kFLOP per block per sample) rather than stored; the gradient flowing back stays in the gys
// tile. Shared memory: one block's parameters | x tile | block-input tile | gradient tile | gs.
template <typename scalar_t, typename acc_t, int MAXA>
__global__ void ultimus_stack_bwd_kernel(const scalar_t* __restrict__ gy, int64_t sg0, int64_t sg1,
                                         const scalar_t* __restrict__ x, int64_t sx0, int64_t sx1,
                                         scalar_t* __restrict__ gx, acc_t* __restrict__ partials,
                                         const acc_t* __restrict__ packed, int L, int D, int d, acc_t scale,
                                         int64_t B, bool residual) {
  extern __shared__ unsigned char smem_raw[];
  acc_t* sp = reinterpret_cast<acc_t*>(smem_raw);
  const int ld = D + 1, rows = blockDim.x, np = num_params(D, d), ldg = 4 * d + 1;
  acc_t* xs = sp + np;
  acc_t* hs = xs + rows * ld;
  acc_t* gys = hs + rows * ld;
  acc_t* gs = gys + rows * ld;
  acc_t* my_partial = partials ? partials + int64_t(blockIdx.x) * L * np : nullptr;
  if (my_partial)  // block by block, with accumulate_partials' mapping of elements to threads
    for (int block = 0; block < L; ++block)
      for (int e = threadIdx.x; e < np; e += rows) my_partial[int64_t(block) * np + e] = 0;
  const acc_t* xrow = xs + threadIdx.x * ld;
  acc_t* hrow = hs + threadIdx.x * ld;
  acc_t* gyrow = gys + threadIdx.x * ld;

  for (int64_t row0 = int64_t(blockIdx.x) * rows; row0 < B; row0 += int64_t(gridDim.x) * rows) {
    __syncthreads();
    load_tile(x, sx0, sx1, row0, B, D, xs);
    load_tile(gy, sg0, sg1, row0, B, D, gys);  // rows past B load as 0: they add nothing below
    __syncthreads();
    for (int r = 0; r < L; ++r) {
      const int block = L - 1 - r;
      for (int n = 0; n < D; ++n) hrow[n] = xrow[n];  // this thread's own row: no barrier needed
      for (int earlier = 0; earlier < block; ++earlier) {
        __syncthreads();
        load_packed(sp, packed + int64_t(earlier) * np, np);
        __syncthreads();
        block_forward_row<acc_t, MAXA>(sp, hrow, D, d, scale, residual);
      }
      __syncthreads();
      load_packed(sp, packed + int64_t(block) * np, np);
      __syncthreads();
      acc_t gq[MAXA], gk[MAXA], gv[MAXA];
      block_backward_row<acc_t, MAXA>(sp, hrow, gyrow, D, d, scale, gs + threadIdx.x * ldg, gq, gk, gv);
      __syncthreads();  // every row's gs and block input written
      if (my_partial) accumulate_partials(my_partial + int64_t(block) * np, hs, gys, gs, D, d);
      __syncthreads();  // everyone is done reading gys before this block's input gradient replaces it
      input_grad_row<acc_t, MAXA>(sp, gyrow, gq, gk, gv, D, d, residual, gyrow);
    }
    if (gx) {
      __syncthreads();
      store_tile(gys, row0, B, D, gx);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Launchers
// ------------------------------------------------------------------------------------------------

struct LaunchConfig {
  int rows, blocks;
  size_t smem;
};

// Per-device attributes, queried once per device (driver calls are not free on the small-B hot path).
struct DeviceInfo {
  int sms = 0, smem_optin = 0;
};
const DeviceInfo& device_info() {
  static std::mutex mutex;
  static std::unordered_map<int, DeviceInfo> cache;
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(dev);
  if (it == cache.end()) {
    DeviceInfo info;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.sms, cudaDevAttrMultiProcessorCount, dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    it = cache.emplace(dev, info).first;
  }
  return it->second;
}

// The largest tile (128, 64 or 32 rows) whose shared memory fits the device; `tiles` x-sized tiles.
LaunchConfig launch_config(int64_t B, int64_t D, int64_t d, size_t acc_size, int tiles, bool backward,
                           int blocks_per_sm) {
  const DeviceInfo& info = device_info();
  const int sms = info.sms, smem_optin = info.smem_optin;
  for (int rows : {128, 64, 32}) {
    size_t elems = num_params(D, d) + size_t(tiles) * rows * (D + 1) + (backward ? size_t(rows) * (4 * d + 1) : 0);
    size_t smem = elems * acc_size;
    if (smem <= size_t(smem_optin) || rows == 32) {
      TORCH_CHECK(smem <= size_t(smem_optin), "ultimus: D=", D, ", d=", d, " needs ", smem,
                  " bytes of shared memory, more than this GPU's ", smem_optin);
      const int64_t num_tiles = (B + rows - 1) / rows;
      const int blocks = int(std::max<int64_t>(1, std::min<int64_t>(num_tiles, int64_t(sms) * blocks_per_sm)));
      return {rows, blocks, smem};
    }
  }
  TORCH_CHECK(false, "unreachable");
}

template <typename Kernel>
void allow_smem(Kernel kernel, size_t smem) {
  if (smem > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
}

at::Tensor ultimus_fwd_cuda(const at::Tensor& x, const at::Tensor& wq, const OptTensor& bq, const at::Tensor& wk,
                            const OptTensor& bk, const at::Tensor& wv, const OptTensor& bv, const at::Tensor& wo,
                            const OptTensor& bo, bool residual) {
  const auto [D, d] = check_inputs("cuda", x, wq, bq, wk, bk, wv, bv, wo, bo);
  const int64_t B = x.size(0);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({B, D}, x.options());
  if (B == 0) return y;
  const AccParams params(x, wq, bq, wk, bk, wv, bv, wo, bo);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ultimus_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto cfg = launch_config(B, D, d, sizeof(acc_t), 1, false, 8);
    auto launch = [&](auto kernel) {
      allow_smem(kernel, cfg.smem);
      kernel<<<cfg.blocks, cfg.rows, cfg.smem, stream>>>(x.const_data_ptr<scalar_t>(), x.stride(0), x.stride(1),
                                                         y.mutable_data_ptr<scalar_t>(),
                                                         params.ptrs<acc_t, int>(D, d), B, residual);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    ULTIMUS_ATTN_DIM_SWITCH(d, MAXA, [&] { launch(ultimus_fwd_kernel<scalar_t, acc_t, MAXA>); });
  });
  return y;
}

BackwardResult ultimus_bwd_cuda(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& wq, const OptTensor& bq,
                 const at::Tensor& wk, const OptTensor& bk, const at::Tensor& wv, const OptTensor& bv,
                 const at::Tensor& wo, const OptTensor& bo, bool residual, bool need_gx, bool need_gw) {
  const auto [D, d] = check_inputs("cuda", x, wq, bq, wk, bk, wv, bv, wo, bo);
  const int64_t B = x.size(0);
  check_grad_output(gy, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto acc = acc_type(x);
  at::Tensor gx = at::empty(need_gx ? std::vector<int64_t>{B, D} : std::vector<int64_t>{0}, x.options());
  at::Tensor gy_c = gy.to(x.scalar_type());
  at::Tensor partials = at::empty({0, num_params(D, d)}, x.options().dtype(acc));
  if (B > 0 && (need_gx || need_gw)) {
    const AccParams params(x, wq, bq, wk, bk, wv, bv, wo, bo);
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ultimus_bwd_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const auto cfg = launch_config(B, D, d, sizeof(acc_t), 2, true, 2);
      if (need_gw) partials = at::empty({cfg.blocks, num_params(D, d)}, x.options().dtype(acc));
      auto launch = [&](auto kernel) {
        allow_smem(kernel, cfg.smem);
        kernel<<<cfg.blocks, cfg.rows, cfg.smem, stream>>>(
            gy_c.const_data_ptr<scalar_t>(), gy_c.stride(0), gy_c.stride(1), x.const_data_ptr<scalar_t>(),
            x.stride(0), x.stride(1), need_gx ? gx.mutable_data_ptr<scalar_t>() : nullptr,
            need_gw ? partials.mutable_data_ptr<acc_t>() : nullptr, params.ptrs<acc_t, int>(D, d), B, residual);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      ULTIMUS_ATTN_DIM_SWITCH(d, MAXA, [&] { launch(ultimus_bwd_kernel<scalar_t, acc_t, MAXA>); });
    });
  }
  return backward_result(gx, partials, need_gw);
}

// A stack's parameters as the kernels read them: (L, np) in the accumulation dtype, each row in the
// partial-row layout, zeros for absent biases. One cat on the device.
at::Tensor pack_stack(const std::vector<AccParams>& blocks, int64_t D, int64_t d, const at::Tensor& x) {
  std::vector<at::Tensor> pieces;
  for (const auto& b : blocks) {
    for (const at::Tensor* w : {&b.wq, &b.wk, &b.wv, &b.wo}) pieces.push_back(w->reshape(-1));
    if (b.bq.defined())
      for (const at::Tensor* bias : {&b.bq, &b.bk, &b.bv, &b.bo}) pieces.push_back(*bias);
    else
      pieces.push_back(at::zeros({3 * d + D}, x.options().dtype(acc_type(x))));
  }
  return at::cat(pieces);
}

at::Tensor ultimus_stack_fwd_cuda(const at::Tensor& x, at::TensorList params, bool bias, bool residual) {
  const auto [L, D, d] = check_stack_inputs("cuda", x, params, bias);
  const int64_t B = x.size(0);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({B, D}, x.options());
  if (B == 0) return y;
  const at::Tensor packed = pack_stack(stack_acc_params(x, params, bias), D, d, x);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ultimus_stack_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto cfg = launch_config(B, D, d, sizeof(acc_t), 1, false, 8);
    const acc_t scale = acc_t(1.0 / std::sqrt(double(d)));
    auto launch = [&](auto kernel) {
      allow_smem(kernel, cfg.smem);
      kernel<<<cfg.blocks, cfg.rows, cfg.smem, stream>>>(x.const_data_ptr<scalar_t>(), x.stride(0), x.stride(1),
                                                         y.mutable_data_ptr<scalar_t>(), packed.const_data_ptr<acc_t>(),
                                                         int(L), int(D), int(d), scale, B, residual);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    ULTIMUS_ATTN_DIM_SWITCH(d, MAXA, [&] { launch(ultimus_stack_fwd_kernel<scalar_t, acc_t, MAXA>); });
  });
  return y;
}

BackwardResult ultimus_stack_bwd_cuda(const at::Tensor& gy, const at::Tensor& x, at::TensorList params, bool bias,
                                      bool residual, bool need_gx, bool need_gw) {
  const auto [L, D, d] = check_stack_inputs("cuda", x, params, bias);
  check_grad_output(gy, x);
  const int64_t B = x.size(0);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto acc = acc_type(x);
  at::Tensor gx = at::empty(need_gx ? std::vector<int64_t>{B, D} : std::vector<int64_t>{0}, x.options());
  at::Tensor gy_c = gy.to(x.scalar_type());
  at::Tensor partials = at::empty({0, L * num_params(D, d)}, x.options().dtype(acc));
  if (B > 0 && (need_gx || need_gw)) {
    const at::Tensor packed = pack_stack(stack_acc_params(x, params, bias), D, d, x);
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ultimus_stack_bwd_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const auto cfg = launch_config(B, D, d, sizeof(acc_t), 3, true, 2);
      const acc_t scale = acc_t(1.0 / std::sqrt(double(d)));
      if (need_gw) partials = at::empty({cfg.blocks, L * num_params(D, d)}, x.options().dtype(acc));
      auto launch = [&](auto kernel) {
        allow_smem(kernel, cfg.smem);
        kernel<<<cfg.blocks, cfg.rows, cfg.smem, stream>>>(
            gy_c.const_data_ptr<scalar_t>(), gy_c.stride(0), gy_c.stride(1), x.const_data_ptr<scalar_t>(),
            x.stride(0), x.stride(1), need_gx ? gx.mutable_data_ptr<scalar_t>() : nullptr,
            need_gw ? partials.mutable_data_ptr<acc_t>() : nullptr, packed.const_data_ptr<acc_t>(), int(L), int(D),
            int(d), scale, B, residual);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      ULTIMUS_ATTN_DIM_SWITCH(d, MAXA, [&] { launch(ultimus_stack_bwd_kernel<scalar_t, acc_t, MAXA>); });
    });
  }
  return backward_result(gx, partials, need_gw);
}

}  // namespace
}  // namespace ultimus

// Importing ultimus_kernels._C_cuda registers the CUDA kernels of the ops that _C defines. Done here
// rather than by a static TORCH_LIBRARY_IMPL: a stale _C_cuda whose signatures no longer match _C's
// schemas (a rebuild that failed for CUDA only) must fail its import with the reason, not abort the
// process while the library loads.
extern "C" PyObject* PyInit__C_cuda(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
  try {
    static torch::Library kernels(torch::Library::IMPL, "ultimus_ext", c10::DispatchKey::CUDA, __FILE__, __LINE__);
    kernels.impl("fwd", &ultimus::ultimus_fwd_cuda);
    kernels.impl("bwd", &ultimus::ultimus_bwd_cuda);
    kernels.impl("stack_fwd", &ultimus::ultimus_stack_fwd_cuda);
    kernels.impl("stack_bwd", &ultimus::ultimus_stack_bwd_cuda);
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ImportError, e.what());
    return nullptr;
  }
  return PyModule_Create(&module);
}
