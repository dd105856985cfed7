"""The autograd contract shared by every fused backend.

Each fused backend registers two custom ops with the same signatures:

    fwd(x, wq, bq, wk, bk, wv, bv, wo, bo, residual) -> y                     (y in x's dtype)
    bwd(gy, x, wq, bq, wk, bk, wv, bv, wo, bo, residual, need_gx, need_gw)
        -> (gx, gwq, gbq, gwk, gbk, gwv, gbv, gwo, gbo)

The forward saves only its inputs: the backward recomputes q, k, v and A, which costs ~1.2 kFLOP per
sample and is cheaper than storing and re-reading d*d + 3d values per sample. `bwd` returns the weight
and bias gradients in the accumulation dtype (float64 for float64 x, else float32); they are cast to
each parameter's dtype here. Unneeded outputs come back as empty tensors. Double backward is not
supported (the backward op is not itself differentiable).
"""
from __future__ import annotations

import torch

PARAM_SLOTS = 8  # wq, bq, wk, bk, wv, bv, wo, bo: inputs 1..8 of fwd


def register_fused_autograd(fwd_op, bwd_op) -> None:
    """Attach the backward `bwd_op` to the custom op `fwd_op` (a name, OpOverload or CustomOpDef)."""

    def setup_context(ctx, inputs, output):
        *tensors, residual = inputs
        ctx.save_for_backward(*tensors)
        ctx.residual = residual

    def backward(ctx, gy):
        x, *params = ctx.saved_tensors
        need = ctx.needs_input_grad
        need_gx, need_gw = bool(need[0]), any(need[1 : 1 + PARAM_SLOTS])
        grads = bwd_op(gy, x, *params, ctx.residual, need_gx, need_gw)
        out = [grads[0] if need_gx else None]
        for slot, (g, p) in enumerate(zip(grads[1:], params), start=1):
            out.append(g.to(p.dtype) if (p is not None and need[slot]) else None)
        return (*out, None)

    torch.library.register_autograd(fwd_op, backward, setup_context=setup_context)
