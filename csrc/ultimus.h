// Shared by the CPU and CUDA implementations of the Ultimus block: sizes, input checks and the
// bookkeeping of the parameter-gradient partials. The math itself is stated in ultimus_cpu.cpp.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <array>
#include <cmath>
#include <string>
#include <tuple>
#include <cstdint>
#include <vector>

namespace ultimus {

// The fused kernels hold one sample's state on chip; the Python API promises the same limits.
constexpr int64_t kMaxDim = 256;
constexpr int64_t kMaxAttnDim = 32;

using OptTensor = std::optional<at::Tensor>;

// Messages mirror ultimus_kernels/checks.py word for word (dtypes as torch.float32, shapes as
// tuples), so that a raw op call fails exactly as the public API does.
inline std::string dtype_str(at::ScalarType t) { return "torch." + std::string(c10::getDtypeNames(t).first); }
inline std::string shape_str(at::IntArrayRef s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + (s.size() == 1 ? ",)" : ")");
}
inline bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}
constexpr const char* kSupportedDtypes = "float32, float64, float16, bfloat16";

inline void check_dtype(const at::Tensor& t, const char* name, const std::string& who = "ultimus: ") {
  TORCH_CHECK_TYPE(supported_dtype(t.scalar_type()), who, name, " must be ",
                   t.is_floating_point() ? std::string("one of ") + kSupportedDtypes : "a floating-point tensor",
                   " (supported: ", kSupportedDtypes, "), got dtype ", dtype_str(t.scalar_type()));
}

inline void check_param(const at::Tensor& t, const char* name, at::IntArrayRef shape, const char* meaning,
                        const std::string& who) {
  TORCH_CHECK_VALUE(t.sizes() == shape, who, name, " must have shape ", shape_str(shape), " (", meaning,
                    "), got ", shape_str(t.sizes()));
}

inline void check_limits(const char* backend, int64_t D, int64_t d) {
  TORCH_CHECK_VALUE(D <= kMaxDim, "ultimus: backend '", backend, "' supports D <= ", kMaxDim, ", got D=", D,
                    "; use backend='reference'");
  TORCH_CHECK_VALUE(d <= kMaxAttnDim, "ultimus: backend '", backend, "' supports d <= ", kMaxAttnDim, ", got d=", d,
                    "; use backend='reference'");
}

// Returns {D, d}. Everything ultimus_kernels/checks.py's check_op_inputs checks, in the same order:
// dtypes, ranks, shapes, devices, then the fused kernels' size limits (`backend` names the caller).
// `who` starts every message ("ultimus: ", or "ultimus: block 2: " for a block of a stack); `limits`
// is false where the caller checks the size limits itself.
inline std::array<int64_t, 2> check_inputs(const char* backend, const at::Tensor& x, const at::Tensor& wq,
                                           const OptTensor& bq, const at::Tensor& wk, const OptTensor& bk,
                                           const at::Tensor& wv, const OptTensor& bv, const at::Tensor& wo,
                                           const OptTensor& bo, const std::string& who = "ultimus: ",
                                           bool limits = true) {
  check_dtype(x, "x", who);
  TORCH_CHECK_VALUE(x.dim() == 2, who, "x must be 2-D (B, D), got shape ", shape_str(x.sizes()));
  check_dtype(wq, "wq", who);
  TORCH_CHECK_VALUE(wq.dim() == 2, who, "wq must be 2-D (d, D), got shape ", shape_str(wq.sizes()));
  const int64_t D = x.size(1), d = wq.size(0);
  TORCH_CHECK_VALUE(D >= 1 && d >= 1, who, "D and d must be at least 1, got D=", D, ", d=", d);
  const std::array<std::pair<const char*, const at::Tensor*>, 8> params = {{
      {"wq", &wq}, {"bq", bq ? &*bq : nullptr}, {"wk", &wk}, {"bk", bk ? &*bk : nullptr},
      {"wv", &wv}, {"bv", bv ? &*bv : nullptr}, {"wo", &wo}, {"bo", bo ? &*bo : nullptr}}};
  for (const auto& [name, t] : params)
    if (t) check_dtype(*t, name, who);
  check_param(wq, "wq", {d, D}, "d, D with D = x.shape[1]", who);
  check_param(wk, "wk", {d, D}, "same as wq", who);
  check_param(wv, "wv", {d, D}, "same as wq", who);
  check_param(wo, "wo", {D, d}, "D, d: the output projection", who);
  if (bq) check_param(*bq, "bq", {d}, "d", who);
  if (bk) check_param(*bk, "bk", {d}, "d", who);
  if (bv) check_param(*bv, "bv", {d}, "d", who);
  if (bo) check_param(*bo, "bo", {D}, "D", who);
  for (const auto& [name, t] : params)
    TORCH_CHECK_VALUE(!t || t->device() == x.device(), who, "all tensors must be on one device: x is on ",
                      x.device(), ", ", name, " on ", t->device());
  if (limits) check_limits(backend, D, d);
  return {D, d};
}

// The stack ops' parameters: a flat list, every block's (wq, bq, wk, bk, wv, bv, wo, bo) in turn when
// `bias`, else its (wq, wk, wv, wo). Mirrors checks.py's check_stack_op_inputs. Returns {L, D, d}.
inline std::array<int64_t, 3> check_stack_inputs(const char* backend, const at::Tensor& x, at::TensorList params,
                                                 bool bias) {
  check_dtype(x, "x");  // once, before the blocks
  TORCH_CHECK_VALUE(x.dim() == 2, "ultimus: x must be 2-D (B, D), got shape ", shape_str(x.sizes()));
  const int64_t per = bias ? 8 : 4;
  const int64_t n = static_cast<int64_t>(params.size());
  TORCH_CHECK_VALUE(n > 0 && n % per == 0, "ultimus: params must hold ", per, " tensors per block (",
                    bias ? "wq, bq, wk, bk, wv, bv, wo, bo" : "wq, wk, wv, wo", "), got ", n);
  const int64_t L = n / per;
  int64_t D = 0, d0 = 0;
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor* p = params.data() + l * per;
    const std::string who = "ultimus: block " + std::to_string(l) + ": ";
    const auto Dd = bias ? check_inputs(backend, x, p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], who, false)
                         : check_inputs(backend, x, p[0], {}, p[1], {}, p[2], {}, p[3], {}, who, false);
    D = Dd[0];
    if (l == 0) d0 = Dd[1];
    TORCH_CHECK_VALUE(Dd[1] == d0, "ultimus: block ", l, " has d=", Dd[1], " but block 0 has d=", d0,
                      ": every block of a stack must have the same attention width");
  }
  check_limits(backend, D, d0);
  return {L, D, d0};
}

// The bwd ops' incoming gradient: x's shape and device, any supported dtype.
inline void check_grad_output(const at::Tensor& gy, const at::Tensor& x) {
  check_dtype(gy, "gy");
  TORCH_CHECK_VALUE(gy.sizes() == x.sizes(), "ultimus: gy must have x's shape ", shape_str(x.sizes()), ", got ",
                    shape_str(gy.sizes()));
  TORCH_CHECK_VALUE(gy.device() == x.device(), "ultimus: all tensors must be on one device: x is on ", x.device(),
                    ", gy on ", gy.device());
}

// The accumulation dtype: float64 for float64 x, float32 for everything else (half inputs included).
inline at::ScalarType acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Parameters as contiguous tensors of the accumulation dtype (no copy in the common fp32 case, and
// no dispatcher call either: at the training batch the op's host path is what a call costs).
inline at::Tensor as_acc(const at::Tensor& t, at::ScalarType acc) {
  return t.scalar_type() == acc && t.is_contiguous() ? t : t.to(acc).contiguous();
}
inline at::Tensor as_acc(const OptTensor& t, at::ScalarType acc) {
  return t ? as_acc(*t, acc) : at::Tensor();
}

// What a kernel reads of the parameters: pointers into contiguous accumulation-dtype copies (absent
// biases are null), the sizes and the scale s = 1/sqrt(d). Passed by value to CUDA kernels, so
// `index_t` is int there (D, d <= 256) and int64_t on the CPU.
template <typename acc_t, typename index_t>
struct ParamPtrs {
  const acc_t *wq, *bq, *wk, *bk, *wv, *bv, *wo, *bo;
  index_t D, d;
  acc_t scale;
};

// Owns the accumulation-dtype copies that ParamPtrs point into; shared by the CPU and CUDA launchers.
struct AccParams {
  at::Tensor wq, bq, wk, bk, wv, bv, wo, bo;
  AccParams(const at::Tensor& x, const at::Tensor& wq_, const OptTensor& bq_, const at::Tensor& wk_,
            const OptTensor& bk_, const at::Tensor& wv_, const OptTensor& bv_, const at::Tensor& wo_,
            const OptTensor& bo_) {
    const auto acc = acc_type(x);
    wq = as_acc(wq_, acc), bq = as_acc(bq_, acc), wk = as_acc(wk_, acc), bk = as_acc(bk_, acc);
    wv = as_acc(wv_, acc), bv = as_acc(bv_, acc), wo = as_acc(wo_, acc), bo = as_acc(bo_, acc);
  }
  template <typename acc_t, typename index_t = int64_t>
  ParamPtrs<acc_t, index_t> ptrs(int64_t D, int64_t d) const {
    auto ptr = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<acc_t>() : nullptr; };
    return {ptr(wq), ptr(bq), ptr(wk), ptr(bk), ptr(wv), ptr(bv), ptr(wo), ptr(bo), static_cast<index_t>(D),
            static_cast<index_t>(d), static_cast<acc_t>(1.0 / std::sqrt(static_cast<double>(d)))};
  }
};

// One AccParams per block of a stack, from the stack ops' flat parameter list (see check_stack_inputs).
inline std::vector<AccParams> stack_acc_params(const at::Tensor& x, at::TensorList params, bool bias) {
  const size_t per = bias ? 8 : 4;
  std::vector<AccParams> blocks;
  blocks.reserve(params.size() / per);
  for (size_t i = 0; i < params.size(); i += per) {
    const at::Tensor* p = params.data() + i;
    if (bias)
      blocks.emplace_back(x, p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]);
    else
      blocks.emplace_back(x, p[0], OptTensor(), p[1], OptTensor(), p[2], OptTensor(), p[3], OptTensor());
  }
  return blocks;
}

// The compile-time bound on d that the CUDA kernels are instantiated for (their per-sample vectors
// are register arrays of that length): MAXA = 8 for the common d <= 8, else kMaxAttnDim.
#define ULTIMUS_ATTN_DIM_SWITCH(d, MAXA, ...)        \
  [&] {                                              \
    if ((d) <= 8) {                                  \
      constexpr int MAXA = 8;                        \
      return __VA_ARGS__();                          \
    }                                                \
    constexpr int MAXA = static_cast<int>(kMaxAttnDim); \
    return __VA_ARGS__();                            \
  }()

// Parameter-gradient partials are rows of `num_params(D, d)` numbers, laid out as
// [gWq (d*D) | gWk (d*D) | gWv (d*D) | gWo (D*d) | gbq (d) | gbk (d) | gbv (d) | gbo (D)].
C10_HOST_DEVICE inline int64_t num_params(int64_t D, int64_t d) { return 4 * d * D + 3 * d + D; }

// What the bwd op returns: gx, and every parameter gradient in one flat vector in the partial-row
// layout (the Python side cuts it into views: custom-op outputs must not alias one another).
using BackwardResult = std::tuple<at::Tensor, at::Tensor>;

// Sums the partial rows in a fixed order (deterministic): one reduction for all eight gradients. One
// row is already the sum. An empty vector when the parameter gradients were not asked for.
inline BackwardResult backward_result(const at::Tensor& gx, const at::Tensor& partials, bool need_gw) {
  if (!need_gw) return {gx, at::empty({0}, partials.options())};
  if (partials.size(0) == 1) return {gx, partials.view({partials.size(1)})};
  return {gx, partials.sum(0)};
}

}  // namespace ultimus
