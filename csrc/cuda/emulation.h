// A CPU emulation of the small part of CUDA that the Ultimus kernels use, so that the very same
// kernel source runs, and is tested, on machines without a GPU (tests/test_cuda_emulation.py builds
// csrc/cuda/emulation.cpp with ULTIMUS_CUDA_EMULATION defined). It checks what a kernel computes,
// not how fast: each thread block runs as blockDim.x std::threads, blocks one after another;
// __syncthreads() is a std::barrier; dynamic shared memory is one buffer per block, filled with NaN
// bytes before the block starts so that a read of a value nobody wrote shows up in the results.
// Warp-wide instructions (mma.sync) exchange the 32 lanes' registers through a per-warp barrier, and
// apply the hardware's rules: the fragment layouts of the PTX ISA, tf32 operands read as their top
// 19 bits. What it cannot show: data races between threads that a barrier does not order on the GPU
// either look right here only by luck of scheduling, so keep every cross-thread exchange behind a
// barrier.
#pragma once

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};

namespace ultimus_emulation {

inline thread_local dim3 thread_index, block_index;
inline dim3 block_dim, grid_dim;
inline std::barrier<>* block_barrier = nullptr;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;  // one per warp of the running block
struct WarpRegisters {
  float a[32][4], b[32][2];
};
inline std::vector<WarpRegisters> warp_registers;
inline unsigned char* shared_memory = nullptr;
// Each kernel's cudaFuncAttributeMaxDynamicSharedMemorySize: a launch asking for more than 48 KB of
// dynamic shared memory beyond it fails, as on a GPU.
inline std::map<const void*, size_t> max_dynamic_shared;
// The kernel of the last launch (tests check which kernel a launcher chose) and the launch count.
inline const void* last_kernel = nullptr;
inline int64_t launches = 0;
// The device the launchers see: an H100's shared memory, but few SMs, so that a persistent grid
// walks several tiles per block even at the small batches a test can afford.
inline int multiprocessors = 2;
inline int shared_memory_per_block = 227 * 1024;
inline int compute_capability_major = 9;

// Runs kernel(args...) on a grid of thread blocks, one block at a time.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, Args&&... args) {
  last_kernel = reinterpret_cast<const void*>(kernel);
  ++launches;
  const size_t allowed = std::max<size_t>(48 * 1024, max_dynamic_shared[last_kernel]);
  if (shared_bytes > allowed)
    throw std::runtime_error("launch asks for " + std::to_string(shared_bytes) +
                             " bytes of dynamic shared memory; the kernel is allowed " + std::to_string(allowed) +
                             " (cudaFuncSetAttribute): on a GPU, an invalid-argument launch failure");
  const unsigned threads = block.x * block.y * block.z;
  std::vector<float4> shared((shared_bytes + sizeof(float4) - 1) / sizeof(float4) + 1);
  block_dim = block;
  grid_dim = grid;
  shared_memory = reinterpret_cast<unsigned char*>(shared.data());
  for (unsigned bx = 0; bx < grid.x; ++bx) {
    std::memset(shared.data(), 0xff, shared.size() * sizeof(float4));  // NaN until written
    std::barrier<> barrier(threads);
    block_barrier = &barrier;
    warp_barriers.clear();
    for (unsigned w = 0; w < (threads + 31) / 32; ++w)
      warp_barriers.push_back(std::make_unique<std::barrier<>>(std::min(32u, threads - 32 * w)));
    warp_registers.assign((threads + 31) / 32, WarpRegisters{});
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (unsigned tx = 0; tx < threads; ++tx)
      pool.emplace_back([&, tx, bx] {
        thread_index = dim3(tx);
        block_index = dim3(bx);
        kernel(args...);
        barrier.arrive_and_drop();  // an exited thread no longer holds up __syncthreads
        warp_barriers[tx / 32]->arrive_and_drop();
      });
    for (auto& t : pool) t.join();
  }
  block_barrier = nullptr;
  shared_memory = nullptr;
}

}  // namespace ultimus_emulation

#define threadIdx (::ultimus_emulation::thread_index)
#define blockIdx (::ultimus_emulation::block_index)
#define blockDim (::ultimus_emulation::block_dim)
#define gridDim (::ultimus_emulation::grid_dim)
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define ULTIMUS_DYNAMIC_SHARED(name) unsigned char* name = ::ultimus_emulation::shared_memory

inline void __syncthreads() { ::ultimus_emulation::block_barrier->arrive_and_wait(); }
inline void __syncwarp() { ::ultimus_emulation::warp_barriers[threadIdx.x / 32]->arrive_and_wait(); }
inline float __fdividef(float a, float b) { return a / b; }
using std::exp;
using std::exp2;
using std::fma;

inline float __uint_as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 with C = D: d += A B for the warp's 16 x 8 tile.
// Lane l = 4 g + t holds A[g + 8 (i % 2)][t + 4 (i / 2)] in a[i], B[t + 4 i][g] in b[i] and
// D[g + 8 (i / 2)][2 t + i % 2] in d[i]; the tensor core reads only the tf32 bits of a and b.
inline void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  using namespace ultimus_emulation;
  const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
  WarpRegisters& regs = warp_registers[warp];
  for (int i = 0; i < 4; ++i) regs.a[lane][i] = __uint_as_float(a[i] & 0xffffe000u);
  for (int i = 0; i < 2; ++i) regs.b[lane][i] = __uint_as_float(b[i] & 0xffffe000u);
  warp_barriers[warp]->arrive_and_wait();  // every lane's fragments are in
  float out[4];
  for (int i = 0; i < 4; ++i) {
    const unsigned row = g + 8 * (i / 2), col = 2 * t + i % 2;
    float acc = d[i];
    for (unsigned k = 0; k < 8; ++k)
      acc += regs.a[(row % 8) * 4 + k % 4][(row >= 8) + 2 * (k >= 4)] * regs.b[col * 4 + k % 4][k >= 4];
    out[i] = acc;
  }
  warp_barriers[warp]->arrive_and_wait();  // every lane has read them before any lane's next mma
  for (int i = 0; i < 4; ++i) d[i] = out[i];
}

// mma.sync.aligned.m16n8k{16,8}.row.col.f32.bf16.bf16.f32 with C = D: d += A B, A 16 x K, B K x 8, K = 2 KW.
// Each 32-bit register holds two bf16 of consecutive k (the lower half the even k). Lane l = 4 g + t
// holds A[g + 8 (i % 2)][2 (t + 4 (i / 2)) + 0..1] in a[i], B[2 (t + 4 i) + 0..1][g] in b[i], and D as
// in mma_m16n8k8_tf32.
template <int KW>
inline void mma_bf16(float (&d)[4], const uint32_t* a, const uint32_t* b) {
  using namespace ultimus_emulation;
  constexpr int kA = KW / 2, kB = KW / 4;  // registers per lane: A 16 x 2KW / 32, B 2KW x 8 / 32 (as pairs)
  const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
  WarpRegisters& regs = warp_registers[warp];
  auto bf16 = [](uint32_t word, int half) { return __uint_as_float((half ? word >> 16 : word & 0xffffu) << 16); };
  for (int i = 0; i < kA; ++i) regs.a[lane][i] = __uint_as_float(a[i]);  // raw bits, unpacked below
  for (int i = 0; i < kB; ++i) regs.b[lane][i] = __uint_as_float(b[i]);
  warp_barriers[warp]->arrive_and_wait();
  auto word = [](float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
  };
  float out[4];
  for (int i = 0; i < 4; ++i) {
    const unsigned row = g + 8 * (i / 2), col = 2 * t + i % 2;
    float acc = d[i];
    for (unsigned k = 0; k < 2 * KW; ++k) {
      const unsigned kw = k / 2;  // the pair of k
      const float a_val = bf16(word(regs.a[(row % 8) * 4 + kw % 4][(row >= 8) + 2 * (kw / 4)]), k % 2);
      const float b_val = bf16(word(regs.b[col * 4 + kw % 4][kw / 4]), k % 2);
      acc += a_val * b_val;
    }
    out[i] = acc;
  }
  warp_barriers[warp]->arrive_and_wait();
  for (int i = 0; i < 4; ++i) d[i] = out[i];
}
inline void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) { mma_bf16<8>(d, a, b); }
inline void mma_m16n8k8_bf16(float (&d)[4], const uint32_t (&a)[2], uint32_t b) { mma_bf16<4>(d, a, &b); }
