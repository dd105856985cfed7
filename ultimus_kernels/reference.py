"""The Ultimus block, written once in plain PyTorch: the definition every kernel is checked against.

Per sample x in R^D, with attention width d and scale s = 1/sqrt(d):

    q = Wq x + bq,  k = Wk x + bk,  v = Wv x + bv        (each in R^d)
    A[i, j] = softmax_j(s * q[i] * k[j])                 (d x d: the outer product Q^T K)
    z[j] = sum_i v[i] * A[i, j]                          (Z = V . A)
    y = Wo z + bo  (+ x when residual)                   (R^D)

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
