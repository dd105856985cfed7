"""Input validation shared by every backend and every raw op, so that bad input gets the same clear
error everywhere. The C++ ops carry a mirror of these checks (csrc/ultimus.h) with the same messages.

`check_inputs` is on the hot path of every call: it first asks one cheap question (is everything
exactly right?) and only when the answer is no walks the arguments again to say what is wrong.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Optional

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor

# Largest sizes the fused kernels (Triton, C++, CUDA) accept: the per-sample state (q, k, v and one
# row of A, all length d, plus a row of x of length D) must fit in registers / shared memory.
MAX_DIM = 256
MAX_ATTN_DIM = 32

# The dtypes of the contract. float8 types are floating point too, but no backend computes them
# correctly (the reference has no float8 matmul; a fused kernel would upcast silently): refused.
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_SUPPORTED = frozenset(SUPPORTED_DTYPES)
_DTYPE_NAMES = ", ".join(str(t).replace("torch.", "") for t in SUPPORTED_DTYPES)

PARAM_NAMES = ("wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo")


class UltimusParams(NamedTuple):
    """One block's parameters in nn.Linear layouts, in the order of `ultimus`'s arguments (biases may
    be None): `ultimus(x, *params)`. The flat list is kept only where an op schema needs it."""

    wq: Tensor
    bq: Optional[Tensor]
    wk: Tensor
    bk: Optional[Tensor]
    wv: Tensor
    bv: Optional[Tensor]
    wo: Tensor
    bo: Optional[Tensor]

    @classmethod
    def of(cls, block) -> "UltimusParams":
        """The parameters of an UltimusBlock (its q, k, v and out Linears)."""
        return cls(
            block.q.weight,
            block.q.bias,
            block.k.weight,
            block.k.bias,
            block.v.weight,
            block.v.bias,
            block.out.weight,
            block.out.bias,
        )


def check_inputs(x: Tensor, *params: Optional[Tensor]) -> tuple[int, int]:
    """Validate the arguments of `ultimus`, x and (wq, bq, wk, bk, wv, bv, wo, bo), and return (D, d).
    Raises TypeError / ValueError."""
    if len(params) != len(PARAM_NAMES):
        raise TypeError(
            f"ultimus: expected the {len(PARAM_NAMES)} parameters {', '.join(PARAM_NAMES)}, got {len(params)}"
        )
    wq, bq, wk, bk, wv, bv, wo, bo = params
    try:  # the fast path: one pass of cheap comparisons, no message built
        D, d, device = x.shape[1], wq.shape[0], x.device
        wshape, bshape = (d, D), (d,)
        ok = (
            x.dim() == 2
            and x.dtype in _SUPPORTED
            and D >= 1
            and d >= 1
            and wq.shape == wshape
            and wk.shape == wshape
            and wv.shape == wshape
            and wo.shape == (D, d)
            and wq.dtype in _SUPPORTED
            and wk.dtype in _SUPPORTED
            and wv.dtype in _SUPPORTED
            and wo.dtype in _SUPPORTED
            and wq.device == device
            and wk.device == device
            and wv.device == device
            and wo.device == device
            and (bq is None or (bq.shape == bshape and bq.dtype in _SUPPORTED and bq.device == device))
            and (bk is None or (bk.shape == bshape and bk.dtype in _SUPPORTED and bk.device == device))
            and (bv is None or (bv.shape == bshape and bv.dtype in _SUPPORTED and bv.device == device))
            and (bo is None or (bo.shape == (D,) and bo.dtype in _SUPPORTED and bo.device == device))
        )
    except (AttributeError, IndexError, TypeError):
        ok = False
    if not ok:
        _explain(x, dict(zip(PARAM_NAMES, params)))
    return D, d


def _dtype(name: str, t) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"ultimus: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _SUPPORTED:
        kind = "a floating-point tensor" if not t.is_floating_point() else f"one of {_DTYPE_NAMES}"
        raise TypeError(f"ultimus: {name} must be {kind} (supported: {_DTYPE_NAMES}), got dtype {t.dtype}")


def _shape(name: str, t: Tensor, expected: Sequence[int], meaning: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"ultimus: {name} must have shape {tuple(expected)} ({meaning}), got {tuple(t.shape)}")


def _explain(x, params: dict) -> None:
    """The slow path of check_inputs: raise the error that names what is wrong."""
    _dtype("x", x)
    if x.dim() != 2:
        raise ValueError(f"ultimus: x must be 2-D (B, D), got shape {tuple(x.shape)}")
    D = x.shape[1]
    wq = params["wq"]
    _dtype("wq", wq)
    if wq.dim() != 2:
        raise ValueError(f"ultimus: wq must be 2-D (d, D), got shape {tuple(wq.shape)}")
    d = wq.shape[0]
    if D < 1 or d < 1:
        raise ValueError(f"ultimus: D and d must be at least 1, got D={D}, d={d}")
    for name, t in params.items():
        if t is None:
            if name.startswith("w"):
                raise TypeError(f"ultimus: {name} is required, got None")
            continue
        _dtype(name, t)
    _shape("wq", wq, (d, D), "d, D with D = x.shape[1]")
    _shape("wk", params["wk"], (d, D), "same as wq")
    _shape("wv", params["wv"], (d, D), "same as wq")
    _shape("wo", params["wo"], (D, d), "D, d: the output projection")
    for name in ("bq", "bk", "bv"):
        if params[name] is not None:
            _shape(name, params[name], (d,), "d")
    if params["bo"] is not None:
        _shape("bo", params["bo"], (D,), "D")
    for name, t in params.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"ultimus: all tensors must be on one device: x is on {x.device}, {name} on {t.device}")
    raise AssertionError("ultimus: check_inputs refused arguments that _explain finds valid")  # pragma: no cover


def check_residual(residual) -> None:
    """`residual` is a flag: a bool, not anything truthy (the string 'no' is truthy)."""
    if not isinstance(residual, bool):
        raise TypeError(f"ultimus: residual must be a bool, got {type(residual).__name__} {residual!r}")


def check_fused_limits(backend: str, D: int, d: int) -> None:
    """The fused kernels hold one sample's state on chip; past these sizes they refuse."""
    if D > MAX_DIM:
        raise ValueError(f"ultimus: backend '{backend}' supports D <= {MAX_DIM}, got D={D}; use backend='reference'")
    if d > MAX_ATTN_DIM:
        raise ValueError(
            f"ultimus: backend '{backend}' supports d <= {MAX_ATTN_DIM}, got d={d}; use backend='reference'"
        )


def check_grad_output(gy: Tensor, x: Tensor) -> None:
    """The bwd ops' incoming gradient: a tensor of x's shape on x's device, of any floating dtype (every
    backend reads it rounded to x's dtype, which autograd's always has)."""
    _dtype("gy", gy)
    if gy.shape != x.shape:
        raise ValueError(f"ultimus: gy must have x's shape {tuple(x.shape)}, got {tuple(gy.shape)}")
    if gy.device != x.device:
        raise ValueError(f"ultimus: all tensors must be on one device: x is on {x.device}, gy on {gy.device}")


def refuse_forward_ad(op: str, tensors) -> None:
    """A raw op reached with forward-mode tangents would drop them silently: refuse instead. (The public
    `ultimus` routes forward-mode AD through UltimusFunction, which has the rule.)"""
    if forward_ad._current_level >= 0 and any(
        t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors
    ):
        raise RuntimeError(
            f"ultimus: {op} has no forward-mode AD rule; call ultimus_kernels.ultimus (or "
            "UltimusBlock), whose UltimusFunction implements it"
        )


def check_bias_flag(bias) -> None:
    if not isinstance(bias, bool):
        raise TypeError(f"ultimus: bias must be a bool, got {type(bias).__name__} {bias!r}")


def _in_block(index: int, check, *args):
    """`check(*args)`, with "block <index>" in the message of what it raises: a stack's errors say where."""
    try:
        return check(*args)
    except (TypeError, ValueError) as exc:
        raise type(exc)(str(exc).replace("ultimus: ", f"ultimus: block {index}: ", 1)) from None


def _same_attn_dim(index: int, d: int, d0: int) -> None:
    if d != d0:
        raise ValueError(
            f"ultimus: block {index} has d={d} but block 0 has d={d0}: every block of a stack must have the "
            "same attention width"
        )


def _check_x(x) -> None:
    """x alone (a stack checks it once, before its blocks)."""
    _dtype("x", x)
    if x.dim() != 2:
        raise ValueError(f"ultimus: x must be 2-D (B, D), got shape {tuple(x.shape)}")


def check_stack_inputs(x: Tensor, params) -> tuple[int, int, int, list, bool]:
    """Validate the arguments of `ultimus_stack`: x and a sequence of per-block (wq, bq, ..., bo).
    Returns (L, D, d, flat, bias): the tensors in the stack ops' flat order (every block's eight when
    `bias`, else its four weights), with zeros for the absent biases of a stack that mixes them."""
    if isinstance(params, Tensor) or not isinstance(params, Sequence):
        raise TypeError(
            "ultimus: params must be a sequence of per-block (wq, bq, wk, bk, wv, bv, wo, bo), got "
            f"{type(params).__name__}"
        )
    _check_x(x)
    D, d = x.shape[1], 0
    for index, block in enumerate(params):
        if isinstance(block, Tensor) or not isinstance(block, Sequence):
            raise TypeError(
                f"ultimus: block {index}: expected the {len(PARAM_NAMES)} parameters {', '.join(PARAM_NAMES)}, "
                f"got {type(block).__name__}"
            )
        D, d_block = _in_block(index, check_inputs, x, *block)
        _same_attn_dim(index, d_block, d if index else d_block)
        d = d_block
    biases = [b for block in params for b in block[1::2]]
    bias = any(b is not None for b in biases)
    if not bias:
        flat = [w for block in params for w in block[0::2]]
    elif all(b is not None for b in biases):
        flat = [t for block in params for t in block]
    else:  # some biases absent: zeros in their place, which nothing differentiates
        flat = [
            t if t is not None else block[i - 1].new_zeros(block[i - 1].shape[0])
            for block in params
            for i, t in enumerate(block)
        ]
    return len(params), D, d, flat, bias


def check_stack_op_inputs(backend: str, x, params, bias, residual) -> tuple[int, int, int]:
    """What a raw stack op checks before it touches memory: `params` is the flat list, eight tensors per
    block (wq, bq, wk, bk, wv, bv, wo, bo) when `bias`, else four (wq, wk, wv, wo). Returns (L, D, d)."""
    check_bias_flag(bias)
    check_residual(residual)
    _check_x(x)
    per = 8 if bias else 4
    names = PARAM_NAMES if bias else PARAM_NAMES[0::2]
    if len(params) == 0 or len(params) % per:
        raise ValueError(f"ultimus: params must hold {per} tensors per block ({', '.join(names)}), got {len(params)}")
    L, d0 = len(params) // per, 0
    for index in range(L):
        block = list(params[index * per : (index + 1) * per])
        if not bias:
            block = [block[0], None, block[1], None, block[2], None, block[3], None]
        D, d = _in_block(index, check_inputs, x, *block)
        _same_attn_dim(index, d, d0 if index else d)
        d0 = d
    check_fused_limits(backend, D, d0)
    return L, D, d0


def check_op_inputs(backend: str, x, wq, bq, wk, bk, wv, bv, wo, bo, residual) -> tuple[int, int]:
    """Everything a raw fused op must check before it touches memory: the public checks, the flag and
    the size limits. Used by the Triton ops and by the fake (meta) implementations of every op."""
    D, d = check_inputs(x, wq, bq, wk, bk, wv, bv, wo, bo)
    check_residual(residual)
    check_fused_limits(backend, D, d)
    return D, d
