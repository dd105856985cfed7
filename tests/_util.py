"""Helpers shared by the tests: random block parameters, relative error, backend lists."""

from __future__ import annotations

from typing import NamedTuple, Optional

import pytest
import torch

from ultimus_kernels import BACKEND_DEVICE, FUSED_BACKENDS, UltimusParams, ultimus_reference
from ultimus_kernels.dispatch import unavailable_reason

FUSED = FUSED_BACKENDS
# Where each fused backend is tested here: Triton runs through its interpreter when there is no GPU.
DEVICE_OF = {name: BACKEND_DEVICE[name] for name in FUSED}
if not torch.cuda.is_available():
    DEVICE_OF["triton"] = "cpu"


def rel_err(out: torch.Tensor, ref: torch.Tensor, scale: float = 0.0) -> float:
    """||out - ref|| / max(||ref||, scale), computed in float64. `scale` is for results that are sums
    whose terms cancel (see `per_sample_norms`): such a sum cannot be held to better than its terms."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(max(scale, 1e-300))).item()


def assert_rel_close(
    out: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "result", scale: float = 0.0
) -> None:
    """rel_err(out, ref, scale) <= tol, or a message that says where the worst element is and its values."""
    err = rel_err(out, ref, scale)
    if err <= tol:
        return
    diff = (out.double() - ref.double()).abs()
    flat = int(torch.nan_to_num(diff, nan=float("inf")).argmax())
    where = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape)) if diff.dim() else ()
    raise AssertionError(
        f"{what}: relative error {err:.3e} > {tol:.1e}; worst at index {where}: "
        f"{out.reshape(-1)[flat].item()!r} vs {ref.reshape(-1)[flat].item()!r}"
    )


class Inputs(NamedTuple):
    """x and one block's parameters, in `ultimus`'s argument order: `ultimus(*inputs)`, `inputs.wo`."""

    x: torch.Tensor
    wq: torch.Tensor
    bq: Optional[torch.Tensor]
    wk: torch.Tensor
    bk: Optional[torch.Tensor]
    wv: torch.Tensor
    bv: Optional[torch.Tensor]
    wo: torch.Tensor
    bo: Optional[torch.Tensor]

    @property
    def params(self) -> UltimusParams:
        return UltimusParams(*self[1:])

    def tensors(self) -> list:
        """The tensors present (absent biases left out): what to differentiate with respect to."""
        return [t for t in self if t is not None]


def make_inputs(B, D, d, dtype=torch.float64, device="cpu", bias=True, logit_scale=1.0, requires_grad=True) -> Inputs:
    """Fresh random x and parameters in nn.Linear layouts, scaled like nn.Linear's initialisation;
    `logit_scale` multiplies Wq and Wk (and bq, bk) to push the attention logits up."""
    g = lambda *shape, s=1.0: torch.randn(*shape, dtype=torch.float64) * s  # noqa: E731
    x = g(B, D)
    wq, wk = g(d, D, s=logit_scale / D**0.5), g(d, D, s=logit_scale / D**0.5)
    wv, wo = g(d, D, s=1 / D**0.5), g(D, d, s=1 / d**0.5)
    bq, bk = (g(d, s=0.5 * logit_scale), g(d, s=0.5 * logit_scale)) if bias else (None, None)
    bv, bo = (g(d, s=0.5), g(D, s=0.5)) if bias else (None, None)
    tensors = [x, wq, bq, wk, bk, wv, bv, wo, bo]
    out = []
    for t in tensors:
        if t is not None:
            t = t.to(dtype=dtype, device=device)
            t.requires_grad_(requires_grad)
        out.append(t)
    return Inputs(*out)


def per_sample_norms(inputs: Inputs, grad_out: torch.Tensor, residual: bool = True) -> list:
    """For each tensor of `inputs.tensors()`, sqrt(sum_b ||g_b||^2) where g_b is sample b's term in its
    gradient (the reference, in float64). A weight gradient is a sum of B such terms; when they cancel,
    the sum is small while every rounding in the terms is not, so no float32 kernel (the float32
    reference included) can be held to a tolerance relative to the sum alone. Their random-walk scale,
    this norm, is what the sum's rounding error grows with. For x, whose gradient is per sample, it is
    ||g_x|| itself, so the scale changes nothing there."""
    detached = Inputs(*(None if t is None else t.detach().double() for t in inputs))
    names = [n for n, t in zip(Inputs._fields[1:], detached[1:]) if t is not None]

    def sample_loss(params, x_b, gy_b):
        y_b = ultimus_reference(*detached._replace(x=x_b[None], **params), residual=residual)[0]
        return (y_b * gy_b).sum()

    params = {n: getattr(detached, n) for n in names}
    per_sample = torch.func.vmap(torch.func.grad(sample_loss, argnums=(0, 1)), in_dims=(None, 0, 0))(
        params, detached.x, grad_out.detach().double()
    )
    grads, grad_x = per_sample
    return [grad_x.norm().item()] + [grads[n].norm().item() for n in names]


def backend_or_skip(backend: str) -> torch.device:
    """The device a fused backend runs on here; skips when the hardware is absent."""
    device = torch.device(DEVICE_OF[backend])
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    why = unavailable_reason(backend, device)
    if why is not None:
        pytest.skip(f"backend '{backend}' unavailable: {why}")
    return device


def gpu_backend_or_skip(backend: str) -> torch.device:
    """Like backend_or_skip, for tests that need the backend on a real GPU (not the interpreter)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return backend_or_skip(backend)


__all__ = [
    "FUSED",
    "Inputs",
    "assert_rel_close",
    "backend_or_skip",
    "gpu_backend_or_skip",
    "make_inputs",
    "per_sample_norms",
    "rel_err",
]
