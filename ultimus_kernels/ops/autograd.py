"""The autograd contract shared by every fused backend: `UltimusFunction`, and the same formula on
the raw ops.

Each fused backend registers two custom ops with the same signatures:

    fwd(x, wq, bq, wk, bk, wv, bv, wo, bo, residual) -> y                     (y in x's dtype)
    bwd(gy, x, wq, bq, wk, bk, wv, bv, wo, bo, residual, need_gx, need_gw) -> (gx, gparams)

`gparams` is every parameter gradient in one flat vector of the accumulation dtype (float64 for
float64 x, else float32), laid out as [gWq | gWk | gWv | gWo | gbq | gbk | gbv | gbo] (the layout of
the kernels' partial rows): one reduction kernel for all eight, cut into views here. Unneeded outputs
come back as empty tensors. The forward saves only its inputs: the backward recomputes q, k, v and A,
which costs ~1.2 kFLOP per sample and is cheaper than storing and re-reading d*d + 3d values.

The autograd boundaries, cheapest first (measured: README, "The op path"):
- The C++ ops (`ultimus_ext`, backends cpu and cuda) carry their autograd as a C++ kernel
  (csrc/ultimus_ops.cpp): the public path calls the op itself and no Python runs in between.
- `UltimusFunction`, a named torch.autograd.Function over a backend's ops (flash-attention's
  pattern): the eager path of the Triton backend, and of every backend under forward-mode AD (it has
  the `jvp` rule). `UltimusTransformFunction` is the same Function in the form torch.func's
  transforms (grad, jacrev, jvp, vmap) require; that form costs ~35 us per call in signature binding,
  so it is used only under those transforms.
- `torch.library.register_autograd` on the Triton fwd op, so that torch.compile traces it and a
  program exported with the raw ops (torch.export) and loaded in a fresh process still trains.
All of them run `_backward` (or, in C++, its mirror).

Double backward (a gradient penalty, a Hessian-vector product): when the backward runs with
create_graph and anything it sees requires grad, it differentiates the plain PyTorch reference
instead of calling the fused bwd op, so second derivatives are exact (and unfused). For the C++ ops
that is the op `ultimus_ext::bwd_differentiable`, implemented here. The bwd ops themselves are not
differentiable.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from ..checks import check_grad_output, check_op_inputs, check_stack_op_inputs
from ..reference import (
    ultimus_reference,
    ultimus_reference_jvp,
    ultimus_stack_reference,
    ultimus_stack_reference_jvp,
)

PARAM_SLOTS = 8  # wq, bq, wk, bk, wv, bv, wo, bo: inputs 1..8 of fwd

# backend name -> its ops; filled in by each backend module when its ops are registered.
FUSED_OPS: dict[str, "FusedOps"] = {}


def param_grads(gparams: Tensor, D: int, d: int) -> tuple[Tensor, ...]:
    """The eight parameter gradients as views of the flat vector, in (wq, bq, ..., wo, bo) order."""
    dD = d * D
    gwq, gwk, gwv, gwo, gbq, gbk, gbv, gbo = gparams.split([dD, dD, dD, dD, d, d, d, D])
    return gwq.view(d, D), gbq, gwk.view(d, D), gbk, gwv.view(d, D), gbv, gwo.view(D, d), gbo


def _backward(bwd_op, gy: Tensor, saved: tuple, residual: bool, need: tuple) -> tuple[Optional[Tensor], ...]:
    """Gradients for (x, wq, bq, ..., bo) given the saved inputs and `need` (needs_input_grad)."""
    if torch.is_grad_enabled() and (gy.requires_grad or any(t is not None and t.requires_grad for t in saved)):
        grads = _differentiable_backward(gy, saved, residual, need)
        if grads is not None:
            return grads
    x, *params = saved
    need_gx, need_gw = need[0], any(need[1:])
    gx, gparams = bwd_op(gy, x, *params, residual, need_gx, need_gw)
    out = [gx if need_gx else None]
    if need_gw:
        for g, p, wanted in zip(param_grads(gparams, x.shape[1], params[0].shape[0]), params, need[1:]):
            out.append((g if g.dtype == p.dtype else g.to(p.dtype)) if wanted else None)
    else:
        out += [None] * PARAM_SLOTS
    return tuple(out)


def _differentiable_backward(gy, saved, residual, need):
    """The backward under create_graph: the reference's autograd, itself differentiable."""
    return _reference_grads(gy, saved, lambda: ultimus_reference(*saved, residual=residual), need)


def _reference_grads(gy, inputs, forward, need):
    """Gradients of `forward()` (the reference on `inputs`) for the inputs `need` asks for, with a graph.
    None when no graph can be built here (torch.func's transforms run every backward with create_graph,
    on tensors that do not track gradients at this level): then the fused backward is the answer."""
    with torch.enable_grad():
        y = forward()
        if not y.requires_grad:
            return None
        wrt = [t for t, wanted in zip(inputs, need) if wanted]
        grads = iter(torch.autograd.grad(y, wrt, gy, create_graph=True, allow_unused=True))
    out = []
    for t, wanted in zip(inputs, need):
        g = next(grads) if wanted else None
        out.append(torch.zeros_like(t) if (wanted and g is None) else g)
    return tuple(out)


class FusedOps(NamedTuple):
    fwd: Callable
    bwd: Callable
    native_autograd: bool  # the fwd ops have their own (C++) autograd kernel: call them directly
    stack_fwd: Optional[Callable] = None  # the stack of blocks in one launch (see "The stack" below)
    stack_bwd: Optional[Callable] = None


def _save_inputs(ctx, backend: str, residual: bool, tensors: tuple) -> None:
    ctx.backend, ctx.residual = backend, residual
    ctx.save_for_backward(*tensors)
    ctx.save_for_forward(*tensors)


def _run_fwd(backend: str, residual: bool, tensors: tuple) -> Tensor:
    # Below autograd: the op's own autograd kernel (which would only redispatch here) is skipped.
    with torch._C._AutoDispatchBelowAutograd():
        return FUSED_OPS[backend].fwd(*tensors, residual)


def _function_backward(ctx, gy):
    need = ctx.needs_input_grad[2:]
    return (None, None, *_backward(FUSED_OPS[ctx.backend].bwd, gy, ctx.saved_tensors, ctx.residual, need))


def _function_jvp(ctx, _backend_tangent, _residual_tangent, *tangents):
    return ultimus_reference_jvp(ctx.saved_tensors, tangents, residual=ctx.residual)


class UltimusFunction(torch.autograd.Function):
    """y = ultimus(x, ...) on a fused backend's ops: `UltimusFunction.apply(backend, residual, x, wq, bq,
    wk, bk, wv, bv, wo, bo)`. Inputs must already be validated (the ops check them again). Backward:
    the backend's bwd op; forward-mode AD: the reference's forward rule (reference.py)."""

    @staticmethod
    def forward(ctx, backend: str, residual: bool, *tensors):
        _save_inputs(ctx, backend, residual, tensors)
        return _run_fwd(backend, residual, tensors)

    backward = staticmethod(_function_backward)
    jvp = staticmethod(_function_jvp)


class UltimusTransformFunction(torch.autograd.Function):
    """UltimusFunction in the form torch.func's transforms need (forward without ctx, setup_context,
    a vmap rule generated from the ops' own)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(backend: str, residual: bool, *tensors):
        return _run_fwd(backend, residual, tensors)

    @staticmethod
    def setup_context(ctx, inputs, output):
        backend, residual, *tensors = inputs
        _save_inputs(ctx, backend, residual, tuple(tensors))

    backward = staticmethod(_function_backward)
    jvp = staticmethod(_function_jvp)


# ------------------------------------------------------------------------------------------------
# Registration of a backend's ops: autograd and vmap rules on the ops themselves
# ------------------------------------------------------------------------------------------------


def _fake_backend_name(x: Tensor) -> str:
    return "cuda" if x.device.type == "cuda" else "cpu"


def _vmap_by_loop(op):
    """A vmap rule that runs `op` once per slice: exact for any op, used where no folding applies."""

    def rule(info, in_dims, *args):
        outs = [
            op(*(a.select(dim, i) if dim is not None else a for a, dim in zip(args, in_dims)))
            for i in range(info.batch_size)
        ]
        if isinstance(outs[0], tuple):
            return tuple(torch.stack(parts) for parts in zip(*outs)), (0,) * len(outs[0])
        return torch.stack(outs), 0

    return rule


def _fwd_vmap(fwd_op):
    """vmap of the forward: when only x is batched (per-sample use), the vmapped dimension is just
    more samples, so it folds into B and the op runs once."""
    loop = _vmap_by_loop(fwd_op)

    def rule(info, in_dims, x, *rest):
        if in_dims[0] is not None and all(dim is None for dim in in_dims[1:]):
            xs = x.movedim(in_dims[0], 0)
            y = fwd_op(xs.reshape(-1, xs.shape[-1]), *rest)
            return y.view(xs.shape), 0
        return loop(info, in_dims, x, *rest)

    return rule


def register_fused_ops(
    backend_names, fwd_op, bwd_op, native_autograd: bool = False, stack_fwd_op=None, stack_bwd_op=None
) -> None:
    """Make `fwd_op`/`bwd_op` (OpOverloads or CustomOpDefs) the ops of `backend_names`, and
    `stack_fwd_op`/`stack_bwd_op` their stack ops: vmap rules on the single-block ops, autograd on the
    fwd ops (unless they have their own C++ kernels), and the entries the public path dispatches through."""

    def setup_context(ctx, inputs, output):
        *tensors, residual = inputs
        ctx.save_for_backward(*tensors)
        ctx.residual = residual

    def backward(ctx, gy):
        return (*_backward(bwd_op, gy, ctx.saved_tensors, ctx.residual, ctx.needs_input_grad[:-1]), None)

    if not native_autograd:
        torch.library.register_autograd(fwd_op, backward, setup_context=setup_context)
    torch.library.register_vmap(fwd_op, _fwd_vmap(fwd_op))
    torch.library.register_vmap(bwd_op, _vmap_by_loop(bwd_op))
    if stack_fwd_op is not None and not native_autograd:
        _register_stack_autograd(stack_fwd_op, stack_bwd_op)
    for name in backend_names:
        FUSED_OPS[name] = FusedOps(fwd_op, bwd_op, native_autograd, stack_fwd_op, stack_bwd_op)


_libraries = []  # keeps the torch.library.Library objects (and so their registrations) alive


def register_differentiable_backward(namespace: str, bwd_op, stack_bwd_op) -> None:
    """Implement `<namespace>::bwd_differentiable` and `stack_bwd_differentiable` (schemas in
    csrc/ultimus_ops.cpp): the backwards that the C++ autograd kernels run under create_graph.
    Composite, so autograd records what they do."""
    lib = torch.library.Library(namespace, "IMPL")

    def bwd_differentiable(gy, x, wq, bq, wk, bk, wv, bv, wo, bo, residual, need):
        saved = (x, wq, bq, wk, bk, wv, bv, wo, bo)
        grads = _backward(bwd_op, gy, saved, residual, tuple(need))
        return [g if g is not None else x.new_empty(0) for g in grads]

    def stack_bwd_differentiable(gy, x, params, bias, residual, need):
        grads = _stack_backward(stack_bwd_op, gy, x, list(params), bias, residual, tuple(need))
        return [g if g is not None else x.new_empty(0) for g in grads]

    lib.impl("bwd_differentiable", bwd_differentiable, "CompositeImplicitAutograd")
    lib.impl("stack_bwd_differentiable", stack_bwd_differentiable, "CompositeImplicitAutograd")
    _libraries.append(lib)


# ------------------------------------------------------------------------------------------------
# The stack: L blocks in one launch
#
#   stack_fwd(x, params, bias, residual) -> y
#   stack_bwd(gy, x, params, bias, residual, need_gx, need_gw) -> (gx, gparams)
#
# `params` is flat: every block's (wq, bq, wk, bk, wv, bv, wo, bo) in turn when `bias`, else its
# (wq, wk, wv, wo). `gparams` is every block's partial-row layout in turn, L * (4dD + 3d + D) numbers
# (bias entries included, and ignored when there are no biases). The stack's autograd node has x and
# the flat parameters as its direct inputs: no cat or view nodes between the leaves and the kernel.
# ------------------------------------------------------------------------------------------------


def unflatten_stack(flat, bias: bool) -> list[tuple]:
    """The stack ops' flat parameter list -> per-block (wq, bq, ..., bo) tuples (None biases if not `bias`)."""
    if bias:
        return [tuple(flat[i : i + 8]) for i in range(0, len(flat), 8)]
    return [(wq, None, wk, None, wv, None, wo, None) for wq, wk, wv, wo in zip(*[iter(flat)] * 4)]


def _stack_backward(bwd_op, gy: Tensor, x: Tensor, flat: list, bias: bool, residual: bool, need: tuple):
    """Gradients for (x, *flat) given `need`; under create_graph, the reference's (double backward)."""
    if torch.is_grad_enabled() and (gy.requires_grad or x.requires_grad or any(t.requires_grad for t in flat)):
        grads = _differentiable_stack_backward(gy, x, flat, bias, residual, need)
        if grads is not None:
            return grads
    need_gx, need_gw = need[0], any(need[1:])
    gx, gparams = bwd_op(gy, x, flat, bias, residual, need_gx, need_gw)
    out = [gx if need_gx else None]
    if not need_gw:
        return tuple(out + [None] * len(flat))
    D, d = x.shape[1], flat[0].shape[0]
    rows = gparams.view(-1, 4 * d * D + 3 * d + D)
    per_block = [param_grads(row, D, d) for row in rows]
    grads = [g for block in per_block for g in (block if bias else block[0::2])]
    for g, p, wanted in zip(grads, flat, need[1:]):
        out.append((g if g.dtype == p.dtype else g.to(p.dtype)) if wanted else None)
    return tuple(out)


def _differentiable_stack_backward(gy, x, flat, bias, residual, need):
    forward = lambda: ultimus_stack_reference(x, unflatten_stack(flat, bias), residual=residual)  # noqa: E731
    return _reference_grads(gy, (x, *flat), forward, need)


class UltimusStackFunction(torch.autograd.Function):
    """y = ultimus_stack(x, ...) on a fused backend's stack ops, the stack's counterpart of
    UltimusFunction: `UltimusStackFunction.apply(backend, bias, residual, x, *flat_params)` (the flat
    order of the stack ops). Backward: the backend's stack_bwd op; forward-mode AD: the reference's rule."""

    @staticmethod
    def forward(ctx, backend: str, bias: bool, residual: bool, x: Tensor, *flat: Tensor):
        ctx.backend, ctx.bias, ctx.residual = backend, bias, residual
        ctx.save_for_backward(x, *flat)
        ctx.save_for_forward(x, *flat)
        with torch._C._AutoDispatchBelowAutograd():
            return FUSED_OPS[backend].stack_fwd(x, list(flat), bias, residual)

    @staticmethod
    def backward(ctx, gy):
        x, *flat = ctx.saved_tensors
        bwd_op = FUSED_OPS[ctx.backend].stack_bwd
        return (
            None,
            None,
            None,
            *_stack_backward(bwd_op, gy, x, flat, ctx.bias, ctx.residual, ctx.needs_input_grad[3:]),
        )

    @staticmethod
    def jvp(ctx, _backend_tangent, _bias_tangent, _residual_tangent, tx, *tflat):
        x, *flat = ctx.saved_tensors
        primals = (x, unflatten_stack(flat, ctx.bias))
        return ultimus_stack_reference_jvp(primals, (tx, unflatten_stack(tflat, ctx.bias)), residual=ctx.residual)


def _register_stack_autograd(stack_fwd_op, stack_bwd_op) -> None:
    """The stack's formula on the stack fwd op itself (torch.compile, exported programs)."""

    def setup_context(ctx, inputs, output):
        x, flat, bias, residual = inputs
        ctx.save_for_backward(x, *flat)
        ctx.bias, ctx.residual = bias, residual

    def backward(ctx, gy):
        x, *flat = ctx.saved_tensors
        need_x, need_flat = ctx.needs_input_grad[:2]  # the list's entry is one flag per tensor
        gx, *gflat = _stack_backward(stack_bwd_op, gy, x, flat, ctx.bias, ctx.residual, (need_x, *need_flat))
        return gx, gflat, None, None

    torch.library.register_autograd(stack_fwd_op, backward, setup_context=setup_context)


def fake_fwd(x, wq, bq, wk, bk, wv, bv, wo, bo, residual):
    """Shape and dtype of fwd's result, after the same checks as the real op (devices included)."""
    check_op_inputs(_fake_backend_name(x), x, wq, bq, wk, bk, wv, bv, wo, bo, residual)
    return x.new_empty(x.shape)


def fake_stack_fwd(x, params, bias, residual):
    check_stack_op_inputs(_fake_backend_name(x), x, params, bias, residual)
    return x.new_empty(x.shape)


def fake_stack_bwd(gy, x, params, bias, residual, need_gx, need_gw):
    L, D, d = check_stack_op_inputs(_fake_backend_name(x), x, params, bias, residual)
    check_grad_output(gy, x)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    gx = x.new_empty(x.shape if need_gx else (0,))
    return gx, x.new_empty(L * (4 * d * D + 3 * d + D) if need_gw else 0, dtype=acc)


def fake_bwd(gy, x, wq, bq, wk, bk, wv, bv, wo, bo, residual, need_gx, need_gw):
    D, d = check_op_inputs(_fake_backend_name(x), x, wq, bq, wk, bk, wv, bv, wo, bo, residual)
    check_grad_output(gy, x)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    gx = x.new_empty(x.shape if need_gx else (0,))
    return gx, x.new_empty((4 * d * D + 3 * d + D) if need_gw else 0, dtype=acc)
