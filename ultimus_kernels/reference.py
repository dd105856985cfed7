"""The Ultimus block in plain PyTorch: the executable form of docs/ULTIMUS_MATH.md, the definition every
kernel is checked against. Per sample x in R^D, attention width d, s = 1/sqrt(d):
q, k, v = W* x + b*;  A[i, j] = softmax_j(s q[i] k[j]);  z = V.A;  y = Wo z + bo (+ x when residual).

Weights use nn.Linear layouts: Wq, Wk, Wv are (d, D), Wo is (D, d). Autograd comes from PyTorch.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def ultimus_reference(
    x: Tensor,
    wq: Tensor,
    bq: Optional[Tensor],
    wk: Tensor,
    bk: Optional[Tensor],
    wv: Tensor,
    bv: Optional[Tensor],
    wo: Tensor,
    bo: Optional[Tensor],
    residual: bool = True,
) -> Tensor:
    """Batched reference: x is (B, D); returns (B, D). Weights are cast to x's dtype."""
    cast = lambda t: None if t is None else t.to(x.dtype)  # noqa: E731  (mixed-precision master weights)
    q = F.linear(x, cast(wq), cast(bq))  # (B, d)
    k = F.linear(x, cast(wk), cast(bk))
    v = F.linear(x, cast(wv), cast(bv))
    scale = 1.0 / math.sqrt(wq.shape[0])
    scores = scale * q.unsqueeze(2) * k.unsqueeze(1)  # (B, d, d): scores[b, i, j] = s q[b, i] k[b, j]
    attn = torch.softmax(scores, dim=2)  # softmax over j, row by row
    z = torch.einsum("bi,bij->bj", v, attn)  # z[b, j] = sum_i v[b, i] A[b, i, j]
    y = F.linear(z, cast(wo), cast(bo))
    return y + x if residual else y


def ultimus_reference_jvp(primals, tangents, residual: bool = True) -> Tensor:
    """Forward-mode derivative of the block (docs/ULTIMUS_MATH.md, "Forward mode"): the tangent of y for
    tangents of (x, wq, bq, ..., bo). `primals` and `tangents` are 9-sequences in the order of
    `ultimus_reference`'s arguments; a None tangent means zero. The fused backends' forward-mode AD
    uses this (see ops/autograd.py)."""
    x, wq, bq, wk, bk, wv, bv, wo, bo = primals
    tx, twq, tbq, twk, tbk, twv, tbv, two, tbo = tangents
    cast = lambda t: None if t is None else t.to(x.dtype)  # noqa: E731

    def project(w, b, tw, tb):
        value = F.linear(x, cast(w), cast(b))
        tangent = torch.zeros_like(value)
        if tx is not None:
            tangent = tangent + F.linear(tx, cast(w))
        if tw is not None:
            tangent = tangent + F.linear(x, cast(tw))
        if tb is not None:
            tangent = tangent + cast(tb)
        return value, tangent

    (q, tq), (k, tk), (v, tv) = project(wq, bq, twq, tbq), project(wk, bk, twk, tbk), project(wv, bv, twv, tbv)
    scale = 1.0 / math.sqrt(wq.shape[0])
    attn = torch.softmax(scale * q.unsqueeze(2) * k.unsqueeze(1), dim=2)
    t_scores = scale * (tq.unsqueeze(2) * k.unsqueeze(1) + q.unsqueeze(2) * tk.unsqueeze(1))
    t_attn = attn * (t_scores - (attn * t_scores).sum(2, keepdim=True))
    z = torch.einsum("bi,bij->bj", v, attn)
    tz = torch.einsum("bi,bij->bj", tv, attn) + torch.einsum("bi,bij->bj", v, t_attn)
    ty = F.linear(tz, cast(wo))
    if two is not None:
        ty = ty + F.linear(z, cast(two))
    if tbo is not None:
        ty = ty + cast(tbo)
    if residual and tx is not None:
        ty = ty + tx
    return ty


def ultimus_stack_reference(x: Tensor, params, residual: bool = True) -> Tensor:
    """A stack of blocks: `params` is a sequence of per-block (wq, bq, wk, bk, wv, bv, wo, bo), applied
    in order. What every fused stack kernel computes in one launch."""
    for block in params:
        x = ultimus_reference(x, *block, residual=residual)
    return x


def ultimus_stack_reference_jvp(primals, tangents, residual: bool = True) -> Tensor:
    """Forward-mode derivative of a stack: `primals` is (x, params) as for `ultimus_stack_reference`,
    `tangents` (tx, per-block tangents) in the same structure, None meaning zero. The chain rule, block
    by block: each block's tangent from its input's tangent and its own parameters'."""
    (x, params), (tx, tparams) = primals, tangents
    for block, tblock in zip(params, tparams):
        tx = ultimus_reference_jvp((x, *block), (tx, *tblock), residual=residual)
        x = ultimus_reference(x, *block, residual=residual)
    return tx
