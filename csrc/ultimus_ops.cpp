// The ultimus_ext ops: their schemas, and their autograd as a C++ kernel.
//
//   fwd(x, wq, bq, wk, bk, wv, bv, wo, bo, residual) -> y
//   bwd(gy, x, wq, bq, wk, bk, wv, bv, wo, bo, residual, need_gx, need_gw) -> (gx, gparams)
//   bwd_differentiable(gy, x, ..., residual, need[9]) -> [gx, gwq, gbq, ..., gbo]
//   stack_fwd(x, params[], bias, residual) -> y                         (a stack of L blocks)
//   stack_bwd(gy, x, params[], bias, residual, need_gx, need_gw) -> (gx, gparams)
//   stack_bwd_differentiable(gy, x, params[], bias, residual, need[]) -> [gx, one per params entry]
//
// A stack's `params` is flat: every block's (wq, bq, wk, bk, wv, bv, wo, bo) in turn when `bias`, else
// its (wq, wk, wv, wo); its `gparams` is every block's partial-row layout in turn.
//
// The CPU kernels are in ultimus_cpu.cpp, the CUDA kernels in cuda/ultimus_cuda.cu, the math in
// docs/ and ultimus_kernels/reference.py. `gparams` is every parameter gradient in one flat vector,
// [gWq | gWk | gWv | gWo | gbq | gbk | gbv | gbo] (ultimus.h). `bwd_differentiable` is the backward
// under create_graph (double backward); its implementation is Python's (ultimus_kernels/ops/autograd.py:
// the reference differentiated by autograd), registered when ultimus_kernels is imported.
//
// Autograd. A C++ autograd kernel (a torch::autograd::Function) is the cheapest autograd boundary
// measured for these ops: no Python runs between the user's call and the kernel, forward or backward
// (see README, "The op path"). It saves only the inputs; the backward recomputes q, k, v and A.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <typeinfo>

#include "ultimus.h"

namespace ultimus {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor call_fwd(const at::Tensor& x, const at::Tensor& wq, const OptTensor& bq, const at::Tensor& wk,
                    const OptTensor& bk, const at::Tensor& wv, const OptTensor& bv, const at::Tensor& wo,
                    const OptTensor& bo, bool residual) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("ultimus_ext::fwd", "").typed<decltype(call_fwd)>();
  return op.call(x, wq, bq, wk, bk, wv, bv, wo, bo, residual);
}

BackwardResult call_bwd(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& wq, const OptTensor& bq,
                        const at::Tensor& wk, const OptTensor& bk, const at::Tensor& wv, const OptTensor& bv,
                        const at::Tensor& wo, const OptTensor& bo, bool residual, bool need_gx, bool need_gw) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("ultimus_ext::bwd", "").typed<decltype(call_bwd)>();
  return op.call(gy, x, wq, bq, wk, bk, wv, bv, wo, bo, residual, need_gx, need_gw);
}

std::vector<at::Tensor> call_bwd_differentiable(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& wq,
                                                const OptTensor& bq, const at::Tensor& wk, const OptTensor& bk,
                                                const at::Tensor& wv, const OptTensor& bv, const at::Tensor& wo,
                                                const OptTensor& bo, bool residual, std::array<bool, 9> need) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("ultimus_ext::bwd_differentiable", "")
                       .typed<decltype(call_bwd_differentiable)>();
  return op.call(gy, x, wq, bq, wk, bk, wv, bv, wo, bo, residual, need);
}

at::Tensor call_stack_fwd(const at::Tensor& x, at::TensorList params, bool bias, bool residual) {
  static auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("ultimus_ext::stack_fwd", "").typed<decltype(call_stack_fwd)>();
  return op.call(x, params, bias, residual);
}

BackwardResult call_stack_bwd(const at::Tensor& gy, const at::Tensor& x, at::TensorList params, bool bias,
                              bool residual, bool need_gx, bool need_gw) {
  static auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("ultimus_ext::stack_bwd", "").typed<decltype(call_stack_bwd)>();
  return op.call(gy, x, params, bias, residual, need_gx, need_gw);
}

std::vector<at::Tensor> call_stack_bwd_differentiable(const at::Tensor& gy, const at::Tensor& x,
                                                      at::TensorList params, bool bias, bool residual,
                                                      at::ArrayRef<bool> need) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("ultimus_ext::stack_bwd_differentiable", "")
                       .typed<std::vector<at::Tensor>(const at::Tensor&, const at::Tensor&, at::TensorList, bool,
                                                      bool, at::ArrayRef<bool>)>();
  return op.call(gy, x, params, bias, residual, need);
}

// The backward hands out each parameter's gradient as a view of the bwd op's flat gparams. For a
// plain dense tensor the view is made directly, one TensorImpl on the same storage: two dispatcher
// calls per gradient (narrow, view) with autograd's view tracking cost more than the whole CPU kernel
// at B = 1. Anything else (a FakeTensor or a functional wrapper while compiling, symbolic sizes) is
// sliced by the ops, which know how to.
bool is_plain_dense(const at::Tensor& t) {
  const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  return typeid(*impl) == typeid(c10::TensorImpl) && impl->has_storage() && !impl->key_set().has_any(c10::python_ks) &&
         t.layout() == at::kStrided && t.is_contiguous();
}
at::Tensor view_of(const at::Tensor& plain, int64_t offset, at::IntArrayRef shape) {
  const c10::TensorImpl* impl = plain.unsafeGetTensorImpl();
  auto view = at::detail::make_tensor<c10::TensorImpl>(c10::TensorImpl::VIEW, c10::Storage(impl->storage()),
                                                       impl->key_set(), impl->dtype());
  view.unsafeGetTensorImpl()->set_storage_offset(plain.storage_offset() + offset);
  view.unsafeGetTensorImpl()->set_sizes_contiguous(shape);
  return view;
}

class UltimusAutograd : public torch::autograd::Function<UltimusAutograd> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& wq, const OptTensor& bq,
                            const at::Tensor& wk, const OptTensor& bk, const at::Tensor& wv, const OptTensor& bv,
                            const at::Tensor& wo, const OptTensor& bo, bool residual) {
    auto or_undefined = [](const OptTensor& t) { return t ? *t : at::Tensor(); };
    ctx->save_for_backward({x, wq, or_undefined(bq), wk, or_undefined(bk), wv, or_undefined(bv), wo, or_undefined(bo)});
    ctx->saved_data["residual"] = residual;
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_fwd(x, wq, bq, wk, bk, wv, bv, wo, bo, residual);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();  // x, wq, bq, wk, bk, wv, bv, wo, bo
    const at::Tensor& gy = grad_outputs[0];
    const bool residual = ctx->saved_data["residual"].toBool();
    auto opt = [&](int i) { return saved[i].defined() ? OptTensor(saved[i]) : OptTensor(); };
    std::array<bool, 9> need{};
    bool need_gw = false, tracked = gy.requires_grad();
    for (int i = 0, edge = 0; i < 9; ++i) {
      if (!saved[i].defined()) continue;  // an absent bias: not an input edge of this node
      need[i] = ctx->needs_input_grad(edge++);
      need_gw |= i > 0 && need[i];
      tracked |= saved[i].requires_grad();
    }
    variable_list out(10);  // one per forward argument; residual's stays undefined
    if (at::GradMode::is_enabled() && tracked) {  // create_graph: differentiable gradients (double backward)
      const auto grads = call_bwd_differentiable(gy, saved[0], saved[1], opt(2), saved[3], opt(4), saved[5], opt(6),
                                                 saved[7], opt(8), residual, need);
      for (int i = 0; i < 9; ++i)
        if (need[i]) out[i] = grads[i];
      return out;
    }
    at::Tensor gx, gparams;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;  // the bwd op's own autograd kernel only refuses
      std::tie(gx, gparams) = call_bwd(gy, saved[0], saved[1], opt(2), saved[3], opt(4), saved[5], opt(6), saved[7],
                                       opt(8), residual, need[0], need_gw);
    }
    if (need[0]) out[0] = gx;
    if (need_gw) {
      const int64_t D = saved[0].size(1), d = saved[1].size(0), dD = d * D;
      // Slot i of the forward's arguments -> its offset in the flat vector (ultimus.h's layout); the shape
      // is the parameter's own.
      const std::array<int64_t, 9> offset = {0, 0, 4 * dD, dD, 4 * dD + d, 2 * dD, 4 * dD + 2 * d, 3 * dD, 4 * dD + 3 * d};
      const bool plain = is_plain_dense(gparams);
      for (int i = 1; i < 9; ++i) {
        if (!need[i]) continue;
        at::Tensor g;
        if (plain) {
          g = view_of(gparams, offset[i], saved[i].sizes());
        } else {
          at::AutoDispatchBelowADInplaceOrView below_view_tracking;  // (the backward: nothing is differentiated)
          g = gparams.narrow_symint(0, offset[i], saved[i].sym_numel()).view_symint(saved[i].sym_sizes());
        }
        out[i] = g.scalar_type() == saved[i].scalar_type() ? g : g.to(saved[i].scalar_type());
      }
    }
    return out;
  }
};

// The bwd op is not differentiable (the fwd op's backward under create_graph is, through
// bwd_differentiable). Its autograd kernel says so instead of returning gradients that silently miss
// the dependence on the op's inputs, and refuses forward-mode tangents likewise (the C++ Function API
// has no jvp, so PyTorch raises for them).
class UltimusBwdAutograd : public torch::autograd::Function<UltimusBwdAutograd> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& gy, const at::Tensor& x, const at::Tensor& wq,
                               const OptTensor& bq, const at::Tensor& wk, const OptTensor& bk, const at::Tensor& wv,
                               const OptTensor& bv, const at::Tensor& wo, const OptTensor& bo, bool residual,
                               bool need_gx, bool need_gw) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [gx, gparams] = call_bwd(gy, x, wq, bq, wk, bk, wv, bv, wo, bo, residual, need_gx, need_gw);
    return {gx, gparams};
  }
  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false, "ultimus: ultimus_ext::bwd is not differentiable; for second derivatives differentiate "
                "ultimus_ext::fwd (or ultimus_kernels.ultimus) with create_graph=True, whose backward is");
  }
};

// The stack's autograd node: x and every parameter tensor are its direct inputs (no packing, no views
// between the leaves and the kernel), and its backward cuts the flat gradient into each parameter's.
class UltimusStackAutograd : public torch::autograd::Function<UltimusStackAutograd> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, at::TensorList params, bool bias,
                            bool residual) {
    std::vector<at::Tensor> saved{x};
    saved.insert(saved.end(), params.begin(), params.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["bias"] = bias;
    ctx->saved_data["residual"] = residual;
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_stack_fwd(x, params, bias, residual);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();  // x, then the flat parameters
    const at::Tensor& gy = grad_outputs[0];
    const bool bias = ctx->saved_data["bias"].toBool(), residual = ctx->saved_data["residual"].toBool();
    const at::Tensor& x = saved[0];
    const at::TensorList params(saved.data() + 1, saved.size() - 1);
    const size_t n = saved.size();
    std::vector<bool> need(n);
    bool need_gw = false, tracked = gy.requires_grad();
    for (size_t i = 0; i < n; ++i) {
      need[i] = ctx->needs_input_grad(i);
      need_gw |= i > 0 && need[i];
      tracked |= saved[i].requires_grad();
    }
    variable_list out(n + 2);  // x, each parameter, then bias and residual (undefined)
    if (at::GradMode::is_enabled() && tracked) {  // create_graph: differentiable gradients (double backward)
      std::vector<uint8_t> flags(need.begin(), need.end());
      const auto grads = call_stack_bwd_differentiable(
          gy, x, params, bias, residual, at::ArrayRef<bool>(reinterpret_cast<const bool*>(flags.data()), n));
      for (size_t i = 0; i < n; ++i)
        if (need[i]) out[i] = grads[i];
      return out;
    }
    at::Tensor gx, gparams;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(gx, gparams) = call_stack_bwd(gy, x, params, bias, residual, need[0], need_gw);
    }
    if (need[0]) out[0] = gx;
    if (need_gw) {
      const bool plain = is_plain_dense(gparams);  // (see view_of)
      at::AutoDispatchBelowADInplaceOrView below_view_tracking;  // (the backward: nothing is differentiated)
      // Symbolic sizes: under torch.compile with dynamic shapes this runs on tensors without concrete sizes.
      const c10::SymInt D = x.sym_size(1), d = params[0].sym_size(0), dD = d * D, np = 4 * dD + 3 * d + D;
      // Offsets in a block's partial row, in the order of the block's flat parameters.
      const std::array<c10::SymInt, 8> with_bias = {0 * dD, 4 * dD, dD, 4 * dD + d, 2 * dD, 4 * dD + 2 * d, 3 * dD,
                                                    4 * dD + 3 * d};
      const std::array<c10::SymInt, 4> weights_only = {0 * dD, dD, 2 * dD, 3 * dD};
      const size_t per = bias ? 8 : 4;
      for (size_t i = 1; i < n; ++i) {
        if (!need[i]) continue;
        const size_t block = (i - 1) / per, slot = (i - 1) % per;
        const c10::SymInt offset = np * static_cast<int64_t>(block) + (bias ? with_bias[slot] : weights_only[slot]);
        const at::Tensor& p = saved[i];
        at::Tensor g = plain ? view_of(gparams, offset.expect_int(), p.sizes())
                             : gparams.narrow_symint(0, offset, p.sym_numel()).view_symint(p.sym_sizes());
        out[i] = g.scalar_type() == p.scalar_type() ? g : g.to(p.scalar_type());
      }
    }
    return out;
  }
};

class UltimusStackBwdAutograd : public torch::autograd::Function<UltimusStackBwdAutograd> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& gy, const at::Tensor& x, at::TensorList params,
                               bool bias, bool residual, bool need_gx, bool need_gw) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [gx, gparams] = call_stack_bwd(gy, x, params, bias, residual, need_gx, need_gw);
    return {gx, gparams};
  }
  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false, "ultimus: ultimus_ext::stack_bwd is not differentiable; for second derivatives "
                "differentiate ultimus_ext::stack_fwd (or ultimus_kernels.ultimus_stack) with create_graph=True, "
                "whose backward is");
  }
};

BackwardResult bwd_autograd(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& wq, const OptTensor& bq,
                            const at::Tensor& wk, const OptTensor& bk, const at::Tensor& wv, const OptTensor& bv,
                            const at::Tensor& wo, const OptTensor& bo, bool residual, bool need_gx, bool need_gw) {
  auto out = UltimusBwdAutograd::apply(gy, x, wq, bq, wk, bk, wv, bv, wo, bo, residual, need_gx, need_gw);
  return {out[0], out[1]};
}

at::Tensor fwd_autograd(const at::Tensor& x, const at::Tensor& wq, const OptTensor& bq, const at::Tensor& wk,
                        const OptTensor& bk, const at::Tensor& wv, const OptTensor& bv, const at::Tensor& wo,
                        const OptTensor& bo, bool residual) {
  return UltimusAutograd::apply(x, wq, bq, wk, bk, wv, bv, wo, bo, residual);
}

at::Tensor stack_fwd_autograd(const at::Tensor& x, at::TensorList params, bool bias, bool residual) {
  return UltimusStackAutograd::apply(x, params, bias, residual);
}

BackwardResult stack_bwd_autograd(const at::Tensor& gy, const at::Tensor& x, at::TensorList params, bool bias,
                                  bool residual, bool need_gx, bool need_gw) {
  auto out = UltimusStackBwdAutograd::apply(gy, x, params, bias, residual, need_gx, need_gw);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY(ultimus_ext, m) {
  m.def(
      "fwd(Tensor x, Tensor wq, Tensor? bq, Tensor wk, Tensor? bk, Tensor wv, Tensor? bv, Tensor wo, Tensor? bo, "
      "bool residual) -> Tensor");
  m.def(
      "bwd(Tensor gy, Tensor x, Tensor wq, Tensor? bq, Tensor wk, Tensor? bk, Tensor wv, Tensor? bv, Tensor wo, "
      "Tensor? bo, bool residual, bool need_gx, bool need_gw) -> (Tensor, Tensor)");
  m.def(
      "bwd_differentiable(Tensor gy, Tensor x, Tensor wq, Tensor? bq, Tensor wk, Tensor? bk, Tensor wv, Tensor? bv, "
      "Tensor wo, Tensor? bo, bool residual, bool[9] need) -> Tensor[]");
  m.def("stack_fwd(Tensor x, Tensor[] params, bool bias, bool residual) -> Tensor");
  m.def(
      "stack_bwd(Tensor gy, Tensor x, Tensor[] params, bool bias, bool residual, bool need_gx, bool need_gw) -> "
      "(Tensor, Tensor)");
  m.def(
      "stack_bwd_differentiable(Tensor gy, Tensor x, Tensor[] params, bool bias, bool residual, bool[] need) -> "
      "Tensor[]");
}

TORCH_LIBRARY_IMPL(ultimus_ext, Autograd, m) {
  m.impl("fwd", &fwd_autograd);
  m.impl("bwd", &bwd_autograd);
  m.impl("stack_fwd", &stack_fwd_autograd);
  m.impl("stack_bwd", &stack_bwd_autograd);
}

}  // namespace ultimus
