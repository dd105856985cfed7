// The CUDA kernels and launchers of ultimus_cuda.cuh, compiled for the CPU emulation of emulation.h:
// a test-only Python module (tests/test_cuda_emulation.py builds it) whose functions take CPU tensors
// and run exactly the code that the CUDA extension runs on a GPU, one emulated thread per CUDA thread.
#define ULTIMUS_CUDA_EMULATION
#include <torch/extension.h>

#include <string>
#include <type_traits>
#include <vector>

#include "ultimus_cuda.cuh"

namespace {

// The rows kernels (D and d at compile time) of one activation dtype (the single-block backward only
// for float32: half-precision rows go backward on the tensor cores).
template <typename scalar_t>
std::vector<const void*> rows_kernels() {
  using namespace ultimus;
  std::vector<const void*> kernels = {
      reinterpret_cast<const void*>(ultimus_fwd_rows_kernel<scalar_t, kRowsD, kRowsAttnDim>),
      reinterpret_cast<const void*>(ultimus_stack_fwd_rows_kernel<scalar_t, kRowsD, kRowsAttnDim>),
      reinterpret_cast<const void*>(ultimus_stack_bwd_rows_kernel<scalar_t, kRowsD, kRowsAttnDim>)};
  if constexpr (std::is_same_v<scalar_t, float>)
    kernels.push_back(reinterpret_cast<const void*>(ultimus_bwd_rows_kernel<float, kRowsD, kRowsAttnDim>));
  return kernels;
}

// The stack kernels on the tensor cores, forward and backward, of one activation dtype.
template <typename scalar_t>
std::vector<const void*> stack_tc_kernels() {
  using namespace ultimus;
  return {reinterpret_cast<const void*>(ultimus_stack_fwd_tc_kernel<scalar_t, kRowsD, kRowsAttnDim>),
          reinterpret_cast<const void*>(ultimus_stack_bwd_tc_kernel<scalar_t, kRowsD, kRowsAttnDim>)};
}

// Which kernel the last launch ran: "rows", "bf16 tensor cores" (the bf16 forward), "tf32 tensor cores"
// (the half-precision backward and the stack kernels), "generic", or "none" before any launch.
std::string last_kernel_family() {
  if (ultimus_emulation::last_kernel == nullptr) return "none";
  for (const auto& family : {rows_kernels<float>(), rows_kernels<at::Half>(), rows_kernels<at::BFloat16>()})
    for (const void* kernel : family)
      if (kernel == ultimus_emulation::last_kernel) return "rows";
  if (ultimus_emulation::last_kernel ==
      reinterpret_cast<const void*>(ultimus::ultimus_fwd_bf16_kernel<ultimus::kRowsD, ultimus::kRowsAttnDim>))
    return "bf16 tensor cores";
  using ultimus::kRowsAttnDim, ultimus::kRowsD, ultimus::ultimus_bwd_half_kernel;
  const void* half_bwd = reinterpret_cast<const void*>(ultimus_bwd_half_kernel<at::Half, kRowsD, kRowsAttnDim>);
  const void* bf16_bwd = reinterpret_cast<const void*>(ultimus_bwd_half_kernel<at::BFloat16, kRowsD, kRowsAttnDim>);
  if (ultimus_emulation::last_kernel == half_bwd || ultimus_emulation::last_kernel == bf16_bwd)
    return "tf32 tensor cores";
  for (const auto& family : {stack_tc_kernels<float>(), stack_tc_kernels<at::Half>(), stack_tc_kernels<at::BFloat16>()})
    for (const void* kernel : family)
      if (kernel == ultimus_emulation::last_kernel) return "tf32 tensor cores";
  return "generic";
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "The Ultimus CUDA kernels run by a CPU emulation of CUDA (for tests on machines without a GPU)";
  m.def("fwd", &ultimus::ultimus_fwd_cuda, "the cuda fwd op's kernel, on CPU tensors");
  m.def("bwd", &ultimus::ultimus_bwd_cuda, "the cuda bwd op's kernel, on CPU tensors");
  m.def(
      "stack_fwd",
      [](const at::Tensor& x, const std::vector<at::Tensor>& params, bool bias, bool residual) {
        return ultimus::ultimus_stack_fwd_cuda(x, params, bias, residual);
      },
      "the cuda stack_fwd op's kernel, on CPU tensors");
  m.def(
      "stack_bwd",
      [](const at::Tensor& gy, const at::Tensor& x, const std::vector<at::Tensor>& params, bool bias, bool residual,
         bool need_gx, bool need_gw) {
        return ultimus::ultimus_stack_bwd_cuda(gy, x, params, bias, residual, need_gx, need_gw);
      },
      "the cuda stack_bwd op's kernel, on CPU tensors");
  m.def("last_kernel", &last_kernel_family, "the family of the last kernel launched (see last_kernel_family)");
  m.def("launches", [] { return ultimus_emulation::launches; }, "kernel launches so far");
  m.def(
      "set_multiprocessors", [](int n) { ultimus_emulation::multiprocessors = n; },
      "the emulated device's SM count (the persistent grids' size)");
  m.def(
      "set_shared_memory_per_block", [](int bytes) { ultimus_emulation::shared_memory_per_block = bytes; },
      "the emulated device's shared memory per block (which stacks fit the rows kernels)");
  m.def(
      "set_compute_capability_major", [](int major) { ultimus_emulation::compute_capability_major = major; },
      "the emulated device's compute capability (the rows backward kernels need 8, for tf32 tensor cores)");
}
