// The Ultimus block on CUDA: the kernels and their launchers. ultimus_cuda.cu compiles this file with
// nvcc and registers the launchers as the ops' CUDA kernels; csrc/cuda/emulation.cpp compiles the very
// same file with a C++ compiler and ULTIMUS_CUDA_EMULATION defined, which runs the kernels on the CPU
// (emulation.h), so that the tests check what they compute on machines without a GPU.
//
// Math (docs/ULTIMUS_MATH.md): q, k, v = W* x + b*; A = softmax_j(s q_i k_j); z = V.A; y = Wo z + bo (+ x).
// The backward recomputes q, k, v and A from x; the softmax exponent is s q_i (k_j - k_ext), exact.
//
// Two families of kernels, both one thread per sample (row):
//   * the rows kernels (ultimus_*_rows_kernel) for the common block, D = 48 and d = 8 known at compile
//     time, float32/float16/bfloat16 activations with float32 math: a thread holds its whole row in
//     registers, read and written as 16-byte vectors; the weights sit in shared memory transposed so
//     that every read is a 16-byte broadcast; the backward sums the weight gradients on the tensor
//     cores (TileParamGrads, 3xTF32); bf16 goes forward on the tensor cores (ultimus_fwd_bf16_kernel),
//     half-precision rows backward with their projections there (ultimus_bwd_half_kernel), and stacks
//     of blocks run there whole (ultimus_stack_{fwd,bwd}_tc_kernel); the grid is persistent and sized
//     by the occupancy API;
//   * the generic kernels, for every other size and for float64, with run-time D and d (below).
//
// Generic layout. A thread block owns a tile of `rows` = blockDim.x rows and walks the batch with a
// grid stride. Shared memory holds, in this order:
//   params [gWq-style layout: wq (d*D) | wk | wv | wo (D*d) | bq (d) | bk | bv | bo (D)], absent
//          biases as zeros; every thread of a warp reads the same weight, a broadcast;
//   x tile [rows][D + 1] (and the gy tile in the backward), loaded and stored coalesced; the +1
//          pad puts the rows of consecutive threads in different banks;
//   backward only: gq, gk, gv, z of every row [rows][4d + 1], for the parameter gradients.
// Per-sample vectors (q, k, v, z, a row of A...) live in registers: the loops over d are unrolled
// up to the compile-time bound MAXA (8 or 32) with `i < d` guards, so indices are constants.
//
// Determinism. Each thread block owns one row of parameter-gradient partials, which it accumulates
// into tile after tile in a fixed order; the host sums the rows in a fixed order.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <mutex>
#include <tuple>
#include <unordered_map>

#include "../ultimus.h"

#ifdef ULTIMUS_CUDA_EMULATION
#include "emulation.h"
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#define ULTIMUS_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]

// d += A B for one warp's 16 x 8 x 8 tile on the tensor cores, fragments as the PTX ISA lays them out
// (emulation.h spells the layout out).
// (sm_80 and later: the launchers give older GPUs the generic kernels, which use no tensor cores.)
__device__ __forceinline__ void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// The same for bf16 operands, two per register (the lower half the even k): K = 16 and K = 8.
__device__ __forceinline__ void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}
__device__ __forceinline__ void mma_m16n8k8_bf16(float (&d)[4], const uint32_t (&a)[2], uint32_t b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, {%0, %1, %2, %3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(b));
#endif
}
#endif

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
  ULTIMUS_DYNAMIC_SHARED(smem_raw);
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
  ULTIMUS_DYNAMIC_SHARED(smem_raw);
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
// blocks: any number of blocks fits, at the cost of np loads per block per tile. Where one block's
// parameters and the tiles do not fit together (float64 near D = 256, d = 32), params_in_shared is false
// and the threads read the parameters from device memory (through L1) instead: slower, but every size
// within the limits runs. The single-block launchers use these kernels with L = 1 for such sizes.
template <typename acc_t>
__device__ __forceinline__ const acc_t* block_params(acc_t* sp, const acc_t* __restrict__ packed, int block, int np,
                                                     bool params_in_shared) {
  const acc_t* row = packed + int64_t(block) * np;
  if (!params_in_shared) return row;
  __syncthreads();  // the previous block's parameters no longer read
  load_packed(sp, row, np);
  __syncthreads();
  return sp;
}

template <typename scalar_t, typename acc_t, int MAXA>
__global__ void ultimus_stack_fwd_kernel(const scalar_t* __restrict__ x, int64_t sx0, int64_t sx1,
                                         scalar_t* __restrict__ y, const acc_t* __restrict__ packed, int L, int D,
                                         int d, acc_t scale, int64_t B, bool residual, bool params_in_shared) {
  ULTIMUS_DYNAMIC_SHARED(smem_raw);
  acc_t* sp = reinterpret_cast<acc_t*>(smem_raw);
  const int ld = D + 1, np = num_params(D, d);
  acc_t* xs = sp + (params_in_shared ? np : 0);
  for (int64_t row0 = int64_t(blockIdx.x) * blockDim.x; row0 < B; row0 += int64_t(gridDim.x) * blockDim.x) {
    __syncthreads();  // the previous tile stored
    load_tile(x, sx0, sx1, row0, B, D, xs);
    __syncthreads();  // the tile loaded (each thread's row comes from other threads' loads)
    for (int block = 0; block < L; ++block) {
      const acc_t* wp = block_params(sp, packed, block, np, params_in_shared);
      block_forward_row<acc_t, MAXA>(wp, xs + threadIdx.x * ld, D, d, scale, residual);
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
                                         int64_t B, bool residual, bool params_in_shared) {
  ULTIMUS_DYNAMIC_SHARED(smem_raw);
  acc_t* sp = reinterpret_cast<acc_t*>(smem_raw);
  const int ld = D + 1, rows = blockDim.x, np = num_params(D, d), ldg = 4 * d + 1;
  acc_t* xs = sp + (params_in_shared ? np : 0);
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
      for (int earlier = 0; earlier < block; ++earlier)
        block_forward_row<acc_t, MAXA>(block_params(sp, packed, earlier, np, params_in_shared), hrow, D, d, scale,
                                       residual);
      const acc_t* wp = block_params(sp, packed, block, np, params_in_shared);
      acc_t gq[MAXA], gk[MAXA], gv[MAXA];
      block_backward_row<acc_t, MAXA>(wp, hrow, gyrow, D, d, scale, gs + threadIdx.x * ldg, gq, gk, gv);
      __syncthreads();  // every row's gs and block input written
      if (my_partial) accumulate_partials(my_partial + int64_t(block) * np, hs, gys, gs, D, d);
      __syncthreads();  // everyone is done reading gys before this block's input gradient replaces it
      input_grad_row<acc_t, MAXA>(wp, gyrow, gq, gk, gv, D, d, residual, gyrow);
    }
    if (gx) {
      __syncthreads();
      store_tile(gys, row0, B, D, gx);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// The rows kernels: one sample per thread, D and d known at compile time, float32 math
// ------------------------------------------------------------------------------------------------
// A thread reads its sample's whole row into registers with 16-byte loads (issued together, so each
// thread keeps a row's worth of bytes in flight), computes the block on registers only and writes its
// row back with 16-byte stores. The weights sit in shared memory in the RowsLayout below, where every
// read a thread makes is a float4 that the whole warp reads at once (one broadcast wavefront).

constexpr int kRowsThreads = 128;
constexpr int kRowsD = 48, kRowsAttnDim = 8;  // the sizes the rows kernels are compiled for
constexpr float kLog2e = 1.4426950408889634f;

// Placed at the top of a loop over rows: the compiler must not hoist the loop-invariant shared-memory
// weight reads out of the loop (it would, and spill the ~1600 weights to local memory). An empty asm
// with a memory clobber means the same to nvcc and to the C++ compiler of the emulation.
#define ULTIMUS_KEEP_WEIGHT_READS_IN_LOOP() asm volatile("" ::: "memory")

// A block's parameters in shared memory, in floats:
//   wqkv_t [D][3d]  row n = (wq[:, n], wk[:, n], wv[:, n]): q|k|v = sum_n x[n] wqkv_t[n] and the input
//                   gradient gx[n] = wqkv_t[n] . (gq|gk|gv) both walk n and read one row per step
//   bqkv [3d] | wo [D][d] (as stored: row n makes y[n]; gz = sum_n gy[n] wo[n]) | bo [D]
// Every section starts at a multiple of 4 floats (d % 4 == 0), so rows read as float4.
template <int D, int d>
struct RowsLayout {
  static_assert(d % 4 == 0, "the rows kernels read weights as float4");
  static constexpr int kWqkv = 0, kBqkv = 3 * d * D, kWo = kBqkv + 3 * d, kBo = kWo + D * d, kSize = kBo + D;
};

// Fills one block's RowsLayout from its weights (as the ops take them) and biases (null: zeros).
template <int D, int d>
__device__ void load_rows_params(float* sp, const float* wq, const float* wk, const float* wv, const float* wo,
                                 const float* bq, const float* bk, const float* bv, const float* bo) {
  using L = RowsLayout<D, d>;
  for (int e = threadIdx.x; e < L::kSize; e += blockDim.x) {
    float val;
    if (e < L::kBqkv) {
      const int n = e / (3 * d), m = e % (3 * d);
      val = (m < d ? wq : m < 2 * d ? wk : wv)[(m % d) * D + n];
    } else if (e < L::kWo) {
      const int m = e - L::kBqkv;
      const float* bias = m < d ? bq : m < 2 * d ? bk : bv;
      val = bias ? bias[m % d] : 0.f;
    } else if (e < L::kBo) {
      val = wo[e - L::kWo];
    } else {
      val = bo ? bo[e - L::kBo] : 0.f;
    }
    sp[e] = val;
  }
}

__device__ __forceinline__ float4 load4(const float* p) { return *reinterpret_cast<const float4*>(p); }

// One row of D activations <-> registers, as 16-byte vectors (the row must start 16-byte aligned).
template <typename scalar_t, int D>
__device__ __forceinline__ void load_row(const scalar_t* __restrict__ src, float (&row)[D]) {
  constexpr int kPer = 16 / sizeof(scalar_t);
  static_assert(D % kPer == 0, "a row is a whole number of 16-byte vectors");
  const uint4* chunks = reinterpret_cast<const uint4*>(src);
  uint4 raw[D / kPer];
#pragma unroll
  for (int c = 0; c < D / kPer; ++c) raw[c] = chunks[c];  // all loads first: a row in flight per thread
#pragma unroll
  for (int c = 0; c < D / kPer; ++c) {
    scalar_t vals[kPer];
    memcpy(vals, &raw[c], 16);
#pragma unroll
    for (int e = 0; e < kPer; ++e) row[c * kPer + e] = static_cast<float>(vals[e]);
  }
}

template <typename scalar_t, int D>
__device__ __forceinline__ void store_row(const float (&row)[D], scalar_t* __restrict__ dst) {
  constexpr int kPer = 16 / sizeof(scalar_t);
  uint4* chunks = reinterpret_cast<uint4*>(dst);
#pragma unroll
  for (int c = 0; c < D / kPer; ++c) {
    scalar_t vals[kPer];
#pragma unroll
    for (int e = 0; e < kPer; ++e) vals[e] = static_cast<scalar_t>(row[c * kPer + e]);
    uint4 raw;
    memcpy(&raw, vals, 16);
    chunks[c] = raw;
  }
}

// Two consecutive activations (at an even column of a 16-byte-aligned row) <-> two floats.
template <typename scalar_t>
__device__ __forceinline__ float2 load_pair(const scalar_t* __restrict__ src) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return *reinterpret_cast<const float2*>(src);
  } else {
    const uint32_t raw = *reinterpret_cast<const uint32_t*>(src);
    scalar_t vals[2];
    memcpy(vals, &raw, 4);
    return float2{static_cast<float>(vals[0]), static_cast<float>(vals[1])};
  }
}
template <typename scalar_t>
__device__ __forceinline__ void store_pair(float a, float b, scalar_t* __restrict__ dst) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    *reinterpret_cast<float2*>(dst) = float2{a, b};
  } else {
    const scalar_t vals[2] = {static_cast<scalar_t>(a), static_cast<scalar_t>(b)};
    uint32_t raw;
    memcpy(&raw, vals, 4);
    *reinterpret_cast<uint32_t*>(dst) = raw;
  }
}

// Copies a row of registers to shared memory (a tile row for the parameter-gradient reduction).
template <int N>
__device__ __forceinline__ void share_row(const float (&row)[N], float* dst) {
  static_assert(N % 4 == 0, "float4 stores");
#pragma unroll
  for (int c = 0; c < N / 4; ++c)
    *reinterpret_cast<float4*>(dst + 4 * c) = float4{row[4 * c], row[4 * c + 1], row[4 * c + 2], row[4 * c + 3]};
}

// qkv = (q | k | v) = W x + b, from the RowsLayout.
template <int D, int d>
__device__ __forceinline__ void project_qkv_rows(const float* sp, const float (&x)[D], float (&qkv)[3 * d]) {
  using L = RowsLayout<D, d>;
#pragma unroll
  for (int c = 0; c < 3 * d / 4; ++c) {
    const float4 b = load4(sp + L::kBqkv + 4 * c);
    qkv[4 * c] = b.x, qkv[4 * c + 1] = b.y, qkv[4 * c + 2] = b.z, qkv[4 * c + 3] = b.w;
  }
#pragma unroll
  for (int n = 0; n < D; ++n)
#pragma unroll
    for (int c = 0; c < 3 * d / 4; ++c) {
      const float4 w = load4(sp + L::kWqkv + n * 3 * d + 4 * c);
      qkv[4 * c] += w.x * x[n];
      qkv[4 * c + 1] += w.y * x[n];
      qkv[4 * c + 2] += w.z * x[n];
      qkv[4 * c + 3] += w.w * x[n];
    }
}

// 2^x in one MUFU.EX2, results below 2^-126 flushed to zero (ex2.approx.ftz). exp2f takes three more
// instructions per call to scale such results up and back, which an attention weight never needs: the
// row's largest weight is 2^0 = 1, and a subnormal beside it is lost in the row sum anyway. The error
// is ex2.approx's, as exp2f's: 2 ulp.
__device__ __forceinline__ float exp2_ftz(float x) {
#ifdef ULTIMUS_CUDA_EMULATION
  const float r = std::exp2(x);
  return r < std::numeric_limits<float>::min() ? 0.f : r;
#else
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
#endif
}

// Row i of the attention before normalisation: e[j] = exp(s q_i k_j - max_j s q_i k_j); returns the
// row's sum. The row maximum is exact in O(1) from k's extremes, and the exponent s q_i (k_j - k_ext)
// is exactly 0 for the largest entry (see attention_row); s log2(e) is folded into scale_log2 so the
// exponential is one exp2.
template <int d>
__device__ __forceinline__ float attention_row_rows(float q_i, const float (&qkv)[3 * d], float k_max, float k_min,
                                                    float scale_log2, float (&e)[d]) {
  const float sq = scale_log2 * q_i;
  // sq == 0: every exponent is 0 (times k_j), and k_j - k_ext might overflow to infinity (0 * inf = NaN)
  const float k_ext = sq > 0.f ? k_max : sq < 0.f ? k_min : 0.f;
  float total = 0.f;
#pragma unroll
  for (int j = 0; j < d; ++j) {
    e[j] = exp2_ftz(sq * (qkv[d + j] - k_ext));
    total += e[j];
  }
  return total;
}

template <int d>
__device__ __forceinline__ void k_extremes_rows(const float (&qkv)[3 * d], float& k_max, float& k_min) {
  k_max = k_min = qkv[d];
#pragma unroll
  for (int j = 1; j < d; ++j) {
    k_max = fmaxf(k_max, qkv[d + j]);
    k_min = fminf(k_min, qkv[d + j]);
  }
}

// The attention's forward on a row: z[j] = sum_i v_i A[i, j] from q|k|v.
template <int d>
__device__ __forceinline__ void attention_forward_rows(const float (&qkv)[3 * d], float scale_log2, float (&z)[d]) {
  float k_max, k_min;
  k_extremes_rows<d>(qkv, k_max, k_min);
#pragma unroll
  for (int j = 0; j < d; ++j) z[j] = 0.f;
#pragma unroll
  for (int i = 0; i < d; ++i) {
    float e[d];
    const float total = attention_row_rows<d>(qkv[i], qkv, k_max, k_min, scale_log2, e);
    // v_i / row sum; the sum is in [1, d] (its largest term is exp2(0) = 1), so the fast division
    // (2 ulp) is exact enough and needs no slow path for tiny divisors.
    const float w = __fdividef(qkv[2 * d + i], total);
#pragma unroll
    for (int j = 0; j < d; ++j) z[j] += w * e[j];
  }
}

// One block's forward on a row held in registers, in place (y[n] needs only x[n] of the input).
template <int D, int d>
__device__ __forceinline__ void block_forward_rows(const float* sp, float (&row)[D], float scale_log2,
                                                   bool residual) {
  using L = RowsLayout<D, d>;
  float qkv[3 * d], z[d];
  project_qkv_rows<D, d>(sp, row, qkv);
  attention_forward_rows<d>(qkv, scale_log2, z);
#pragma unroll
  for (int n = 0; n < D; ++n) {
    float out = sp[L::kBo + n] + (residual ? row[n] : 0.f);
#pragma unroll
    for (int c = 0; c < d / 4; ++c) {
      const float4 w = load4(sp + L::kWo + n * d + 4 * c);
      out += w.x * z[4 * c] + w.y * z[4 * c + 1] + w.z * z[4 * c + 2] + w.w * z[4 * c + 3];
    }
    row[n] = out;
  }
}

// The attention's backward on a row: from q|k|v and gz = Wo^T gy, the gradients g = (gq | gk | gv) and
// the attention output z (for the parameter gradients); A recomputed exactly as in the forward.
template <int d>
__device__ __forceinline__ void attention_backward_rows(const float (&qkv)[3 * d], const float (&gz)[d], float scale,
                                                        float (&g)[3 * d], float (&z)[d]) {
  float k_max, k_min;
  k_extremes_rows<d>(qkv, k_max, k_min);
#pragma unroll
  for (int j = 0; j < d; ++j) z[j] = 0.f;
#pragma unroll
  for (int m = 0; m < 3 * d; ++m) g[m] = 0.f;
#pragma unroll
  for (int i = 0; i < d; ++i) {
    float a[d];
    const float inv = __fdividef(1.f, attention_row_rows<d>(qkv[i], qkv, k_max, k_min, scale * kLog2e, a));
    float r = 0.f;  // r = sum_j A[i, j] gz[j]
#pragma unroll
    for (int j = 0; j < d; ++j) {
      a[j] *= inv;
      r += a[j] * gz[j];
      z[j] += qkv[2 * d + i] * a[j];
    }
    g[2 * d + i] = r;  // gv_i
    const float vs = qkv[2 * d + i] * scale;
#pragma unroll
    for (int j = 0; j < d; ++j) {  // the score gradient s v_i A[i, j] (gz[j] - r) feeds gq_i and gk_j
      const float g_score = a[j] * (gz[j] - r) * vs;
      g[i] += g_score * qkv[d + j];
      g[d + j] += g_score * qkv[i];
    }
  }
}

// One block's backward on a row: from the block's input x and the gradient gy of its output, the
// gradients g = (gq | gk | gv) of q, k, v and the attention output z (for the parameter gradients).
template <int D, int d>
__device__ __forceinline__ void block_backward_rows(const float* sp, const float (&x)[D], const float (&gy)[D],
                                                    float scale, float (&g)[3 * d], float (&z)[d]) {
  using L = RowsLayout<D, d>;
  float qkv[3 * d], gz[d];
  project_qkv_rows<D, d>(sp, x, qkv);
#pragma unroll
  for (int j = 0; j < d; ++j) gz[j] = 0.f;
#pragma unroll
  for (int n = 0; n < D; ++n)  // gz = Wo^T gy
#pragma unroll
    for (int c = 0; c < d / 4; ++c) {
      const float4 w = load4(sp + L::kWo + n * d + 4 * c);
      gz[4 * c] += w.x * gy[n];
      gz[4 * c + 1] += w.y * gy[n];
      gz[4 * c + 2] += w.z * gy[n];
      gz[4 * c + 3] += w.w * gy[n];
    }
  attention_backward_rows<d>(qkv, gz, scale, g, z);
}

// The input gradient gx = (residual ? gy : 0) + W^T g, in place of gy.
template <int D, int d>
__device__ __forceinline__ void input_grad_rows(const float* sp, const float (&g)[3 * d], bool residual,
                                                float (&row)[D]) {
  using L = RowsLayout<D, d>;
#pragma unroll
  for (int n = 0; n < D; ++n) {
    float out = residual ? row[n] : 0.f;
#pragma unroll
    for (int c = 0; c < 3 * d / 4; ++c) {
      const float4 w = load4(sp + L::kWqkv + n * 3 * d + 4 * c);
      out += w.x * g[4 * c] + w.y * g[4 * c + 1] + w.z * g[4 * c + 2] + w.w * g[4 * c + 3];
    }
    row[n] = out;
  }
}

// A float as two tf32 numbers, hi + lo = x to within 2^-21 |x|: the tensor cores' products in
// "3xTF32", a b = a_lo b_hi + a_hi b_lo + a_hi b_hi, are then as exact as fp32's (the dropped a_lo b_lo
// is below 2^-20 |a b|). hi is x cut to tf32's 10 mantissa bits (one AND: cvt.rna.tf32 costs several
// instructions on sm_90), so lo = x - hi is exact; the tensor core reads lo's top 19 bits.
__device__ __forceinline__ void split_tf32(float x, uint32_t& hi, uint32_t& lo) {
  uint32_t bits;
  memcpy(&bits, &x, 4);
  hi = bits & 0xffffe000u;
  const float rest = x - __uint_as_float(hi);
  memcpy(&lo, &rest, 4);
}

// acc += a b in 3xTF32 from split operands, the small products first.
__device__ __forceinline__ void mma_3xtf32(float (&acc)[4], const uint32_t (&a_hi)[4], const uint32_t (&a_lo)[4],
                                           const uint32_t (&b_hi)[2], const uint32_t (&b_lo)[2]) {
  mma_m16n8k8_tf32(acc, a_lo, b_hi);
  mma_m16n8k8_tf32(acc, a_hi, b_lo);
  mma_m16n8k8_tf32(acc, a_hi, b_hi);
}

// The parameter gradients of one tile, summed over its rows on the tensor cores (3xTF32) from the
// tile in shared memory: x, gy and (g | z) of every row, g = (gq | gk | gv). Four warps:
//   warps 0-2: gWqkv^T[n][m] = sum_r x[r][n] g[r][m] for n in 16 w + 0..15, all 3d = 24 m
//              (rows m of gWq | gWk | gWv in turn); warp 1 also gbqkv[m] = sum_r g[r][m] (A = ones);
//   warp 3:    gWo[n][j] = sum_r gy[r][n] z[r][j] for all n and j, and gbo[n] = sum_r gy[r][n] (B = ones).
// add() adds the sums into the thread block's partial row; each entry belongs to one lane, so the
// row needs no barrier, and every tile adds in the same order (deterministic).
template <int D, int d>
struct TileParamGrads {
  static_assert(D == 48 && d == 8 && kRowsThreads == 128, "three warps of 16 rows of gWqkv^T and one for gWo");
  // Row strides of the tile, in words. x and gy rows: 52 = 20 (mod 32), so a row's 16-byte chunks
  // (share_row: lane r writes row r) meet no bank conflict; this struct's transposed reads (row t,
  // column g) meet a 2-way conflict on a quarter of the lanes, and FragmentRows::share's float2 stores
  // (row g, columns 2 t, 2 t + 1) some 2-way ones (24 = 24 mod 32 would avoid the reads' and give the
  // row stores 2-way ones: more wavefronts in all, in the offline model, when this stride was chosen).
  // g|z rows: 40 = 8 (mod 32).
  static constexpr int kLdX = D + 4, kLdG = 4 * d + 8;
  float sum[3][4], bias[3][4];
  int warp, g, t;

  __device__ __forceinline__ TileParamGrads() : warp(threadIdx.x / 32), g(threadIdx.x % 32 / 4), t(threadIdx.x % 4) {
#pragma unroll
    for (int i = 0; i < 3; ++i)
#pragma unroll
      for (int r = 0; r < 4; ++r) sum[i][r] = bias[i][r] = 0.f;
  }

  // Puts this thread's row into the tile: x, gy and g | z, the last two as zeros for a row past B
  // (which must add exactly nothing, whatever the biases make of its zero x).
  static __device__ __forceinline__ void share(const float (&x)[D], const float (&gy)[D], const float (&g)[3 * d],
                                               const float (&z)[d], bool live, float* xs, float* gys, float* gs) {
    const int row = threadIdx.x;
    share_row<D>(x, xs + row * kLdX);
    share_row<D>(gy, gys + row * kLdX);
    share_gz(g, z, live, gs);
  }
  static __device__ __forceinline__ void share_gz(const float (&g)[3 * d], const float (&z)[d], bool live, float* gs) {
    float gz[4 * d];
#pragma unroll
    for (int m = 0; m < 4 * d; ++m) gz[m] = live ? (m < 3 * d ? g[m] : z[m - 3 * d]) : 0.f;
    share_row<4 * d>(gz, gs + threadIdx.x * kLdG);
  }

  // One branch per tile on the warp's role (warp-uniform): mma.sync must run on converged warps, and
  // a branch inside the loop would have the compiler re-converge them at every step.
  __device__ __forceinline__ void accumulate(const float* xs, const float* gys, const float* gs, int rows) {
    if (warp == 1)
      accumulate_qkv<true>(xs, gs, rows);
    else if (warp < 3)
      accumulate_qkv<false>(xs, gs, rows);
    else
      accumulate_out(gys, gs, rows);
  }

  // Steps of 8 rows: lane (g, t) reads rows r0 = k0 + t and r1 = r0 + 4 of the tile.
  template <bool kBias>
  __device__ __forceinline__ void accumulate_qkv(const float* xs, const float* gs, int rows) {
    constexpr uint32_t kOne = 0x3f800000u;  // 1.0f, exact in tf32
    const uint32_t ones[4] = {kOne, kOne, kOne, kOne};
    const int n0 = 16 * warp;
    for (int k0 = 0; k0 < rows; k0 += 8) {
      const float* x0 = xs + (k0 + t) * kLdX + n0 + g;
      const float* x1 = x0 + 4 * kLdX;
      uint32_t a_hi[4], a_lo[4];  // A = x^T, rows n0 + 0..15
      split_tf32(x0[0], a_hi[0], a_lo[0]);
      split_tf32(x0[8], a_hi[1], a_lo[1]);
      split_tf32(x1[0], a_hi[2], a_lo[2]);
      split_tf32(x1[8], a_hi[3], a_lo[3]);
#pragma unroll
      for (int i = 0; i < 3; ++i) {  // B = g[:, 8 i + 0..7]
        const float* g0 = gs + (k0 + t) * kLdG + 8 * i + g;
        uint32_t b_hi[2], b_lo[2];
        split_tf32(g0[0], b_hi[0], b_lo[0]);
        split_tf32(g0[4 * kLdG], b_hi[1], b_lo[1]);
        mma_3xtf32(sum[i], a_hi, a_lo, b_hi, b_lo);
        if (kBias) {
          mma_m16n8k8_tf32(bias[i], ones, b_lo);
          mma_m16n8k8_tf32(bias[i], ones, b_hi);
        }
      }
    }
  }

  __device__ __forceinline__ void accumulate_out(const float* gys, const float* gs, int rows) {
    constexpr uint32_t kOne = 0x3f800000u;
    const uint32_t ones[2] = {kOne, kOne};
    for (int k0 = 0; k0 < rows; k0 += 8) {
      const float* z0 = gs + (k0 + t) * kLdG + 3 * d + g;
      uint32_t b_hi[2], b_lo[2];  // B = z
      split_tf32(z0[0], b_hi[0], b_lo[0]);
      split_tf32(z0[4 * kLdG], b_hi[1], b_lo[1]);
#pragma unroll
      for (int i = 0; i < 3; ++i) {  // A = gy^T, rows n in 16 i + 0..15
        const float* y0 = gys + (k0 + t) * kLdX + 16 * i + g;
        const float* y1 = y0 + 4 * kLdX;
        uint32_t a_hi[4], a_lo[4];
        split_tf32(y0[0], a_hi[0], a_lo[0]);
        split_tf32(y0[8], a_hi[1], a_lo[1]);
        split_tf32(y1[0], a_hi[2], a_lo[2]);
        split_tf32(y1[8], a_hi[3], a_lo[3]);
        mma_3xtf32(sum[i], a_hi, a_lo, b_hi, b_lo);
        mma_m16n8k8_tf32(bias[i], a_lo, ones);
        mma_m16n8k8_tf32(bias[i], a_hi, ones);
      }
    }
  }

  // Into the partial-row layout of ultimus.h: [gWq | gWk | gWv (3d x D) | gWo (D x d) | gbq | gbk | gbv | gbo],
  // added to what is there (kAdd) or stored.
  template <bool kAdd>
  __device__ __forceinline__ void write(float* partial) const {
    constexpr int dD = d * D;
#pragma unroll
    for (int i = 0; i < 3; ++i)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int row = g + 8 * (r / 2), col = 2 * t + r % 2;  // of the 16 x 8 tile
        float* out = warp < 3 ? partial + (8 * i + col) * D + 16 * warp + row  // gWqkv[m][n]
                              : partial + 3 * dD + (16 * i + row) * d + col;  // gWo[n][j]
        *out = kAdd ? *out + sum[i][r] : sum[i][r];
        float* out_bias = nullptr;
        if (warp == 1 && row == 0) out_bias = partial + 4 * dD + 8 * i + col;   // every row holds the sums
        if (warp == 3 && col == 0) out_bias = partial + 4 * dD + 3 * d + 16 * i + row;  // every column does
        if (out_bias) *out_bias = kAdd ? *out_bias + bias[i][r] : bias[i][r];
      }
  }
};

template <typename scalar_t, int D, int d>
__global__ void __launch_bounds__(kRowsThreads)
    ultimus_fwd_rows_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, DeviceParams<float> p,
                            int64_t B, bool residual) {
  ULTIMUS_DYNAMIC_SHARED(smem_raw);
  float* sp = reinterpret_cast<float*>(smem_raw);
  load_rows_params<D, d>(sp, p.wq, p.wk, p.wv, p.wo, p.bq, p.bk, p.bv, p.bo);
  __syncthreads();
  const float scale_log2 = p.scale * kLog2e;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; b < B; b += stride) {
    ULTIMUS_KEEP_WEIGHT_READS_IN_LOOP();
    float row[D];
    load_row<scalar_t, D>(x + b * D, row);
    block_forward_rows<D, d>(sp, row, scale_log2, residual);
    store_row<scalar_t, D>(row, y + b * D);
  }
}

// Shared memory: the RowsLayout, then (parameter gradients only) the tile's x, gy and g|z rows.
template <typename scalar_t, int D, int d>
__global__ void __launch_bounds__(kRowsThreads)
    ultimus_bwd_rows_kernel(const scalar_t* __restrict__ gy, const scalar_t* __restrict__ x,
                            scalar_t* __restrict__ gx, float* __restrict__ partials, DeviceParams<float> p, int64_t B,
                            bool residual) {
  using Grads = TileParamGrads<D, d>;
  ULTIMUS_DYNAMIC_SHARED(smem_raw);
  float* sp = reinterpret_cast<float*>(smem_raw);
  const int rows = blockDim.x, t = threadIdx.x;
  float* xs = sp + RowsLayout<D, d>::kSize;
  float* gys = xs + rows * Grads::kLdX;
  float* gs = gys + rows * Grads::kLdX;
  float* my_partial = partials ? partials + int64_t(blockIdx.x) * num_params(D, d) : nullptr;
  if (my_partial) Grads().template write<false>(my_partial);  // zeros
  load_rows_params<D, d>(sp, p.wq, p.wk, p.wv, p.wo, p.bq, p.bk, p.bv, p.bo);
  __syncthreads();
  for (int64_t row0 = int64_t(blockIdx.x) * rows; row0 < B; row0 += int64_t(gridDim.x) * rows) {
    ULTIMUS_KEEP_WEIGHT_READS_IN_LOOP();
    const int64_t b = row0 + t;
    float xr[D], gyr[D], g[3 * d], z[d];
    if (b < B) {
      load_row<scalar_t, D>(x + b * D, xr);
      load_row<scalar_t, D>(gy + b * D, gyr);
    } else {
#pragma unroll
      for (int n = 0; n < D; ++n) xr[n] = gyr[n] = 0.f;
    }
    block_backward_rows<D, d>(sp, xr, gyr, p.scale, g, z);
    if (partials) Grads::share(xr, gyr, g, z, b < B, xs, gys, gs);
    if (gx && b < B) {
      input_grad_rows<D, d>(sp, g, residual, gyr);
      store_row<scalar_t, D>(gyr, gx + b * D);
    }
    if (partials) {
      __syncthreads();  // the tile's rows are shared
      Grads grads;
      grads.accumulate(xs, gys, gs, rows);
      grads.template write<true>(my_partial);
      __syncthreads();  // and read: the next tile may overwrite them
    }
  }
}

// Each block's weights of a stack, from the stack ops' packed rows (the partial-row layout of
// ultimus.h, biases as zeros where absent): load(block, wq, wk, wv, wo, bq, bk, bv, bo), block = 0..L-1.
template <int D, int d, typename Load>
__device__ __forceinline__ void for_each_packed_block(const float* packed, int L, Load&& load) {
  constexpr int dD = d * D, np = 4 * dD + 3 * d + D;
  for (int block = 0; block < L; ++block) {
    const float* p = packed + int64_t(block) * np;
    load(block, p, p + dD, p + 2 * dD, p + 3 * dD, p + 4 * dD, p + 4 * dD + d, p + 4 * dD + 2 * d, p + 4 * dD + 3 * d);
  }
}

// The stack forward: every block's RowsLayout in shared memory (L of them, as many as fit: the
// launcher checks), the row carried through the blocks in registers.
template <typename scalar_t, int D, int d>
__global__ void __launch_bounds__(kRowsThreads)
    ultimus_stack_fwd_rows_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y,
                                  const float* __restrict__ packed, int L, float scale, int64_t B, bool residual) {
  using Layout = RowsLayout<D, d>;
  ULTIMUS_DYNAMIC_SHARED(smem_raw);
  float* sp = reinterpret_cast<float*>(smem_raw);
  for_each_packed_block<D, d>(packed, L,
                              [&](int block, auto... w) { load_rows_params<D, d>(sp + block * Layout::kSize, w...); });
  __syncthreads();
  const float scale_log2 = scale * kLog2e;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; b < B; b += stride) {
    ULTIMUS_KEEP_WEIGHT_READS_IN_LOOP();
    float row[D];
    load_row<scalar_t, D>(x + b * D, row);
    for (int block = 0; block < L; ++block)
      block_forward_rows<D, d>(sp + block * Layout::kSize, row, scale_log2, residual);
    store_row<scalar_t, D>(row, y + b * D);
  }
}

// The stack backward: every block's RowsLayout in shared memory, then (parameter gradients only) the
// tile of the reduction. Per tile, the blocks in reverse: block l's input is recomputed from x in
// registers through blocks 0..l-1 (for L = 4, six block forwards per tile) rather than stored, and
// the gradient flowing back stays in registers. The parameter-gradient sums go into the thread
// block's L partial rows after every block of every tile (registers cannot hold L blocks' sums).
template <typename scalar_t, int D, int d>
__global__ void __launch_bounds__(kRowsThreads)
    ultimus_stack_bwd_rows_kernel(const scalar_t* __restrict__ gy, const scalar_t* __restrict__ x,
                                  scalar_t* __restrict__ gx, float* __restrict__ partials,
                                  const float* __restrict__ packed, int L, float scale, int64_t B, bool residual) {
  using Layout = RowsLayout<D, d>;
  using Grads = TileParamGrads<D, d>;
  ULTIMUS_DYNAMIC_SHARED(smem_raw);
  float* sp = reinterpret_cast<float*>(smem_raw);
  const int64_t np = num_params(D, d);
  const int rows = blockDim.x, t = threadIdx.x;
  float* xs = sp + L * Layout::kSize;
  float* gys = xs + rows * Grads::kLdX;
  float* gs = gys + rows * Grads::kLdX;
  for_each_packed_block<D, d>(packed, L,
                              [&](int block, auto... w) { load_rows_params<D, d>(sp + block * Layout::kSize, w...); });
  float* my_partials = partials ? partials + int64_t(blockIdx.x) * L * np : nullptr;
  if (my_partials)
    for (int block = 0; block < L; ++block) Grads().template write<false>(my_partials + int64_t(block) * np);
  __syncthreads();
  const float scale_log2 = scale * kLog2e;
  for (int64_t row0 = int64_t(blockIdx.x) * rows; row0 < B; row0 += int64_t(gridDim.x) * rows) {
    ULTIMUS_KEEP_WEIGHT_READS_IN_LOOP();
    const int64_t b = row0 + t;
    float xr[D], g[D];
    if (b < B) {
      load_row<scalar_t, D>(x + b * D, xr);
      load_row<scalar_t, D>(gy + b * D, g);
    } else {
#pragma unroll
      for (int n = 0; n < D; ++n) xr[n] = g[n] = 0.f;
    }
    for (int block = L - 1; block >= 0; --block) {
      float h[D];
#pragma unroll
      for (int n = 0; n < D; ++n) h[n] = xr[n];
      for (int earlier = 0; earlier < block; ++earlier)
        block_forward_rows<D, d>(sp + earlier * Layout::kSize, h, scale_log2, residual);
      const float* bp = sp + block * Layout::kSize;
      float gqkv[3 * d], z[d];
      block_backward_rows<D, d>(bp, h, g, scale, gqkv, z);
      if (my_partials) {
        Grads::share(h, g, gqkv, z, b < B, xs, gys, gs);
        __syncthreads();  // the tile's rows are shared
        Grads grads;
        grads.accumulate(xs, gys, gs, rows);
        grads.template write<true>(my_partials + int64_t(block) * np);
        __syncthreads();  // and read: the next block may overwrite them
      }
      input_grad_rows<D, d>(bp, gqkv, residual, g);  // g becomes the gradient of this block's input
    }
    if (gx && b < B) store_row<scalar_t, D>(g, gx + b * D);
  }
}

// Where column `col` of fp32 row `row` lives in a tile of row stride `ld` (8 or 24 mod 32 words) that
// the tensor-core fragments and the threads' own rows both read and write: the 16-byte chunks of rows
// 4..7 (mod 8) are swapped in pairs. With it a thread reading or writing its own row as float4 meets no
// bank conflict (without, rows r and r + 4 share banks), nor do the fragments' float2 accesses to
// columns 2 t, 2 t + 1 of rows g (a pair never straddles a chunk), nor their 32-bit A reads at columns
// t and t + 4.
__device__ __forceinline__ int swizzled(int row, int col, int ld) { return row * ld + (col ^ (row & 4)); }

// ------------------------------------------------------------------------------------------------
// bf16 forward on the tensor cores
// ------------------------------------------------------------------------------------------------
// With bf16 rows the forward moves half the bytes of fp32 for the same fp32 FMAs, so the FMAs bound
// it. Here the two projections run on the tensor cores instead, with fp32 accuracy kept: x is exact
// in bf16, each weight is split into two bf16 (w = w_hi + w_lo to 2^-17), and x W = x w_hi + x w_lo
// (bf16 products are exact in fp32, accumulated in fp32); z is split as well, z Wo^T = z_hi wo_hi +
// z_hi wo_lo + z_lo wo_hi. Biases start the accumulators. Each warp owns 32 rows, two m16 tiles, and
// exchanges them between the tensor-core fragments and one-row-per-thread form through its own
// shared memory, so warps never wait for one another; the attention stays one row per thread.
__device__ __forceinline__ uint16_t bf16_bits(float x) { return c10::BFloat16(x).x; }
__device__ __forceinline__ float bf16_float(uint16_t bits) {
  return float(c10::BFloat16(bits, c10::BFloat16::from_bits()));
}
__device__ __forceinline__ uint32_t bf16_pair(uint16_t even, uint16_t odd) {
  return uint32_t(even) | (uint32_t(odd) << 16);
}
// x as hi + lo, each a pair-packable bf16: hi = bf16(x), lo = bf16(x - hi).
__device__ __forceinline__ void split_bf16(float x, uint16_t& hi, uint16_t& lo) {
  hi = bf16_bits(x);
  lo = bf16_bits(x - bf16_float(hi));
}

template <int D, int d>
struct Bf16Forward {
  static_assert(D == 48 && d == 8, "the fragments below are laid out for D = 48, d = 8");
  static constexpr int kQkvTiles = 3 * d / 8, kKSteps = D / 16, kOutTiles = D / 8;  // 3, 3, 6
  // Per-lane fragments in shared memory, [fragment][lane] (each lane reads its own word: no conflicts):
  // B of qkv (hi then lo) [kQkvTiles][kKSteps][2 regs], B of y (hi, lo) [kOutTiles], the biases of the
  // accumulator columns a lane holds: qkv [kQkvTiles][2], y [kOutTiles][2].
  static constexpr int kWqkv = 0, kWo = kWqkv + 2 * kQkvTiles * kKSteps * 2, kBqkv = kWo + 2 * kOutTiles,
                       kBo = kBqkv + 2 * kQkvTiles, kFragments = kBo + 2 * kOutTiles;
  // A warp's scratch, in 32-bit words: x rows (bf16, 24 words + 4 pad), q|k|v or y rows (fp32, 40 or
  // 56 words: float2 stores by fragment without bank conflicts), z rows as bf16 hi and lo (4 + 8 pad).
  static constexpr int kLdX = D / 2 + 4, kLdQkv = 3 * d + 16, kLdY = D + 8, kLdZ = d / 2 + 8;
  static constexpr int kWarpWords = 32 * kLdX + 32 * kLdY + 2 * 32 * kLdZ;

  static constexpr int kSmemWords = 32 * kFragments + 4 * kWarpWords;

  // Fills the fragments from the weights (float, as the ops take them); biases may be null.
  static __device__ void load(uint32_t* frags, const float* wq, const float* wk, const float* wv, const float* wo,
                              const float* bq, const float* bk, const float* bv, const float* bo) {
    for (int e = threadIdx.x; e < 32 * kFragments; e += blockDim.x) {
      const int frag = e / 32, lane = e % 32, g = lane / 4, t = lane % 4;
      uint32_t value;
      if (frag < kWo) {  // B[k = n][col = m] = W_m[n], m = 8 tile + g, n = 16 step + 2 (t + 4 reg) + 0..1
        const int f = frag % (kQkvTiles * kKSteps * 2), lo = frag >= kQkvTiles * kKSteps * 2;
        const int tile = f / (kKSteps * 2), step = f / 2 % kKSteps, reg = f % 2;
        const int m = 8 * tile + g, n = 16 * step + 2 * (t + 4 * reg);
        const float* w = (m < d ? wq : m < 2 * d ? wk : wv) + (m % d) * D + n;
        uint16_t hi0, lo0, hi1, lo1;
        split_bf16(w[0], hi0, lo0);
        split_bf16(w[1], hi1, lo1);
        value = lo ? bf16_pair(lo0, lo1) : bf16_pair(hi0, hi1);
      } else if (frag < kBqkv) {  // B[k = j][col = n] = Wo[n][j], n = 8 tile + g, j = 2 t + 0..1
        const int tile = (frag - kWo) % kOutTiles, lo = frag - kWo >= kOutTiles;
        const float* w = wo + (8 * tile + g) * d + 2 * t;
        uint16_t hi0, lo0, hi1, lo1;
        split_bf16(w[0], hi0, lo0);
        split_bf16(w[1], hi1, lo1);
        value = lo ? bf16_pair(lo0, lo1) : bf16_pair(hi0, hi1);
      } else {  // the bias of accumulator column 8 tile + 2 t + half
        const bool out = frag >= kBo;
        const int f = out ? frag - kBo : frag - kBqkv, tile = f / 2, col = 8 * tile + 2 * t + f % 2;
        const float* bias = out ? bo : (col < d ? bq : col < 2 * d ? bk : bv);
        const float b = bias ? bias[out ? col : col % d] : 0.f;
        memcpy(&value, &b, 4);
      }
      frags[frag * 32 + lane] = value;
    }
  }
};

template <int D, int d>
__global__ void __launch_bounds__(kRowsThreads)
    ultimus_fwd_bf16_kernel(const c10::BFloat16* __restrict__ x, c10::BFloat16* __restrict__ y, DeviceParams<float> p,
                            int64_t B, bool residual) {
  using F = Bf16Forward<D, d>;
  ULTIMUS_DYNAMIC_SHARED(smem_raw);
  uint32_t* frags = reinterpret_cast<uint32_t*>(smem_raw);
  F::load(frags, p.wq, p.wk, p.wv, p.wo, p.bq, p.bk, p.bv, p.bo);
  __syncthreads();  // the only block-wide barrier: from here each warp works alone
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  uint32_t* xs = frags + 32 * F::kFragments + warp * F::kWarpWords;  // this warp's scratch
  float* ys = reinterpret_cast<float*>(xs + 32 * F::kLdX);          // q|k|v, then y
  uint32_t* z_hi = xs + 32 * F::kLdX + 32 * F::kLdY;
  uint32_t* z_lo = z_hi + 32 * F::kLdZ;
  const uint32_t* frag = frags + lane;  // frag[32 f]: this lane's word of fragment f
  const float scale_log2 = p.scale * kLog2e;
  for (int64_t row0 = (int64_t(blockIdx.x) * 4 + warp) * 32; row0 < B; row0 += int64_t(gridDim.x) * kRowsThreads) {
    const int64_t b = row0 + lane;
    uint4 raw[D / 8];  // this lane's row, bf16
#pragma unroll
    for (int c = 0; c < D / 8; ++c) raw[c] = b < B ? reinterpret_cast<const uint4*>(x + b * D)[c] : uint4{0, 0, 0, 0};
#pragma unroll
    for (int c = 0; c < D / 8; ++c) *reinterpret_cast<uint4*>(xs + lane * F::kLdX + 4 * c) = raw[c];
    __syncwarp();
    // q|k|v = x W^T + b: rows 16 mt + (g, g + 8), columns 8 nt + 2 t + (0, 1)
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
      float acc[F::kQkvTiles][4];
#pragma unroll
      for (int nt = 0; nt < F::kQkvTiles; ++nt) {
        const float b0 = __uint_as_float(frag[32 * (F::kBqkv + 2 * nt)]);
        const float b1 = __uint_as_float(frag[32 * (F::kBqkv + 2 * nt + 1)]);
        acc[nt][0] = acc[nt][2] = b0;
        acc[nt][1] = acc[nt][3] = b1;
      }
#pragma unroll
      for (int step = 0; step < F::kKSteps; ++step) {
        const uint32_t* x0 = xs + (16 * mt + g) * F::kLdX + 8 * step + t;
        const uint32_t a[4] = {x0[0], x0[8 * F::kLdX], x0[4], x0[8 * F::kLdX + 4]};
#pragma unroll
        for (int nt = 0; nt < F::kQkvTiles; ++nt) {
          const int f = (nt * F::kKSteps + step) * 2;
          const uint32_t hi[2] = {frag[32 * f], frag[32 * (f + 1)]};
          const int flo = f + F::kQkvTiles * F::kKSteps * 2;
          const uint32_t lo[2] = {frag[32 * flo], frag[32 * (flo + 1)]};
          mma_m16n8k16_bf16(acc[nt], a, lo);
          mma_m16n8k16_bf16(acc[nt], a, hi);
        }
      }
#pragma unroll
      for (int nt = 0; nt < F::kQkvTiles; ++nt) {
        const int row = 16 * mt + g, col = 8 * nt + 2 * t;
        *reinterpret_cast<float2*>(ys + swizzled(row, col, F::kLdQkv)) = float2{acc[nt][0], acc[nt][1]};
        *reinterpret_cast<float2*>(ys + swizzled(row + 8, col, F::kLdQkv)) = float2{acc[nt][2], acc[nt][3]};
      }
    }
    __syncwarp();
    float qkv[3 * d];
#pragma unroll
    for (int c = 0; c < 3 * d / 4; ++c) {
      const float4 v = load4(ys + swizzled(lane, 4 * c, F::kLdQkv));
      qkv[4 * c] = v.x, qkv[4 * c + 1] = v.y, qkv[4 * c + 2] = v.z, qkv[4 * c + 3] = v.w;
    }
    float z[d];
    attention_forward_rows<d>(qkv, scale_log2, z);
#pragma unroll
    for (int jw = 0; jw < d / 2; ++jw) {
      uint16_t h0, l0, h1, l1;
      split_bf16(z[2 * jw], h0, l0);
      split_bf16(z[2 * jw + 1], h1, l1);
      z_hi[lane * F::kLdZ + jw] = bf16_pair(h0, h1);
      z_lo[lane * F::kLdZ + jw] = bf16_pair(l0, l1);
    }
    __syncwarp();  // z shared; q|k|v read: y may take their place
    // y = z Wo^T + bo (+ x below): rows 16 mt + (g, g + 8), columns 8 nt + 2 t + (0, 1)
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
      const int r0 = (16 * mt + g) * F::kLdZ + t, r1 = r0 + 8 * F::kLdZ;
      const uint32_t a_hi[2] = {z_hi[r0], z_hi[r1]}, a_lo[2] = {z_lo[r0], z_lo[r1]};
#pragma unroll
      for (int nt = 0; nt < F::kOutTiles; ++nt) {
        float acc[4];
        acc[0] = acc[2] = __uint_as_float(frag[32 * (F::kBo + 2 * nt)]);
        acc[1] = acc[3] = __uint_as_float(frag[32 * (F::kBo + 2 * nt + 1)]);
        const uint32_t w_hi = frag[32 * (F::kWo + nt)], w_lo = frag[32 * (F::kWo + F::kOutTiles + nt)];
        mma_m16n8k8_bf16(acc, a_lo, w_hi);
        mma_m16n8k8_bf16(acc, a_hi, w_lo);
        mma_m16n8k8_bf16(acc, a_hi, w_hi);
        const int row = 16 * mt + g, col = 8 * nt + 2 * t;
        *reinterpret_cast<float2*>(ys + swizzled(row, col, F::kLdY)) = float2{acc[0], acc[1]};
        *reinterpret_cast<float2*>(ys + swizzled(row + 8, col, F::kLdY)) = float2{acc[2], acc[3]};
      }
    }
    __syncwarp();
    if (b < B) {
      float row[D];
#pragma unroll
      for (int c = 0; c < D / 4; ++c) {
        const float4 v = load4(ys + swizzled(lane, 4 * c, F::kLdY));
        row[4 * c] = v.x, row[4 * c + 1] = v.y, row[4 * c + 2] = v.z, row[4 * c + 3] = v.w;
      }
      if (residual) {
#pragma unroll
        for (int c = 0; c < D / 8; ++c) {
          c10::BFloat16 xv[8];
          memcpy(xv, &raw[c], 16);
#pragma unroll
          for (int e = 0; e < 8; ++e) row[8 * c + e] += static_cast<float>(xv[e]);
        }
      }
      store_row<c10::BFloat16, D>(row, y + b * D);
    }
    __syncwarp();  // the scratch is read before the next rows overwrite it
  }
}

// ------------------------------------------------------------------------------------------------
// A warp's rows as tensor-core fragments
// ------------------------------------------------------------------------------------------------
// 32 rows of D features held by a warp as m16n8k8 accumulators: lane (g, t) holds columns 8 c + 2 t and
// 8 c + 2 t + 1 of rows g and g + 8 of each 16-row half, c = 0..D/8-1. Taken in that order (features
// 2 t, 2 t + 1 of a chunk as k = t, t + 4), the same registers are the A fragments of a product over
// the features, with no data movement: the weight fragments of such products list their k in the order
// 0, 2, 4, 6, 1, 3, 5, 7 of each chunk. Read from and written to device memory straight from the
// registers: each group of four lanes covers 32 contiguous bytes of a row (fp32).
template <int D>
struct FragmentRows {
  static constexpr int kChunks = D / 8;
  using Regs = float[2][kChunks][4];  // [16-row half][8-feature chunk][accumulator register]

  // Rows row0 + 0..31 from a (B, D) row-major tensor with 16-byte-aligned rows; rows past B are zeros.
  template <typename scalar_t>
  static __device__ __forceinline__ void load(const scalar_t* __restrict__ x, int64_t row0, int64_t B, int lane,
                                              Regs& rows) {
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int64_t b = row0 + 16 * mt + 8 * half + lane / 4;
#pragma unroll
        for (int c = 0; c < kChunks; ++c) {
          const float2 v = b < B ? load_pair(x + b * D + 8 * c + 2 * (lane % 4)) : float2{0.f, 0.f};
          rows[mt][c][2 * half] = v.x, rows[mt][c][2 * half + 1] = v.y;
        }
      }
  }
  template <typename scalar_t>
  static __device__ __forceinline__ void store(const Regs& rows, int64_t row0, int64_t B, int lane,
                                               scalar_t* __restrict__ y) {
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int64_t b = row0 + 16 * mt + 8 * half + lane / 4;
        if (b < B)
#pragma unroll
          for (int c = 0; c < kChunks; ++c)
            store_pair(rows[mt][c][2 * half], rows[mt][c][2 * half + 1], y + b * D + 8 * c + 2 * (lane % 4));
      }
  }

  // The A fragment of chunk `c` of half `mt`: A[g][k], A[g + 8][k], A[g][k + 4], A[g + 8][k + 4] are
  // features 2 t and 2 t + 1 of rows g and g + 8. As tf32 bits (for values exact in tf32: half
  // precision), or split into tf32 hi and lo (3xTF32).
  static __device__ __forceinline__ void a_bits(const Regs& rows, int mt, int c, uint32_t (&a)[4]) {
    memcpy(&a[0], &rows[mt][c][0], 4);
    memcpy(&a[1], &rows[mt][c][2], 4);
    memcpy(&a[2], &rows[mt][c][1], 4);
    memcpy(&a[3], &rows[mt][c][3], 4);
  }
  static __device__ __forceinline__ void a_split(const Regs& rows, int mt, int c, uint32_t (&hi)[4],
                                                 uint32_t (&lo)[4]) {
    split_tf32(rows[mt][c][0], hi[0], lo[0]);
    split_tf32(rows[mt][c][2], hi[1], lo[1]);
    split_tf32(rows[mt][c][1], hi[2], lo[2]);
    split_tf32(rows[mt][c][3], hi[3], lo[3]);
  }

  // Into a row-major tile of stride `ld` (natural feature order), rows 0..31 of `tile`.
  static __device__ __forceinline__ void share(const Regs& rows, float* tile, int ld, int lane) {
    const int g = lane / 4, t = lane % 4;
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        float* at = tile + (16 * mt + g) * ld + 8 * c + 2 * t;
        *reinterpret_cast<float2*>(at) = float2{rows[mt][c][0], rows[mt][c][1]};
        *reinterpret_cast<float2*>(at + 8 * ld) = float2{rows[mt][c][2], rows[mt][c][3]};
      }
  }

  static __device__ __forceinline__ void copy(const Regs& from, Regs& to) {
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int c = 0; c < kChunks; ++c)
#pragma unroll
        for (int r = 0; r < 4; ++r) to[mt][c][r] = from[mt][c][r];
  }
};

// ------------------------------------------------------------------------------------------------
// The half-precision backward with its projections on the tensor cores
// ------------------------------------------------------------------------------------------------
// With float16 or bfloat16 rows the rows backward moves half the bytes of fp32 for the same fp32 FMAs,
// and its projections (q|k|v and gz from the rows, gx from g: 2.7k FMAs per sample) bound it. Here they
// run as tf32 mma.sync. A half-precision value is exact in tf32 (10 mantissa bits, fp32's range), so
// x W^T = x w_hi + x w_lo and gy Wo the same way are as exact as fp32 in two products (w = w_hi + w_lo,
// both tf32, to 2^-21 |w|); gx = W^T g takes 3xTF32, g being fp32. The weights' tf32 halves sit in
// shared memory as per-lane fragments. Each warp holds its 32 rows of x and gy as FragmentRows, read
// from device memory straight into the A fragments of the projections; gx accumulates onto gy's
// registers (the residual) and goes straight back. The parameter gradients are TileParamGrads' over the
// tile in shared memory (x, gy and g|z rows), as in the rows backward; q|k|v|gz land in the g|z rows,
// which the attention then overwrites with g|z. Each warp projects its own rows (no block barrier).
template <int D, int d>
struct TensorCoreProjections {
  static_assert(D == 48 && d == 8 && kRowsThreads == 128, "the fragments below are laid out for D = 48, d = 8");
  using Grads = TileParamGrads<D, d>;
  using Rows = typename FragmentRows<D>::Regs;
  static constexpr int kLdX = Grads::kLdX, kLdG = Grads::kLdG;
  static constexpr int kSteps = D / 8, kQkvTiles = 3 * d / 8, kGSteps = 3 * d / 8, kOutTiles = D / 8;  // 6 3 3 6
  // Fragments [f][lane]. B of m16n8k8 holds B[k = t][n = g] (reg 0) and B[k = t + 4][n = g] (reg 1);
  // each weight fragment comes as its tf32 hi then lo, so f % 2 is the half:
  //   Wqkv [kQkvTiles][kSteps][2 regs][hi, lo]: B[k = n][col = m] = W_m[n]   (q|k|v = x Wqkv^T)
  //   Wo   [kSteps][2 regs][hi, lo]:            B[k = n][col = j] = Wo[n][j] (gz = gy Wo)
  //        (n of both in FragmentRows' order: k = t, t + 4 of step s are features 8 s + 2 t, 8 s + 2 t + 1)
  //   W3   [kOutTiles][kGSteps][2 regs][hi, lo]: B[k = m][col = n] = W_m[n]  (gx = g Wqkv)
  //   bqkv [kQkvTiles][2]: the bias of accumulator column 8 tile + 2 t + 0..1
  static constexpr int kWqkv = 0, kWo = kWqkv + kQkvTiles * kSteps * 4, kW3 = kWo + kSteps * 4,
                       kBqkv = kW3 + kOutTiles * kGSteps * 4, kFragments = kBqkv + 2 * kQkvTiles;
  static constexpr int kSmemWords = 32 * kFragments + kRowsThreads * (2 * kLdX + kLdG);

  // The hi fragment of each (lo: + 1).
  static __device__ __forceinline__ int wqkv(int tile, int step, int reg) {
    return kWqkv + (tile * kSteps + step) * 4 + 2 * reg;
  }
  static __device__ __forceinline__ int wo(int step, int reg) { return kWo + step * 4 + 2 * reg; }
  static __device__ __forceinline__ int w3(int tile, int step, int reg) {
    return kW3 + (tile * kGSteps + step) * 4 + 2 * reg;
  }

  // Fills the fragments from the weights (float, as the ops take them); biases may be null.
  static __device__ void load(uint32_t* frags, const float* wq, const float* wk, const float* wv, const float* wo_w,
                              const float* bq, const float* bk, const float* bv) {
    for (int e = threadIdx.x; e < 32 * kFragments; e += blockDim.x) {
      const int f = e / 32, lane = e % 32, g = lane / 4, t = lane % 4;
      if (f >= kBqkv) {
        const int col = 8 * ((f - kBqkv) / 2) + 2 * t + (f - kBqkv) % 2;
        const float* bias = col < d ? bq : col < 2 * d ? bk : bv;
        const float b = bias ? bias[col % d] : 0.f;
        memcpy(&frags[e], &b, 4);
        continue;
      }
      float w;
      if (f < kWqkv + kQkvTiles * kSteps * 4) {  // k in FragmentRows' feature order
        const int i = f - kWqkv, tile = i / (4 * kSteps), step = i / 4 % kSteps, reg = i / 2 % 2;
        const int m = 8 * tile + g, n = 8 * step + 2 * t + reg;
        w = (m < d ? wq : m < 2 * d ? wk : wv)[(m % d) * D + n];
      } else if (f < kW3) {  // likewise
        const int i = f - kWo, step = i / 4, reg = i / 2 % 2;
        w = wo_w[(8 * step + 2 * t + reg) * d + g];
      } else {
        const int i = f - kW3, tile = i / (4 * kGSteps), step = i / 4 % kGSteps, reg = i / 2 % 2;
        const int m = 8 * step + t + 4 * reg, n = 8 * tile + g;
        w = (m < d ? wq : m < 2 * d ? wk : wv)[(m % d) * D + n];
      }
      uint32_t hi, lo;
      split_tf32(w, hi, lo);
      frags[e] = f % 2 ? lo : hi;
    }
  }

  // q|k|v = x Wqkv^T + b and gz = gy Wo for rows 32 warp + 0..31 (x and gy held as FragmentRows), into
  // columns 0..4d of their g|z rows. Both 16-row halves per step: each weight fragment is read once per
  // tile.
  static __device__ __forceinline__ void project(const uint32_t* frag, const Rows& x, const Rows& gy, float* gs,
                                                 int warp, int g, int t) {
    const int r0 = 32 * warp + g;
    float acc[2][kQkvTiles + 1][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
      for (int tile = 0; tile < kQkvTiles; ++tile) {
        acc[mt][tile][0] = acc[mt][tile][2] = __uint_as_float(frag[32 * (kBqkv + 2 * tile)]);
        acc[mt][tile][1] = acc[mt][tile][3] = __uint_as_float(frag[32 * (kBqkv + 2 * tile + 1)]);
      }
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[mt][kQkvTiles][r] = 0.f;
    }
#pragma unroll
    for (int step = 0; step < kSteps; ++step) {
      uint32_t ax[2][4], agy[2][4];  // exact in tf32: no lo parts
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        FragmentRows<D>::a_bits(x, mt, step, ax[mt]);
        FragmentRows<D>::a_bits(gy, mt, step, agy[mt]);
      }
#pragma unroll
      for (int tile = 0; tile <= kQkvTiles; ++tile) {
        const int f0 = tile < kQkvTiles ? wqkv(tile, step, 0) : wo(step, 0);
        const int f1 = tile < kQkvTiles ? wqkv(tile, step, 1) : wo(step, 1);
        const uint32_t hi[2] = {frag[32 * f0], frag[32 * f1]}, lo[2] = {frag[32 * (f0 + 1)], frag[32 * (f1 + 1)]};
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          const uint32_t(&a)[4] = tile < kQkvTiles ? ax[mt] : agy[mt];
          mma_m16n8k8_tf32(acc[mt][tile], a, lo);
          mma_m16n8k8_tf32(acc[mt][tile], a, hi);
        }
      }
    }
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int tile = 0; tile <= kQkvTiles; ++tile) {
        float* out = gs + (r0 + 16 * mt) * kLdG + 8 * tile + 2 * t;
        *reinterpret_cast<float2*>(out) = float2{acc[mt][tile][0], acc[mt][tile][1]};
        *reinterpret_cast<float2*>(out + 8 * kLdG) = float2{acc[mt][tile][2], acc[mt][tile][3]};
      }
  }

  // W3 of this struct's fragments, as input_grad reads it: B[k = m][col = n] = W_m[n], m = 8 step + t
  // (+ 4), n = 8 tile + g, as tf32 hi and lo.
  struct W3Fragments {
    const uint32_t* frag;  // this lane's word of fragment 0
    __device__ __forceinline__ void w3(int tile, int step, uint32_t (&hi)[2], uint32_t (&lo)[2]) const {
      const int f0 = TensorCoreProjections::w3(tile, step, 0), f1 = TensorCoreProjections::w3(tile, step, 1);
      hi[0] = frag[32 * f0], hi[1] = frag[32 * f1], lo[0] = frag[32 * (f0 + 1)], lo[1] = frag[32 * (f1 + 1)];
    }
  };

  // gy = (residual ? gy : 0) + g Wqkv for a warp's rows (FragmentRows) in 3xTF32, g in the warp's g|z
  // rows `gs` (as share_gz wrote them): gx, in place. W3 from weights.w3 (W3Fragments or the stack's).
  template <typename Weights>
  static __device__ __forceinline__ void input_grad(const Weights& weights, const float* gs, bool residual, int lane,
                                                    Rows& gy) {
    const int g = lane / 4, t = lane % 4;
    uint32_t a_hi[2][kGSteps][4], a_lo[2][kGSteps][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int step = 0; step < kGSteps; ++step) {
        const float* at = gs + (16 * mt + g) * kLdG + 8 * step + t;
        split_tf32(at[0], a_hi[mt][step][0], a_lo[mt][step][0]);
        split_tf32(at[8 * kLdG], a_hi[mt][step][1], a_lo[mt][step][1]);
        split_tf32(at[4], a_hi[mt][step][2], a_lo[mt][step][2]);
        split_tf32(at[8 * kLdG + 4], a_hi[mt][step][3], a_lo[mt][step][3]);
      }
#pragma unroll
    for (int tile = 0; tile < kOutTiles; ++tile) {
#pragma unroll
      for (int step = 0; step < kGSteps; ++step) {
        uint32_t hi[2], lo[2];
        weights.w3(tile, step, hi, lo);
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          float(&acc)[4] = gy[mt][tile];
          if (!residual && step == 0) acc[0] = acc[1] = acc[2] = acc[3] = 0.f;
          mma_3xtf32(acc, a_hi[mt][step], a_lo[mt][step], hi, lo);
        }
      }
    }
  }
};

// float16 and bfloat16 activations, sm_80 and later (the launcher picks it in place of the rows backward).
template <typename scalar_t, int D, int d>
__global__ void __launch_bounds__(kRowsThreads)
    ultimus_bwd_half_kernel(const scalar_t* __restrict__ gy, const scalar_t* __restrict__ x,
                            scalar_t* __restrict__ gx, float* __restrict__ partials, DeviceParams<float> p, int64_t B,
                            bool residual) {
  using P = TensorCoreProjections<D, d>;
  using Grads = typename P::Grads;
  ULTIMUS_DYNAMIC_SHARED(smem_raw);
  uint32_t* frags = reinterpret_cast<uint32_t*>(smem_raw);
  float* xs = reinterpret_cast<float*>(frags + 32 * P::kFragments);
  float* gys = xs + kRowsThreads * P::kLdX;
  float* gs = gys + kRowsThreads * P::kLdX;
  const int t = threadIdx.x, warp = t / 32, lane = t % 32;
  float* my_partial = partials ? partials + int64_t(blockIdx.x) * num_params(D, d) : nullptr;
  if (my_partial) Grads().template write<false>(my_partial);  // zeros
  P::load(frags, p.wq, p.wk, p.wv, p.wo, p.bq, p.bk, p.bv);
  __syncthreads();
  const uint32_t* frag = frags + lane;  // frag[32 f]: this lane's word of fragment f
  using Rows = FragmentRows<D>;
  for (int64_t row0 = int64_t(blockIdx.x) * kRowsThreads; row0 < B; row0 += int64_t(gridDim.x) * kRowsThreads) {
    const int64_t warp_row0 = row0 + 32 * warp;
    const bool live = row0 + t < B;  // this thread's own row, in the attention's one-row-per-thread part
    typename Rows::Regs gy_rows;  // gy, then gx
    {
      typename Rows::Regs x_rows;
      Rows::load(x, warp_row0, B, lane, x_rows);
      Rows::load(gy, warp_row0, B, lane, gy_rows);
      P::project(frag, x_rows, gy_rows, gs, warp, lane / 4, lane % 4);
      if (my_partial) {
        Rows::share(x_rows, xs + 32 * warp * P::kLdX, P::kLdX, lane);
        Rows::share(gy_rows, gys + 32 * warp * P::kLdX, P::kLdX, lane);
      }
    }
    __syncwarp();  // q|k|v|gz are shared
    float qkv[3 * d], gz[d], g[3 * d], z[d];
#pragma unroll
    for (int c = 0; c < d; ++c) {
      const float4 v = load4(gs + t * P::kLdG + 4 * c);
      float* dst = c < 3 * d / 4 ? qkv + 4 * c : gz + 4 * c - 3 * d;
      dst[0] = v.x, dst[1] = v.y, dst[2] = v.z, dst[3] = v.w;
    }
    attention_backward_rows<d>(qkv, gz, p.scale, g, z);
    Grads::share_gz(g, z, live, gs);
    if (my_partial) {
      __syncthreads();  // the tile's rows are shared
      Grads grads;
      grads.accumulate(xs, gys, gs, kRowsThreads);
      grads.template write<true>(my_partial);
      __syncthreads();  // and read: the next tile may overwrite them
    } else {
      __syncwarp();  // the warp's g rows are shared
    }
    if (gx) {
      P::input_grad(typename P::W3Fragments{frag}, gs + 32 * warp * P::kLdG, residual, lane, gy_rows);
      Rows::store(gy_rows, warp_row0, B, lane, gx);
    }
    __syncwarp();  // the warp's g rows are read before the next tile overwrites them
  }
}

// ------------------------------------------------------------------------------------------------
// The stack forward on the tensor cores
// ------------------------------------------------------------------------------------------------
// A stack of L blocks does L times one block's FMAs for the same bytes, so FMAs bound the rows stack
// forward (34% of copy bandwidth for L = 4 in the offline model). Here both projections of every block
// run as tf32 mma.sync in 3xTF32 (the rows between blocks are fp32, so both factors are split) and the
// attention stays one row per thread. A warp carries 32 rows through all L blocks in its registers as
// FragmentRows: the accumulators of one block's output projection are the A fragments of the next
// block's q|k|v projection as they stand, and start the next output projection's accumulators as the
// residual. So the rows never go back to shared memory, which only turns q|k|v to one row per thread
// for the attention and z back to A fragments; only the first read and the last write touch device
// memory. Every block's weights sit in shared memory as per-lane fragments (L blocks of them: the
// launcher checks they fit), so after the first barrier no warp waits for another.
template <int D, int d>
struct TensorCoreStackForward {
  static_assert(D == 48 && d == 8 && kRowsThreads == 128, "the fragments below are laid out for D = 48, d = 8");
  static constexpr int kSteps = D / 8, kQkvTiles = 3 * d / 8, kOutTiles = D / 8;  // 6 3 6
  // One block's fragments, in 32-bit words. The weights in 16-byte groups [group][lane][hi0, hi1, lo0,
  // lo1]: B of m16n8k8 holds B[k = t][n = g] (reg 0) and B[k = t + 4][n = g] (reg 1), each as its tf32
  // hi and lo, so a lane reads a group in one conflict-free 16-byte load. The biases of the accumulator
  // columns 8 tile + 2 t + 0..1 that a lane holds, as [tile][lane][2]:
  //   Wqkv groups [kQkvTiles][kSteps]: B[k][col = m] = W_m[8 step + 2 (k % 4) + k / 4]  (q|k|v = x Wqkv^T,
  //                                    the input features in the registers' order, see above)
  //   Wo groups [kOutTiles]:           B[k = j][col = n] = Wo[n][j]                      (y = z Wo^T)
  //   bqkv [kQkvTiles], bo [kOutTiles]
  static constexpr int kWqkv = 0, kWo = kWqkv + 128 * kQkvTiles * kSteps, kBqkv = kWo + 128 * kOutTiles,
                       kBo = kBqkv + 64 * kQkvTiles, kBlockWords = kBo + 64 * kOutTiles;
  // A warp's scratch: q|k|v, then z, of its 32 rows [32][kLdQkv], in swizzled() order.
  static constexpr int kLdQkv = 3 * d + 16, kWarpWords = 32 * kLdQkv;
  static constexpr size_t smem_bytes(int64_t L) {
    return (size_t(L) * kBlockWords + size_t(kRowsThreads / 32) * kWarpWords) * sizeof(uint32_t);
  }
  using Rows = typename FragmentRows<D>::Regs;

  // Fills one block's fragments from its weights and biases (null: zeros).
  static __device__ void load(uint32_t* frags, const float* wq, const float* wk, const float* wv, const float* wo,
                              const float* bq, const float* bk, const float* bv, const float* bo) {
    for (int e = threadIdx.x; e < kBlockWords; e += blockDim.x) {
      if (e >= kBqkv) {
        const bool out = e >= kBo;
        const int i = e - (out ? kBo : kBqkv), lane = i / 2 % 32, col = 8 * (i / 64) + 2 * (lane % 4) + i % 2;
        const float* bias = out ? bo : col < d ? bq : col < 2 * d ? bk : bv;
        const float b = bias ? bias[out ? col : col % d] : 0.f;
        memcpy(&frags[e], &b, 4);
        continue;
      }
      const bool out = e >= kWo;
      const int i = e - (out ? kWo : kWqkv), group = i / 128, lane = i / 4 % 32, reg = i % 2;
      const int g = lane / 4, t = lane % 4;
      float w;
      if (!out) {
        const int m = 8 * (group / kSteps) + g, n = 8 * (group % kSteps) + 2 * t + reg;
        w = (m < d ? wq : m < 2 * d ? wk : wv)[(m % d) * D + n];
      } else {
        w = wo[(8 * group + g) * d + t + 4 * reg];
      }
      uint32_t hi, lo;
      split_tf32(w, hi, lo);
      frags[e] = i % 4 < 2 ? hi : lo;
    }
  }

  // A block's weights as project_qkv and project_out read them, from this struct's fragments (the
  // stack backward has its own source, with the same methods): B fragments as tf32 hi and lo, and the
  // biases of the accumulator columns a lane holds.
  struct Fragments {
    const uint32_t* block;
    int lane;
    __device__ __forceinline__ void wqkv(int tile, int step, uint32_t (&hi)[2], uint32_t (&lo)[2]) const {
      const uint4 f = reinterpret_cast<const uint4*>(block + kWqkv)[32 * (tile * kSteps + step) + lane];
      hi[0] = f.x, hi[1] = f.y, lo[0] = f.z, lo[1] = f.w;
    }
    __device__ __forceinline__ void wo(int tile, uint32_t (&hi)[2], uint32_t (&lo)[2]) const {
      const uint4 f = reinterpret_cast<const uint4*>(block + kWo)[32 * tile + lane];
      hi[0] = f.x, hi[1] = f.y, lo[0] = f.z, lo[1] = f.w;
    }
    __device__ __forceinline__ float2 bqkv(int tile) const {
      return reinterpret_cast<const float2*>(block + kBqkv)[32 * tile + lane];
    }
    __device__ __forceinline__ float2 bo(int tile) const {
      return reinterpret_cast<const float2*>(block + kBo)[32 * tile + lane];
    }
  };

  // q|k|v = x Wqkv^T + b for the warp's rows, into `qs`. Each weight fragment is read once per tile.
  template <typename Weights>
  static __device__ __forceinline__ void project_qkv(const Weights& w, const Rows& rows, float* qs, int lane) {
    const int g = lane / 4, t = lane % 4;
    float acc[2][kQkvTiles][4];
#pragma unroll
    for (int tile = 0; tile < kQkvTiles; ++tile) {
      const float2 b = w.bqkv(tile);
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        acc[mt][tile][0] = acc[mt][tile][2] = b.x;
        acc[mt][tile][1] = acc[mt][tile][3] = b.y;
      }
    }
#pragma unroll
    for (int step = 0; step < kSteps; ++step) {
      uint32_t a_hi[2][4], a_lo[2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) FragmentRows<D>::a_split(rows, mt, step, a_hi[mt], a_lo[mt]);
#pragma unroll
      for (int tile = 0; tile < kQkvTiles; ++tile) {
        uint32_t b_hi[2], b_lo[2];
        w.wqkv(tile, step, b_hi, b_lo);
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) mma_3xtf32(acc[mt][tile], a_hi[mt], a_lo[mt], b_hi, b_lo);
      }
    }
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int tile = 0; tile < kQkvTiles; ++tile) {
        const int row = 16 * mt + g, col = 8 * tile + 2 * t;
        *reinterpret_cast<float2*>(qs + swizzled(row, col, kLdQkv)) = float2{acc[mt][tile][0], acc[mt][tile][1]};
        *reinterpret_cast<float2*>(qs + swizzled(row + 8, col, kLdQkv)) = float2{acc[mt][tile][2], acc[mt][tile][3]};
      }
  }

  // rows = z Wo^T + bo (+ rows), z in columns 0..d-1 of the scratch's rows.
  template <bool kResidual, typename Weights>
  static __device__ __forceinline__ void project_out(const Weights& w, const float* zs, int lane, Rows& rows) {
    const int g = lane / 4, t = lane % 4;
    uint32_t a_hi[2][4], a_lo[2][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
      const int r = 16 * mt + g;
      split_tf32(zs[swizzled(r, t, kLdQkv)], a_hi[mt][0], a_lo[mt][0]);
      split_tf32(zs[swizzled(r + 8, t, kLdQkv)], a_hi[mt][1], a_lo[mt][1]);
      split_tf32(zs[swizzled(r, t + 4, kLdQkv)], a_hi[mt][2], a_lo[mt][2]);
      split_tf32(zs[swizzled(r + 8, t + 4, kLdQkv)], a_hi[mt][3], a_lo[mt][3]);
    }
#pragma unroll
    for (int tile = 0; tile < kOutTiles; ++tile) {
      uint32_t b_hi[2], b_lo[2];
      w.wo(tile, b_hi, b_lo);
      const float2 b = w.bo(tile);
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        float(&acc)[4] = rows[mt][tile];  // x, the residual
        acc[0] = kResidual ? acc[0] + b.x : b.x, acc[1] = kResidual ? acc[1] + b.y : b.y;
        acc[2] = kResidual ? acc[2] + b.x : b.x, acc[3] = kResidual ? acc[3] + b.y : b.y;
        mma_3xtf32(acc, a_hi[mt], a_lo[mt], b_hi, b_lo);
      }
    }
  }

  // One block's forward on the warp's rows, in place; `qs`: the warp's [32][kLdQkv] scratch.
  template <typename Weights>
  static __device__ __forceinline__ void block_forward(const Weights& w, float* qs, float scale_log2, bool residual,
                                                       int lane, Rows& rows) {
    project_qkv(w, rows, qs, lane);
    __syncwarp();  // q|k|v are shared
    float qkv[3 * d], z[d];
#pragma unroll
    for (int c = 0; c < 3 * d / 4; ++c) {
      const float4 v = load4(qs + swizzled(lane, 4 * c, kLdQkv));
      qkv[4 * c] = v.x, qkv[4 * c + 1] = v.y, qkv[4 * c + 2] = v.z, qkv[4 * c + 3] = v.w;
    }
    attention_forward_rows<d>(qkv, scale_log2, z);
#pragma unroll
    for (int c = 0; c < d / 4; ++c)  // over this lane's own q|k|v row, which only it reads
      *reinterpret_cast<float4*>(qs + swizzled(lane, 4 * c, kLdQkv)) =
          float4{z[4 * c], z[4 * c + 1], z[4 * c + 2], z[4 * c + 3]};
    __syncwarp();  // z is shared
    if (residual)  // uniform: a branch, not a select per entry
      project_out<true>(w, qs, lane, rows);
    else
      project_out<false>(w, qs, lane, rows);
    __syncwarp();  // z is read before the next block's q|k|v overwrite it
  }
};

// float32, float16 and bfloat16 activations, sm_80 and later (the launcher picks it in place of the
// rows stack forward while the L blocks' fragments fit in shared memory).
template <typename scalar_t, int D, int d>
__global__ void __launch_bounds__(kRowsThreads)
    ultimus_stack_fwd_tc_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y,
                                const float* __restrict__ packed, int L, float scale, int64_t B, bool residual) {
  using F = TensorCoreStackForward<D, d>;
  ULTIMUS_DYNAMIC_SHARED(smem_raw);
  uint32_t* frags = reinterpret_cast<uint32_t*>(smem_raw);
  for_each_packed_block<D, d>(packed, L, [&](int block, auto... w) { F::load(frags + block * F::kBlockWords, w...); });
  __syncthreads();  // the only block-wide barrier: from here each warp works alone
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* qs = reinterpret_cast<float*>(frags + L * F::kBlockWords) + warp * F::kWarpWords;  // q|k|v, then z
  const float scale_log2 = scale * kLog2e;
  for (int64_t row0 = (int64_t(blockIdx.x) * 4 + warp) * 32; row0 < B; row0 += int64_t(gridDim.x) * kRowsThreads) {
    typename F::Rows rows;
    FragmentRows<D>::load(x, row0, B, lane, rows);
    for (int block = 0; block < L; ++block)
      F::block_forward(typename F::Fragments{frags + block * F::kBlockWords, lane}, qs, scale_log2, residual, lane,
                       rows);
    FragmentRows<D>::store(rows, row0, B, lane, y);
  }
}

// ------------------------------------------------------------------------------------------------
// The stack backward on the tensor cores
// ------------------------------------------------------------------------------------------------
// The rows stack backward does, per block and sample, the FMAs of a block's backward plus those of the
// block forwards that recompute its input (six for L = 4), so FMAs bound it (15% of copy bandwidth in
// the model). Here every product runs as tf32 mma.sync in 3xTF32 on rows held as FragmentRows: per
// tile, the blocks in reverse, block l's input recomputed from x through blocks 0..l-1 by the stack
// forward's code (or kept from the previous block's recomputation: every other block), then q|k|v = h Wqkv^T + b and gz = gy Wo, the attention's backward one row per
// thread, the weight gradients of the whole tile by TileParamGrads, and gx = (residual ? gy : 0) +
// g Wqkv (TensorCoreProjections::input_grad) straight into the registers that held gy. Shared memory
// holds every block's weights once, as floats (two copies of Wo), split into tf32 hi and lo as they
// are read: the pre-split fragments of all four uses would not fit beside the tile with two thread
// blocks per SM (an H100's shared memory, L = 4).
template <int D, int d>
struct TensorCoreStackBackward {
  using Forward = TensorCoreStackForward<D, d>;
  using Grads = TileParamGrads<D, d>;
  using Rows = typename Forward::Rows;
  static constexpr int kSteps = Forward::kSteps;
  // One block's weights, in floats; strides chosen so that every fragment read below is conflict-free:
  //   W    [3d][kLdW]  W_m[n] (wq | wk | wv rows)
  //   Wo   [D][d]      Wo[n][j] at swizzled(n, j, d)
  //   WoT  [d][kLdW]   Wo[n][j] at j kLdW + n
  //   bqkv [3d], bo [D]
  static constexpr int kLdW = D + 8, kW = 0, kWo = kW + 3 * d * kLdW, kWoT = kWo + D * d, kBqkv = kWoT + d * kLdW,
                       kBo = kBqkv + 3 * d, kBlockWords = kBo + D;
  static_assert(kBlockWords % 4 == 0 && kWo % 4 == 0 && kWoT % 4 == 0, "16-byte aligned sections");
  static_assert(Forward::kLdQkv == Grads::kLdG, "a warp's g|z rows are the recomputed forwards' q|k|v scratch");
  // Then the tile of TileParamGrads: x (the block's input) and gy rows [128][kLdX], g|z rows [128][kLdG];
  // a warp's g|z rows are also its q|k|v scratch for the recomputed forwards.
  static constexpr size_t smem_bytes(int64_t L) {
    return (size_t(L) * kBlockWords + size_t(kRowsThreads) * (2 * Grads::kLdX + Grads::kLdG)) * sizeof(float);
  }

  static __device__ void load(float* block, const float* wq, const float* wk, const float* wv, const float* wo,
                              const float* bq, const float* bk, const float* bv, const float* bo) {
    for (int e = threadIdx.x; e < kBlockWords; e += blockDim.x) {
      float value = 0.f;  // the padding too
      if (e < kWo) {
        const int m = e / kLdW, n = e % kLdW;
        if (n < D) value = (m < d ? wq : m < 2 * d ? wk : wv)[(m % d) * D + n];
      } else if (e < kWoT) {
        const int n = (e - kWo) / d, j = (e - kWo) % d ^ (n & 4);  // the inverse of swizzled()
        value = wo[n * d + j];
      } else if (e < kBqkv) {
        const int j = (e - kWoT) / kLdW, n = (e - kWoT) % kLdW;
        if (n < D) value = wo[n * d + j];
      } else if (e < kBo) {
        const int m = e - kBqkv;
        const float* bias = m < d ? bq : m < 2 * d ? bk : bv;
        value = bias ? bias[m % d] : 0.f;
      } else {
        value = bo ? bo[e - kBo] : 0.f;
      }
      block[e] = value;
    }
  }

  // A block's weights as the projections read them (see TensorCoreStackForward::Fragments), split as read.
  struct Weights {
    const float* block;
    int g, t;
    static __device__ __forceinline__ void split2(float w0, float w1, uint32_t (&hi)[2], uint32_t (&lo)[2]) {
      split_tf32(w0, hi[0], lo[0]);
      split_tf32(w1, hi[1], lo[1]);
    }
    // q|k|v: B[k][col = m] = W_m[8 step + 2 (k % 4) + k / 4], m = 8 tile + g (the rows' feature order)
    __device__ __forceinline__ void wqkv(int tile, int step, uint32_t (&hi)[2], uint32_t (&lo)[2]) const {
      const float2 w = *reinterpret_cast<const float2*>(block + kW + (8 * tile + g) * kLdW + 8 * step + 2 * t);
      split2(w.x, w.y, hi, lo);
    }
    // y: B[k = j][col = n] = Wo[n][j], n = 8 tile + g
    __device__ __forceinline__ void wo(int tile, uint32_t (&hi)[2], uint32_t (&lo)[2]) const {
      const float* row = block + kWo;
      split2(row[swizzled(8 * tile + g, t, d)], row[swizzled(8 * tile + g, t + 4, d)], hi, lo);
    }
    __device__ __forceinline__ float2 bqkv(int tile) const {
      return *reinterpret_cast<const float2*>(block + kBqkv + 8 * tile + 2 * t);
    }
    __device__ __forceinline__ float2 bo(int tile) const {
      return *reinterpret_cast<const float2*>(block + kBo + 8 * tile + 2 * t);
    }
    // gz = gy Wo: B[k][col = j] = Wo[8 step + 2 (k % 4) + k / 4][j], j = g (gy in the rows' feature order)
    __device__ __forceinline__ void wo_t(int step, uint32_t (&hi)[2], uint32_t (&lo)[2]) const {
      const float2 w = *reinterpret_cast<const float2*>(block + kWoT + g * kLdW + 8 * step + 2 * t);
      split2(w.x, w.y, hi, lo);
    }
    // gx = g Wqkv: B[k = m][col = n] = W_m[n], m = 8 step + t (+ 4), n = 8 tile + g
    __device__ __forceinline__ void w3(int tile, int step, uint32_t (&hi)[2], uint32_t (&lo)[2]) const {
      const float* w = block + kW + (8 * step + t) * kLdW + 8 * tile + g;
      split2(w[0], w[4 * kLdW], hi, lo);
    }
  };

  // gz = gy Wo for the warp's rows, into columns 3d..4d-1 of its g|z rows (swizzled, as q|k|v).
  static __device__ __forceinline__ void project_gz(const Weights& w, const Rows& gy, float* gs, int lane) {
    const int g = lane / 4, t = lane % 4;
    float acc[2][4] = {};
#pragma unroll
    for (int step = 0; step < kSteps; ++step) {
      uint32_t b_hi[2], b_lo[2];
      w.wo_t(step, b_hi, b_lo);
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        uint32_t a_hi[4], a_lo[4];
        FragmentRows<D>::a_split(gy, mt, step, a_hi, a_lo);
        mma_3xtf32(acc[mt], a_hi, a_lo, b_hi, b_lo);
      }
    }
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
      const int row = 16 * mt + g, col = 3 * d + 2 * t;
      *reinterpret_cast<float2*>(gs + swizzled(row, col, Grads::kLdG)) = float2{acc[mt][0], acc[mt][1]};
      *reinterpret_cast<float2*>(gs + swizzled(row + 8, col, Grads::kLdG)) = float2{acc[mt][2], acc[mt][3]};
    }
  }

};

// float32, float16 and bfloat16 activations, sm_80 and later (the launcher picks it in place of the rows
// stack backward while the L blocks' weights and the tile fit in shared memory).
template <typename scalar_t, int D, int d>
__global__ void __launch_bounds__(kRowsThreads)
    ultimus_stack_bwd_tc_kernel(const scalar_t* __restrict__ gy, const scalar_t* __restrict__ x,
                                scalar_t* __restrict__ gx, float* __restrict__ partials,
                                const float* __restrict__ packed, int L, float scale, int64_t B, bool residual) {
  using S = TensorCoreStackBackward<D, d>;
  using F = typename S::Forward;
  using Grads = typename S::Grads;
  ULTIMUS_DYNAMIC_SHARED(smem_raw);
  float* weights = reinterpret_cast<float*>(smem_raw);
  float* xs = weights + L * S::kBlockWords;
  float* gys = xs + kRowsThreads * Grads::kLdX;
  float* gs = gys + kRowsThreads * Grads::kLdX;
  const int64_t np = num_params(D, d);
  for_each_packed_block<D, d>(packed, L,
                              [&](int block, auto... w) { S::load(weights + block * S::kBlockWords, w...); });
  float* my_partials = partials ? partials + int64_t(blockIdx.x) * L * np : nullptr;
  if (my_partials)
    for (int block = 0; block < L; ++block) Grads().template write<false>(my_partials + int64_t(block) * np);
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* warp_xs = xs + 32 * warp * Grads::kLdX;
  float* warp_gys = gys + 32 * warp * Grads::kLdX;
  float* warp_gs = gs + 32 * warp * Grads::kLdG;  // also the recomputed forwards' q|k|v scratch
  const float scale_log2 = scale * kLog2e;
  // Every warp of a thread block walks the same tiles: the weight gradients take block-wide barriers.
  for (int64_t tile0 = int64_t(blockIdx.x) * kRowsThreads; tile0 < B; tile0 += int64_t(gridDim.x) * kRowsThreads) {
    const int64_t row0 = tile0 + 32 * warp;
    const bool live = row0 + lane < B;  // this lane's own row, in the attention's one-row-per-thread part
    typename S::Rows g_rows;  // the gradient flowing back: of the stack's output, then of each block's input
    FragmentRows<D>::load(gy, row0, B, lane, g_rows);
    // The input of the block that goes back next (block - 1), kept from this block's recomputation:
    // every other block needs none (for L = 4, four block forwards per tile instead of six).
    typename S::Rows kept;
    bool have_kept = false;
    for (int block = L - 1; block >= 0; --block) {
      const typename S::Weights w{weights + block * S::kBlockWords, lane / 4, lane % 4};
      {
        typename S::Rows h;  // the block's input, recomputed from x
        if (have_kept) {
          FragmentRows<D>::copy(kept, h);
          have_kept = false;
        } else {
          FragmentRows<D>::load(x, row0, B, lane, h);
          for (int earlier = 0; earlier < block; ++earlier) {
            if (earlier == block - 1) {  // h is block - 1's input
              FragmentRows<D>::copy(h, kept);
              have_kept = true;
            }
            F::block_forward(typename S::Weights{weights + earlier * S::kBlockWords, lane / 4, lane % 4}, warp_gs,
                             scale_log2, residual, lane, h);
          }
        }
        F::project_qkv(w, h, warp_gs, lane);
        if (my_partials) {
          FragmentRows<D>::share(h, warp_xs, Grads::kLdX, lane);
          FragmentRows<D>::share(g_rows, warp_gys, Grads::kLdX, lane);
        }
      }
      S::project_gz(w, g_rows, warp_gs, lane);
      __syncwarp();  // q|k|v|gz are shared
      {
        float qkv[3 * d], gz[d], g[3 * d], z[d];
#pragma unroll
        for (int c = 0; c < d; ++c) {
          const float4 v = load4(warp_gs + swizzled(lane, 4 * c, Grads::kLdG));
          float* dst = c < 3 * d / 4 ? qkv + 4 * c : gz + 4 * c - 3 * d;
          dst[0] = v.x, dst[1] = v.y, dst[2] = v.z, dst[3] = v.w;
        }
        attention_backward_rows<d>(qkv, gz, scale, g, z);
        Grads::share_gz(g, z, live, gs);  // over this lane's own row, which only it reads
      }
      if (my_partials) {
        __syncthreads();  // the tile's rows are shared
        Grads grads;
        grads.accumulate(xs, gys, gs, kRowsThreads);
        grads.template write<true>(my_partials + int64_t(block) * np);
      } else {
        __syncwarp();  // the warp's g rows are shared
      }
      if (block > 0 || gx) TensorCoreProjections<D, d>::input_grad(w, warp_gs, residual, lane, g_rows);
      if (my_partials)
        __syncthreads();  // the tile is read: the next block may overwrite it
      else
        __syncwarp();  // the warp's g rows are read
    }
    if (gx) FragmentRows<D>::store(g_rows, row0, B, lane, gx);
  }
}

// ------------------------------------------------------------------------------------------------
// Launchers
// ------------------------------------------------------------------------------------------------

struct DeviceInfo {
  int sms = 0, smem_optin = 0, major = 0;  // major: the compute capability's
};

// The few runtime calls the launchers make: CUDA's, or the CPU emulation's.
namespace runtime {
#ifdef ULTIMUS_CUDA_EMULATION
struct DeviceGuard {
  explicit DeviceGuard(const at::Device&) {}
};
inline int current_device() { return 0; }
inline DeviceInfo device_info() {
  return {ultimus_emulation::multiprocessors, ultimus_emulation::shared_memory_per_block,
          ultimus_emulation::compute_capability_major};
}
template <typename... P>
void set_max_dynamic_shared(void (*kernel)(P...), size_t smem) {
  ultimus_emulation::max_dynamic_shared[reinterpret_cast<const void*>(kernel)] = smem;
}
template <typename... P>
int occupancy(void (*)(P...), int, size_t) {
  return 1;
}
template <typename... P, typename... A>
void launch(void (*kernel)(P...), int blocks, int threads, size_t smem, A&&... args) {
  ultimus_emulation::launch(kernel, dim3(blocks), dim3(threads), smem, std::forward<A>(args)...);
}
#else
using DeviceGuard = c10::cuda::CUDAGuard;

inline int current_device() {
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  return dev;
}

// Queried once per device: driver calls are not free on the small-B hot path.
inline DeviceInfo device_info() {
  static std::mutex mutex;
  static std::unordered_map<int, DeviceInfo> cache;
  const int dev = current_device();
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(dev);
  if (it == cache.end()) {
    DeviceInfo info;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.sms, cudaDevAttrMultiProcessorCount, dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.major, cudaDevAttrComputeCapabilityMajor, dev));
    it = cache.emplace(dev, info).first;
  }
  return it->second;
}

template <typename... P>
void set_max_dynamic_shared(void (*kernel)(P...), size_t smem) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
}

template <typename... P>
int occupancy(void (*kernel)(P...), int threads, size_t smem) {
  int blocks = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, smem));
  return blocks;
}

template <typename... P, typename... A>
void launch(void (*kernel)(P...), int blocks, int threads, size_t smem, A&&... args) {
  kernel<<<blocks, threads, smem, c10::cuda::getCurrentCUDAStream()>>>(std::forward<A>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
#endif

// How many blocks of `kernel` an SM holds at once (the occupancy API), once per kernel, device and
// launch shape; first it allows the kernel the shared memory asked for past the default 48 KB. That
// allowance only ever grows (per kernel and device): a stack kernel launched for 4 blocks, then 3,
// then 4 again must still be allowed the 4 blocks' shared memory.
template <typename... P>
int blocks_per_sm(void (*kernel)(P...), int threads, size_t smem) {
  static std::mutex mutex;
  static std::map<std::tuple<const void*, int, int, size_t>, int> cache;
  static std::map<std::pair<const void*, int>, size_t> allowed;
  const int dev = current_device();
  const void* id = reinterpret_cast<const void*>(kernel);
  std::lock_guard<std::mutex> lock(mutex);
  size_t& allowance = allowed[{id, dev}];
  if (smem > 48 * 1024 && smem > allowance) {
    set_max_dynamic_shared(kernel, smem);
    allowance = smem;
  }
  auto it = cache.find({id, dev, threads, smem});
  if (it == cache.end())
    it = cache.emplace(std::make_tuple(id, dev, threads, smem), std::max(occupancy(kernel, threads, smem), 1)).first;
  return it->second;
}
}  // namespace runtime

struct LaunchConfig {
  int rows, blocks;
  size_t smem;
};

// A persistent grid: as many blocks as the device holds at once, and no more than there are tiles.
template <typename... P>
LaunchConfig persistent_grid(void (*kernel)(P...), int64_t B, int rows, size_t smem) {
  const int64_t resident = int64_t(runtime::device_info().sms) * runtime::blocks_per_sm(kernel, rows, smem);
  const int64_t tiles = (B + rows - 1) / rows;
  return {rows, int(std::max<int64_t>(1, std::min(tiles, resident))), smem};
}

// The generic kernels' tile: `tiles` x-sized tiles, plus the g|z tile in the backward, and one block's
// parameters beside them: the largest tile (128, 64 or 32 rows) for which all that fits the device's
// shared memory. Where none does (float64 near D = 256, d = 32: 265 KB of parameters alone), the
// parameters stay in device memory and the tile gets the shared memory to itself (128 down to 8 rows);
// the stack kernels read them from there (params_in_shared = false).
struct GenericTile {
  int rows;
  size_t smem;
  bool params_in_shared;
};
inline GenericTile generic_tile(int64_t D, int64_t d, size_t acc_size, int tiles, bool backward) {
  const size_t smem_optin = size_t(runtime::device_info().smem_optin);
  const size_t per_row = size_t(tiles) * (D + 1) + (backward ? size_t(4 * d + 1) : 0);
  for (int rows : {128, 64, 32})
    if ((num_params(D, d) + rows * per_row) * acc_size <= smem_optin)
      return {rows, (num_params(D, d) + rows * per_row) * acc_size, true};
  for (int rows : {128, 64, 32, 16, 8})
    if (rows * per_row * acc_size <= smem_optin) return {rows, rows * per_row * acc_size, false};
  TORCH_CHECK(false, "ultimus: D=", D, ", d=", d, " needs ", 8 * per_row * acc_size,
              " bytes of shared memory, more than this GPU's ", smem_optin);
}

// Whether the rows kernels serve a call: the sizes they are compiled for and float32 math (float64
// runs the generic kernels); the backward ones also need tensor cores with tf32 (sm_80 and later).
// The activations must also be contiguous 16-byte-aligned rows, which `rows_input` makes them (a copy
// only when they are not contiguous) and `aligned16` checks.
inline bool rows_apply(int64_t D, int64_t d, const at::Tensor& x, bool backward = false) {
  return D == kRowsD && d == kRowsAttnDim && x.scalar_type() != at::kDouble &&
         (!backward || runtime::device_info().major >= 8);
}
inline at::Tensor rows_input(const at::Tensor& t, bool rows) { return rows ? t.contiguous() : t; }
inline bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0; }
using RowsL = RowsLayout<kRowsD, kRowsAttnDim>;

// The rows kernels' launches. Each returns false, launching nothing, where the generic kernel must
// serve the call: float64 (these are templates so that no float64 rows kernel is ever instantiated)
// or activations not at 16-byte-aligned addresses.
template <typename scalar_t>
bool fwd_rows(const at::Tensor& x, at::Tensor& y, const AccParams& params, int64_t D, int64_t d, bool residual) {
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {  // on the tensor cores from sm_80
    if (aligned16(x) && runtime::device_info().major >= 8) {
      const auto kernel = ultimus_fwd_bf16_kernel<kRowsD, kRowsAttnDim>;
      const auto cfg = persistent_grid(kernel, x.size(0), kRowsThreads,
                                       Bf16Forward<kRowsD, kRowsAttnDim>::kSmemWords * sizeof(uint32_t));
      runtime::launch(kernel, cfg.blocks, cfg.rows, cfg.smem, x.const_data_ptr<scalar_t>(),
                      y.mutable_data_ptr<scalar_t>(), params.ptrs<float, int>(D, d), x.size(0), residual);
      return true;
    }
  }
  if constexpr (std::is_same_v<at::opmath_type<scalar_t>, float>) {
    if (!aligned16(x)) return false;
    const auto kernel = ultimus_fwd_rows_kernel<scalar_t, kRowsD, kRowsAttnDim>;
    const auto cfg = persistent_grid(kernel, x.size(0), kRowsThreads, RowsL::kSize * sizeof(float));
    runtime::launch(kernel, cfg.blocks, cfg.rows, cfg.smem, x.const_data_ptr<scalar_t>(),
                    y.mutable_data_ptr<scalar_t>(), params.ptrs<float, int>(D, d), x.size(0), residual);
    return true;
  }
  return false;
}

// The rows backward kernels' shared memory: `blocks` RowsLayouts, and the reduction's tile when the
// parameter gradients are asked for (x, gy and g|z rows).
inline size_t rows_bwd_smem(int64_t blocks, bool need_gw) {
  using Grads = TileParamGrads<kRowsD, kRowsAttnDim>;
  const size_t tile = need_gw ? kRowsThreads * (2 * Grads::kLdX + Grads::kLdG) : 0;
  return (size_t(blocks) * RowsL::kSize + tile) * sizeof(float);
}

template <typename scalar_t>
bool bwd_rows(const at::Tensor& gy, const at::Tensor& x, at::Tensor& gx, at::Tensor& partials,
              const AccParams& params, int64_t D, int64_t d, bool residual, bool need_gx, bool need_gw) {
  if (!aligned16(x) || !aligned16(gy)) return false;
  if constexpr (std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>) {
    // the projections on the tensor cores (rows_apply has checked for sm_80)
    const auto kernel = ultimus_bwd_half_kernel<scalar_t, kRowsD, kRowsAttnDim>;
    const auto cfg = persistent_grid(kernel, x.size(0), kRowsThreads,
                                     TensorCoreProjections<kRowsD, kRowsAttnDim>::kSmemWords * sizeof(uint32_t));
    if (need_gw) partials = at::empty({cfg.blocks, num_params(D, d)}, x.options().dtype(at::kFloat));
    runtime::launch(kernel, cfg.blocks, cfg.rows, cfg.smem, gy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                    need_gx ? gx.mutable_data_ptr<scalar_t>() : nullptr,
                    need_gw ? partials.mutable_data_ptr<float>() : nullptr, params.ptrs<float, int>(D, d), x.size(0),
                    residual);
    return true;
  } else if constexpr (std::is_same_v<scalar_t, float>) {
    const auto kernel = ultimus_bwd_rows_kernel<scalar_t, kRowsD, kRowsAttnDim>;
    const auto cfg = persistent_grid(kernel, x.size(0), kRowsThreads, rows_bwd_smem(1, need_gw));
    if (need_gw) partials = at::empty({cfg.blocks, num_params(D, d)}, x.options().dtype(at::kFloat));
    runtime::launch(kernel, cfg.blocks, cfg.rows, cfg.smem, gy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                    need_gx ? gx.mutable_data_ptr<scalar_t>() : nullptr,
                    need_gw ? partials.mutable_data_ptr<float>() : nullptr, params.ptrs<float, int>(D, d), x.size(0),
                    residual);
    return true;
  }
  return false;
}

template <typename scalar_t>
bool stack_fwd_rows(const at::Tensor& x, at::Tensor& y, const at::Tensor& packed, int64_t L, bool residual) {
  if constexpr (std::is_same_v<at::opmath_type<scalar_t>, float>) {
    if (!aligned16(x)) return false;
    using F = TensorCoreStackForward<kRowsD, kRowsAttnDim>;
    const DeviceInfo device = runtime::device_info();
    if (device.major >= 8 && F::smem_bytes(L) <= size_t(device.smem_optin)) {  // on the tensor cores
      const auto kernel = ultimus_stack_fwd_tc_kernel<scalar_t, kRowsD, kRowsAttnDim>;
      const auto cfg = persistent_grid(kernel, x.size(0), kRowsThreads, F::smem_bytes(L));
      runtime::launch(kernel, cfg.blocks, cfg.rows, cfg.smem, x.const_data_ptr<scalar_t>(),
                      y.mutable_data_ptr<scalar_t>(), packed.const_data_ptr<float>(), int(L),
                      float(1.0 / std::sqrt(double(kRowsAttnDim))), x.size(0), residual);
      return true;
    }
    const auto kernel = ultimus_stack_fwd_rows_kernel<scalar_t, kRowsD, kRowsAttnDim>;
    const auto cfg = persistent_grid(kernel, x.size(0), kRowsThreads, size_t(L) * RowsL::kSize * sizeof(float));
    runtime::launch(kernel, cfg.blocks, cfg.rows, cfg.smem, x.const_data_ptr<scalar_t>(),
                    y.mutable_data_ptr<scalar_t>(), packed.const_data_ptr<float>(), int(L),
                    float(1.0 / std::sqrt(double(kRowsAttnDim))), x.size(0), residual);
    return true;
  }
  return false;
}

// A stack's parameters as the kernels read them: (L, np) in the accumulation dtype, each row in the
// partial-row layout, zeros for absent biases (a single block's may be absent one by one). One cat.
at::Tensor pack_stack(const std::vector<AccParams>& blocks, int64_t D, int64_t d, const at::Tensor& x) {
  std::vector<at::Tensor> pieces;
  at::Tensor zeros;  // one allocation per call, sliced for every absent bias
  for (const auto& b : blocks) {
    for (const at::Tensor* w : {&b.wq, &b.wk, &b.wv, &b.wo}) pieces.push_back(w->reshape(-1));
    const std::pair<const at::Tensor*, int64_t> biases[] = {{&b.bq, d}, {&b.bk, d}, {&b.bv, d}, {&b.bo, D}};
    for (const auto& [bias, length] : biases) {
      if (!bias->defined() && !zeros.defined()) zeros = at::zeros({std::max(D, d)}, x.options().dtype(acc_type(x)));
      pieces.push_back(bias->defined() ? *bias : zeros.narrow(0, 0, length));
    }
  }
  return at::cat(pieces);
}

// The generic stack kernels' launches (the single-block launchers use them, with L = 1, where a block's
// parameters do not fit in shared memory beside the tiles).
template <typename scalar_t, typename acc_t>
void stack_fwd_generic(const at::Tensor& x, at::Tensor& y, const at::Tensor& packed, int64_t L, int64_t D, int64_t d,
                       bool residual, const GenericTile& tile) {
  const acc_t scale = acc_t(1.0 / std::sqrt(double(d)));
  ULTIMUS_ATTN_DIM_SWITCH(d, MAXA, [&] {
    const auto kernel = ultimus_stack_fwd_kernel<scalar_t, acc_t, MAXA>;
    const auto cfg = persistent_grid(kernel, x.size(0), tile.rows, tile.smem);
    runtime::launch(kernel, cfg.blocks, cfg.rows, cfg.smem, x.const_data_ptr<scalar_t>(), x.stride(0), x.stride(1),
                    y.mutable_data_ptr<scalar_t>(), packed.const_data_ptr<acc_t>(), int(L), int(D), int(d), scale,
                    x.size(0), residual, tile.params_in_shared);
  });
}

template <typename scalar_t, typename acc_t>
void stack_bwd_generic(const at::Tensor& gy, const at::Tensor& x, at::Tensor& gx, at::Tensor& partials,
                       const at::Tensor& packed, int64_t L, int64_t D, int64_t d, bool residual, bool need_gx,
                       bool need_gw, const GenericTile& tile) {
  const acc_t scale = acc_t(1.0 / std::sqrt(double(d)));
  ULTIMUS_ATTN_DIM_SWITCH(d, MAXA, [&] {
    const auto kernel = ultimus_stack_bwd_kernel<scalar_t, acc_t, MAXA>;
    const auto cfg = persistent_grid(kernel, x.size(0), tile.rows, tile.smem);
    if (need_gw) partials = at::empty({cfg.blocks, L * num_params(D, d)}, x.options().dtype(acc_type(x)));
    runtime::launch(kernel, cfg.blocks, cfg.rows, cfg.smem, gy.const_data_ptr<scalar_t>(), gy.stride(0), gy.stride(1),
                    x.const_data_ptr<scalar_t>(), x.stride(0), x.stride(1),
                    need_gx ? gx.mutable_data_ptr<scalar_t>() : nullptr,
                    need_gw ? partials.mutable_data_ptr<acc_t>() : nullptr, packed.const_data_ptr<acc_t>(), int(L),
                    int(D), int(d), scale, x.size(0), residual, tile.params_in_shared);
  });
}

at::Tensor ultimus_fwd_cuda(const at::Tensor& x_in, const at::Tensor& wq, const OptTensor& bq, const at::Tensor& wk,
                            const OptTensor& bk, const at::Tensor& wv, const OptTensor& bv, const at::Tensor& wo,
                            const OptTensor& bo, bool residual) {
  const auto [D, d] = check_inputs("cuda", x_in, wq, bq, wk, bk, wv, bv, wo, bo);
  const int64_t B = x_in.size(0);
  const runtime::DeviceGuard guard(x_in.device());
  at::Tensor y = at::empty({B, D}, x_in.options());
  if (B == 0) return y;
  const AccParams params(x_in, wq, bq, wk, bk, wv, bv, wo, bo);
  const bool rows = rows_apply(D, d, x_in);
  const at::Tensor x = rows_input(x_in, rows);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ultimus_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (rows && fwd_rows<scalar_t>(x, y, params, D, d, residual)) return;
    const GenericTile tile = generic_tile(D, d, sizeof(acc_t), 1, false);
    if (!tile.params_in_shared)
      return stack_fwd_generic<scalar_t, acc_t>(x, y, pack_stack({params}, D, d, x), 1, D, d, residual, tile);
    ULTIMUS_ATTN_DIM_SWITCH(d, MAXA, [&] {
      const auto kernel = ultimus_fwd_kernel<scalar_t, acc_t, MAXA>;
      const auto cfg = persistent_grid(kernel, B, tile.rows, tile.smem);
      runtime::launch(kernel, cfg.blocks, cfg.rows, cfg.smem, x.const_data_ptr<scalar_t>(), x.stride(0), x.stride(1),
                      y.mutable_data_ptr<scalar_t>(), params.ptrs<acc_t, int>(D, d), B, residual);
    });
  });
  return y;
}

BackwardResult ultimus_bwd_cuda(const at::Tensor& gy, const at::Tensor& x_in, const at::Tensor& wq,
                                const OptTensor& bq, const at::Tensor& wk, const OptTensor& bk, const at::Tensor& wv,
                                const OptTensor& bv, const at::Tensor& wo, const OptTensor& bo, bool residual,
                                bool need_gx, bool need_gw) {
  const auto [D, d] = check_inputs("cuda", x_in, wq, bq, wk, bk, wv, bv, wo, bo);
  const int64_t B = x_in.size(0);
  check_grad_output(gy, x_in);
  const runtime::DeviceGuard guard(x_in.device());
  const auto acc = acc_type(x_in);
  at::Tensor gx = at::empty(need_gx ? std::vector<int64_t>{B, D} : std::vector<int64_t>{0}, x_in.options());
  at::Tensor partials = at::empty({0, num_params(D, d)}, x_in.options().dtype(acc));
  if (B > 0 && (need_gx || need_gw)) {
    const bool rows = rows_apply(D, d, x_in, /*backward=*/true);
    const at::Tensor x = rows_input(x_in, rows), gy_c = rows_input(gy.to(x.scalar_type()), rows);
    const AccParams params(x, wq, bq, wk, bk, wv, bv, wo, bo);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ultimus_bwd_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      if (rows && bwd_rows<scalar_t>(gy_c, x, gx, partials, params, D, d, residual, need_gx, need_gw)) return;
      const GenericTile tile = generic_tile(D, d, sizeof(acc_t), 2, true);
      if (!tile.params_in_shared) {  // the stack kernel's tiles: x, the block input (x again) and gy
        const GenericTile stack_tile = generic_tile(D, d, sizeof(acc_t), 3, true);
        return stack_bwd_generic<scalar_t, acc_t>(gy_c, x, gx, partials, pack_stack({params}, D, d, x), 1, D, d,
                                                  residual, need_gx, need_gw, stack_tile);
      }
      ULTIMUS_ATTN_DIM_SWITCH(d, MAXA, [&] {
        const auto kernel = ultimus_bwd_kernel<scalar_t, acc_t, MAXA>;
        const auto cfg = persistent_grid(kernel, B, tile.rows, tile.smem);
        if (need_gw) partials = at::empty({cfg.blocks, num_params(D, d)}, x.options().dtype(acc));
        runtime::launch(kernel, cfg.blocks, cfg.rows, cfg.smem, gy_c.const_data_ptr<scalar_t>(), gy_c.stride(0),
                        gy_c.stride(1), x.const_data_ptr<scalar_t>(), x.stride(0), x.stride(1),
                        need_gx ? gx.mutable_data_ptr<scalar_t>() : nullptr,
                        need_gw ? partials.mutable_data_ptr<acc_t>() : nullptr, params.ptrs<acc_t, int>(D, d), B,
                        residual);
      });
    });
  }
  return backward_result(gx, partials, need_gw);
}

template <typename scalar_t>
bool stack_bwd_rows(const at::Tensor& gy, const at::Tensor& x, at::Tensor& gx, at::Tensor& partials,
                    const at::Tensor& packed, int64_t L, bool residual, bool need_gx, bool need_gw) {
  if constexpr (std::is_same_v<at::opmath_type<scalar_t>, float>) {
    if (!aligned16(x) || !aligned16(gy)) return false;
    using S = TensorCoreStackBackward<kRowsD, kRowsAttnDim>;
    if (S::smem_bytes(L) <= size_t(runtime::device_info().smem_optin)) {  // on the tensor cores (rows_apply: sm_80)
      const auto kernel = ultimus_stack_bwd_tc_kernel<scalar_t, kRowsD, kRowsAttnDim>;
      const auto cfg = persistent_grid(kernel, x.size(0), kRowsThreads, S::smem_bytes(L));
      if (need_gw)
        partials = at::empty({cfg.blocks, L * num_params(kRowsD, kRowsAttnDim)}, x.options().dtype(at::kFloat));
      runtime::launch(kernel, cfg.blocks, cfg.rows, cfg.smem, gy.const_data_ptr<scalar_t>(),
                      x.const_data_ptr<scalar_t>(), need_gx ? gx.mutable_data_ptr<scalar_t>() : nullptr,
                      need_gw ? partials.mutable_data_ptr<float>() : nullptr, packed.const_data_ptr<float>(), int(L),
                      float(1.0 / std::sqrt(double(kRowsAttnDim))), x.size(0), residual);
      return true;
    }
    const auto kernel = ultimus_stack_bwd_rows_kernel<scalar_t, kRowsD, kRowsAttnDim>;
    const auto cfg = persistent_grid(kernel, x.size(0), kRowsThreads, rows_bwd_smem(L, need_gw));
    if (need_gw)
      partials = at::empty({cfg.blocks, L * num_params(kRowsD, kRowsAttnDim)}, x.options().dtype(at::kFloat));
    runtime::launch(kernel, cfg.blocks, cfg.rows, cfg.smem, gy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                    need_gx ? gx.mutable_data_ptr<scalar_t>() : nullptr,
                    need_gw ? partials.mutable_data_ptr<float>() : nullptr, packed.const_data_ptr<float>(), int(L),
                    float(1.0 / std::sqrt(double(kRowsAttnDim))), x.size(0), residual);
    return true;
  }
  return false;
}

at::Tensor ultimus_stack_fwd_cuda(const at::Tensor& x_in, at::TensorList params, bool bias, bool residual) {
  const auto [L, D, d] = check_stack_inputs("cuda", x_in, params, bias);
  const int64_t B = x_in.size(0);
  const runtime::DeviceGuard guard(x_in.device());
  at::Tensor y = at::empty({B, D}, x_in.options());
  if (B == 0) return y;
  const at::Tensor packed = pack_stack(stack_acc_params(x_in, params, bias), D, d, x_in);
  // The rows kernel holds every block's parameters in shared memory at once; past that, the generic one.
  const size_t rows_smem = size_t(L) * RowsL::kSize * sizeof(float);
  const bool rows = rows_apply(D, d, x_in) && rows_smem <= size_t(runtime::device_info().smem_optin);
  const at::Tensor x = rows_input(x_in, rows);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ultimus_stack_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (rows && stack_fwd_rows<scalar_t>(x, y, packed, L, residual)) return;
    stack_fwd_generic<scalar_t, acc_t>(x, y, packed, L, D, d, residual, generic_tile(D, d, sizeof(acc_t), 1, false));
  });
  return y;
}

BackwardResult ultimus_stack_bwd_cuda(const at::Tensor& gy, const at::Tensor& x_in, at::TensorList params, bool bias,
                                      bool residual, bool need_gx, bool need_gw) {
  const auto [L, D, d] = check_stack_inputs("cuda", x_in, params, bias);
  check_grad_output(gy, x_in);
  const int64_t B = x_in.size(0);
  const runtime::DeviceGuard guard(x_in.device());
  const auto acc = acc_type(x_in);
  at::Tensor gx = at::empty(need_gx ? std::vector<int64_t>{B, D} : std::vector<int64_t>{0}, x_in.options());
  at::Tensor partials = at::empty({0, L * num_params(D, d)}, x_in.options().dtype(acc));
  if (B > 0 && (need_gx || need_gw)) {
    const at::Tensor packed = pack_stack(stack_acc_params(x_in, params, bias), D, d, x_in);
    // As the forward: the rows kernel while every block's parameters fit in shared memory.
    const bool rows = rows_apply(D, d, x_in, /*backward=*/true) &&
                      rows_bwd_smem(L, need_gw) <= size_t(runtime::device_info().smem_optin);
    const at::Tensor x = rows_input(x_in, rows), gy_c = rows_input(gy.to(x.scalar_type()), rows);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ultimus_stack_bwd_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      if (rows && stack_bwd_rows<scalar_t>(gy_c, x, gx, partials, packed, L, residual, need_gx, need_gw)) return;
      stack_bwd_generic<scalar_t, acc_t>(gy_c, x, gx, partials, packed, L, D, d, residual, need_gx, need_gw,
                                         generic_tile(D, d, sizeof(acc_t), 3, true));
    });
  }
  return backward_result(gx, partials, need_gw);
}

}  // namespace
}  // namespace ultimus
