"""Input validation shared by every backend, so that bad input gets the same clear error everywhere."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

# Largest sizes the fused kernels (Triton, C++, CUDA) accept: the per-sample state (q, k, v and one
# row of A, all length d, plus a row of x of length D) must fit in registers / shared memory.
MAX_DIM = 256
MAX_ATTN_DIM = 32


def _floating(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"ultimus: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"ultimus: {name} must be a floating-point tensor, got dtype {t.dtype}")


def _shape(name: str, t: Tensor, expected: Sequence[int], meaning: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"ultimus: {name} must have shape {tuple(expected)} ({meaning}), got {tuple(t.shape)}")


def check_inputs(
    x: Tensor,
    wq: Tensor,
    bq: Optional[Tensor],
    wk: Tensor,
    bk: Optional[Tensor],
    wv: Tensor,
    bv: Optional[Tensor],
    wo: Tensor,
    bo: Optional[Tensor],
) -> tuple[int, int]:
    """Validate the arguments of `ultimus` and return (D, d). Raises TypeError / ValueError."""
    _floating("x", x)
    if x.dim() != 2:
        raise ValueError(f"ultimus: x must be 2-D (B, D), got shape {tuple(x.shape)}")
    D = x.shape[1]
    _floating("wq", wq)
    if wq.dim() != 2:
        raise ValueError(f"ultimus: wq must be 2-D (d, D), got shape {tuple(wq.shape)}")
    d = wq.shape[0]
    if D < 1 or d < 1:
        raise ValueError(f"ultimus: D and d must be at least 1, got D={D}, d={d}")
    _shape("wq", wq, (d, D), "d, D with D = x.shape[1]")
    given = dict(bq=bq, wk=wk, bk=bk, wv=wv, bv=bv, wo=wo, bo=bo)
    for name, t in given.items():
        if t is None:
            if name.startswith("w"):
                raise TypeError(f"ultimus: {name} is required, got None")
            continue
        _floating(name, t)
    _shape("wk", wk, (d, D), "same as wq")
    _shape("wv", wv, (d, D), "same as wq")
    _shape("wo", wo, (D, d), "D, d: the output projection")
    for name, t in (("bq", bq), ("bk", bk), ("bv", bv)):
        if t is not None:
            _shape(name, t, (d,), "d")
    if bo is not None:
        _shape("bo", bo, (D,), "D")
    for name, t in dict(wq=wq, **given).items():
        if t is not None and t.device != x.device:
            raise ValueError(f"ultimus: all tensors must be on one device: x is on {x.device}, {name} on {t.device}")
    return D, d


def check_fused_limits(backend: str, D: int, d: int) -> None:
    """The fused kernels hold one sample's state on chip; past these sizes they refuse."""
    if D > MAX_DIM:
        raise ValueError(f"ultimus: backend '{backend}' supports D <= {MAX_DIM}, got D={D}; use backend='reference'")
    if d > MAX_ATTN_DIM:
        raise ValueError(
            f"ultimus: backend '{backend}' supports d <= {MAX_ATTN_DIM}, got d={d}; use backend='reference'"
        )
