"""`ultimus(...)`: validate, pick a backend, run it. `available_backends`: what runs where.

The fused backends' ops are loaded and registered when the package is imported (`load_backends`),
so that nothing on the call path imports or probes: the hot path is one cheap check, one dict
lookup and the op (or `UltimusFunction.apply`).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor

from .checks import MAX_ATTN_DIM, MAX_DIM, check_fused_limits, check_inputs, check_residual, check_stack_inputs
from .ops.autograd import FUSED_OPS, UltimusFunction, UltimusStackFunction, UltimusTransformFunction, unflatten_stack
from .reference import ultimus_reference, ultimus_stack_reference

BACKENDS = ("reference", "triton", "cpu", "cuda")
FUSED_BACKENDS = ("triton", "cpu", "cuda")
# The device type each backend runs on ("triton" also on the CPU, through Triton's interpreter, for tests).
BACKEND_DEVICE = {"reference": None, "triton": "cuda", "cpu": "cpu", "cuda": "cuda"}
# "auto" takes the first backend in this order that runs on x's device and accepts the sizes.
# Fastest first, as measured in bench/results (on an H100 the CUDA kernel is ahead of Triton at every B).
AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}

DeviceLike = Union[str, torch.device, None]

_triton_error: Optional[str] = "not loaded yet"


def load_backends() -> None:
    """Load the compiled extensions and the Triton kernels and register their ops; never raises (a
    backend that cannot load reports why through `unavailable_reason`). Runs on `import ultimus_kernels`."""
    global _triton_error
    from .ops import ultimus_cpp

    ultimus_cpp.load()
    try:
        from .ops import ultimus_triton  # noqa: F401  (registers the ultimus_triton ops)

        _triton_error = None
    except Exception as exc:  # triton missing (it is a dependency on Linux only) or broken
        _triton_error = f"triton could not be imported: {exc}"


def _as_device(device: DeviceLike) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def unavailable_reason(backend: str, device: DeviceLike = None) -> Optional[str]:
    """None when `backend` runs on `device`, else a sentence saying why it does not."""
    device = _as_device(device)
    if backend == "reference":
        return None
    if backend == "triton":
        if _triton_error is not None:
            return _triton_error
        from .ops import ultimus_triton

        return ultimus_triton.unavailable_reason(device)
    if backend in ("cpu", "cuda"):
        from .ops import ultimus_cpp

        return ultimus_cpp.unavailable_reason(backend, device)
    raise ValueError(f"ultimus: unknown backend '{backend}'; choose one of {('auto',) + BACKENDS}")


def backend_report(device: DeviceLike = None) -> dict[str, Optional[str]]:
    """{backend: None if it runs on `device`, else the reason it does not}."""
    return {name: unavailable_reason(name, device) for name in BACKENDS}


def available_backends(device: DeviceLike = None) -> list[str]:
    """The backends that run on `device` (default: CUDA if available, else CPU)."""
    return [name for name, why in backend_report(device).items() if why is None]


# (backend, device, D, d) -> concrete backend; only successful resolutions are cached (errors are
# not on the hot path, and are raised afresh every time).
_resolved: dict[tuple, str] = {}


def resolve_backend(backend: str, device: torch.device, D: int, d: int) -> str:
    """Turn "auto" into a concrete backend; check that a named one can run. Raises RuntimeError."""
    key = (backend, device, D, d)
    name = _resolved.get(key)
    if name is None:
        name = _resolve(backend, device, D, d)
        _resolved[key] = name
    return name


def _resolve(backend: str, device: torch.device, D: int, d: int) -> str:
    if backend == "auto":
        for name in AUTO_ORDER.get(device.type, ("reference",)):
            if name != "reference" and (D > MAX_DIM or d > MAX_ATTN_DIM):
                continue  # past the fused kernels' limits
            if unavailable_reason(name, device) is None:
                return name
        return "reference"
    why = unavailable_reason(backend, device)
    if why is not None:
        raise RuntimeError(f"ultimus: backend '{backend}' is unavailable on {device}: {why}")
    if backend != "reference":
        check_fused_limits(backend, D, d)
    return backend


def ultimus(
    x: Tensor,
    wq: Tensor,
    bq: Optional[Tensor],
    wk: Tensor,
    bk: Optional[Tensor],
    wv: Tensor,
    bv: Optional[Tensor],
    wo: Tensor,
    bo: Optional[Tensor],
    *,
    residual: bool = True,
    backend: str = "auto",
) -> Tensor:
    """The Ultimus attention block on a batch x of shape (B, D); returns (B, D) in x's dtype.

    Weights in nn.Linear layouts: wq, wk, wv (d, D) with biases (d,) or None; wo (D, d), bo (D,) or
    None. The math: README "The block". Weights may be in another floating dtype than x (fp32 master
    weights with half activations): fused kernels compute in fp32 (fp64 for fp64 x), the reference
    casts the weights to x's dtype. `backend`: "auto", "reference", "triton", "cpu", "cuda"; see
    `available_backends()`.
    """
    check_residual(residual)
    compiling = torch.compiler.is_compiling()
    if not compiling and forward_ad._current_level < 0 and not torch._C._are_functorch_transforms_active():
        ops = _native_ops(backend, x, wq)
        if ops is not None:
            try:
                return ops.fwd(x, wq, bq, wk, bk, wv, bv, wo, bo, residual)
            except (TypeError, RuntimeError):
                check_inputs(x, wq, bq, wk, bk, wv, bv, wo, bo)
                raise
    if compiling:  # the fused ops' fake implementations check at trace time
        D, d = x.shape[1], wq.shape[0]
    else:
        D, d = check_inputs(x, wq, bq, wk, bk, wv, bv, wo, bo)
    name = resolve_backend(backend, x.device, D, d)
    if name == "reference":
        return ultimus_reference(x, wq, bq, wk, bk, wv, bv, wo, bo, residual=residual)
    # The cheapest autograd boundary that supports what is being asked (see ops/autograd.py).
    ops = FUSED_OPS[name]
    if compiling:  # torch.compile traces the op and its registered autograd
        return ops.fwd(x, wq, bq, wk, bk, wv, bv, wo, bo, residual)
    if torch._C._are_functorch_transforms_active():
        return UltimusTransformFunction.apply(name, residual, x, wq, bq, wk, bk, wv, bv, wo, bo)
    if ops.native_autograd and forward_ad._current_level < 0:  # no forward-mode AD in progress
        return ops.fwd(x, wq, bq, wk, bk, wv, bv, wo, bo, residual)
    return UltimusFunction.apply(name, residual, x, wq, bq, wk, bk, wv, bv, wo, bo)


def _native_ops(backend: str, x, wq):
    """The hot path's ops: those of a C++ backend (cpu, cuda) that `backend` has already resolved to for
    x's device and sizes, else None. The C++ ops check every input themselves, with check_inputs's
    messages word for word, so such a call skips the Python check (a few us per block, as much as the
    CPU kernel at B = 1); the Python check runs only to name what the op refused in its own terms (an
    argument that is not a tensor, say)."""
    try:
        ops = FUSED_OPS.get(_resolved.get((backend, x.device, x.shape[1], wq.shape[0])))
    except (AttributeError, IndexError, TypeError):  # not tensors, or x or wq of too few dimensions
        return None
    return ops if ops is not None and ops.native_autograd else None


def ultimus_stack(x: Tensor, params, *, residual: bool = True, backend: str = "auto") -> Tensor:
    """A stack of Ultimus blocks applied in order, in one fused launch forward and one backward.

    `params` is a sequence of per-block (wq, bq, wk, bk, wv, bv, wo, bo) in `ultimus`'s layouts (an
    `UltimusParams` each, say; biases may be None); every block has x's D and the same d. Equal to
    applying `ultimus` block after block, with the same checks, dtypes and limits. An empty stack
    returns x. On a fused backend the activations between blocks stay on chip, and the backward
    recomputes them from x. The "reference" backend is the plain loop.
    """
    check_residual(residual)
    compiling = torch.compiler.is_compiling()
    if not compiling and forward_ad._current_level < 0 and not torch._C._are_functorch_transforms_active():
        # The hot path (see _native_ops): every block's eight tensors, biases included, to a C++ stack op.
        ops = _native_ops(backend, x, params[0][0]) if isinstance(params, (list, tuple)) and params else None
        if ops is not None and all(isinstance(b, (list, tuple)) and len(b) == 8 for b in params):
            flat = [t for block in params for t in block]
            if not any(t is None for t in flat):
                try:
                    return ops.stack_fwd(x, flat, True, residual)
                except (TypeError, RuntimeError):
                    check_stack_inputs(x, params)
                    raise
    if compiling:  # the fused ops' fake implementations check at trace time
        L, D = len(params), x.shape[1]
        d = params[0][0].shape[0] if L else 0
        bias = any(t is not None for block in params for t in block[1::2])
        flat = [t for block in params for t in (block if bias else block[0::2])] if L else []
        if bias and any(t is None for t in flat):
            L, D, d, flat, bias = check_stack_inputs(x, params)
    else:
        L, D, d, flat, bias = check_stack_inputs(x, params)
    if L == 0:
        return x
    name = resolve_backend(backend, x.device, D, d)
    if name == "reference":
        return ultimus_stack_reference(x, params, residual=residual)
    ops = FUSED_OPS[name]
    if compiling:
        return ops.stack_fwd(x, flat, bias, residual)
    if torch._C._are_functorch_transforms_active():  # torch.func: block by block, through their rules
        for block in unflatten_stack(flat, bias):
            x = ultimus(x, *block, residual=residual, backend=name)
        return x
    if ops.native_autograd and forward_ad._current_level < 0:  # no forward-mode AD in progress
        return ops.stack_fwd(x, flat, bias, residual)
    return UltimusStackFunction.apply(name, bias, residual, x, *flat)
