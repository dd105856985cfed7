"""`ultimus(...)`: validate once, pick a backend, run it. `available_backends`: what runs where."""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from .checks import MAX_ATTN_DIM, MAX_DIM, check_fused_limits, check_inputs
from .reference import ultimus_reference

BACKENDS = ("reference", "triton", "cpu", "cuda")
# "auto" takes the first backend in this order that runs on x's device and accepts the sizes.
# Fastest first, as measured in bench/results (on an H100 the CUDA kernel is ahead of Triton at every B).
AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}

DeviceLike = Union[str, torch.device, None]


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


def resolve_backend(backend: str, device: torch.device, D: int, d: int) -> str:
    """Turn "auto" into a concrete backend; check that a named one can run. Raises RuntimeError."""
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
    None. Per sample: q, k, v = projections of x; A[i, j] = softmax_j(q[i] k[j] / sqrt(d));
    z = V . A; y = Wo z + bo (+ x if residual). Weights may be in another floating dtype than x
    (fp32 master weights with half activations): fused kernels compute in fp32 (fp64 for fp64 x),
    the reference casts the weights to x's dtype. `backend`: "auto", "reference", "triton", "cpu",
    "cuda"; see `available_backends()`.
    """
    D, d = check_inputs(x, wq, bq, wk, bk, wv, bv, wo, bo)
    name = resolve_backend(backend, x.device, D, d)
    args = (x, wq, bq, wk, bk, wv, bv, wo, bo)
    if name == "reference":
        return ultimus_reference(*args, residual=residual)
    if name == "triton":
        from .ops.ultimus_triton import ultimus_triton

        return ultimus_triton(*args, residual=residual)
    from .ops.ultimus_cpp import ultimus_cpp

    return ultimus_cpp(*args, residual=residual)
