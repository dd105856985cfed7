// Shared by the CPU and CUDA implementations of the Ultimus block: sizes, input checks and the
// bookkeeping of the parameter-gradient partials. The math itself is stated in ultimus_cpu.cpp.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <array>
#include <tuple>
#include <cstdint>
#include <vector>

namespace ultimus {

// The fused kernels hold one sample's state on chip; the Python API promises the same limits.
constexpr int64_t kMaxDim = 256;
constexpr int64_t kMaxAttnDim = 32;

using OptTensor = std::optional<at::Tensor>;

inline void check_param(const at::Tensor& t, const char* name, at::IntArrayRef shape, const at::Tensor& x) {
  TORCH_CHECK_TYPE(t.is_floating_point(), "ultimus: ", name, " must be a floating-point tensor, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == shape, "ultimus: ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == x.device(), "ultimus: all tensors must be on one device: x is on ", x.device(),
                    ", ", name, " on ", t.device());
}

// Returns {D, d}. Mirrors ultimus_kernels/checks.py so that direct op calls fail just as clearly.
inline std::array<int64_t, 2> check_inputs(const at::Tensor& x, const at::Tensor& wq, const OptTensor& bq,
                                           const at::Tensor& wk, const OptTensor& bk, const at::Tensor& wv,
                                           const OptTensor& bv, const at::Tensor& wo, const OptTensor& bo) {
  TORCH_CHECK_TYPE(x.is_floating_point(), "ultimus: x must be a floating-point tensor, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 2, "ultimus: x must be 2-D (B, D), got shape ", x.sizes());
  TORCH_CHECK_VALUE(wq.dim() == 2, "ultimus: wq must be 2-D (d, D), got shape ", wq.sizes());
  const int64_t D = x.size(1), d = wq.size(0);
  TORCH_CHECK_VALUE(D >= 1 && d >= 1, "ultimus: D and d must be at least 1, got D=", D, ", d=", d);
  TORCH_CHECK_VALUE(D <= kMaxDim, "ultimus: the fused kernels support D <= ", kMaxDim, ", got D=", D);
  TORCH_CHECK_VALUE(d <= kMaxAttnDim, "ultimus: the fused kernels support d <= ", kMaxAttnDim, ", got d=", d);
  check_param(wq, "wq", {d, D}, x);
  check_param(wk, "wk", {d, D}, x);
  check_param(wv, "wv", {d, D}, x);
  check_param(wo, "wo", {D, d}, x);
  if (bq) check_param(*bq, "bq", {d}, x);
  if (bk) check_param(*bk, "bk", {d}, x);
  if (bv) check_param(*bv, "bv", {d}, x);
  if (bo) check_param(*bo, "bo", {D}, x);
  return {D, d};
}

// The accumulation dtype: float64 for float64 x, float32 for everything else (half inputs included).
inline at::ScalarType acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Parameters as contiguous tensors of the accumulation dtype (no copy in the common fp32 case).
inline at::Tensor as_acc(const at::Tensor& t, at::ScalarType acc) { return t.to(acc).contiguous(); }
inline at::Tensor as_acc(const OptTensor& t, at::ScalarType acc) {
  return t ? as_acc(*t, acc) : at::Tensor();
}

// Parameter-gradient partials are rows of `num_params(D, d)` numbers, laid out as
// [gWq (d*D) | gWk (d*D) | gWv (d*D) | gWo (D*d) | gbq (d) | gbk (d) | gbv (d) | gbo (D)].
C10_HOST_DEVICE inline int64_t num_params(int64_t D, int64_t d) { return 4 * d * D + 3 * d + D; }

// Sums the partial rows in a fixed order (deterministic) and cuts the sum into the eight gradients,
// each its own tensor (custom-op outputs must not alias one another).
inline std::vector<at::Tensor> reduce_partials(const at::Tensor& partials, int64_t D, int64_t d) {
  const std::array<std::vector<int64_t>, 8> shapes = {{{d, D}, {d}, {d, D}, {d}, {d, D}, {d}, {D, d}, {D}}};
  // Offsets of wq, bq, wk, bk, wv, bv, wo, bo in a partial row.
  const std::array<int64_t, 8> offsets = {0, 4 * d * D, d * D, 4 * d * D + d, 2 * d * D, 4 * d * D + 2 * d,
                                          3 * d * D, 4 * d * D + 3 * d};
  std::vector<at::Tensor> out;
  for (size_t s = 0; s < shapes.size(); ++s) {
    int64_t n = 1;
    for (int64_t e : shapes[s]) n *= e;
    out.push_back(partials.narrow(1, offsets[s], n).sum(0).view(shapes[s]));
  }
  return out;
}

// What the bwd op returns: gx and the eight parameter gradients.
using BackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                  at::Tensor, at::Tensor>;

// The parameter gradients from the partial rows, or empty tensors when they were not asked for.
inline BackwardResult backward_result(const at::Tensor& gx, const at::Tensor& partials, int64_t D, int64_t d,
                                      bool need_gw) {
  if (!need_gw) {
    auto e = [&] { return at::empty({0}, partials.options()); };
    return {gx, e(), e(), e(), e(), e(), e(), e(), e()};
  }
  auto g = reduce_partials(partials, D, d);
  return {gx, g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7]};
}

}  // namespace ultimus
