"""Helpers shared by the tests: random block parameters, relative error, backend lists."""

from __future__ import annotations

from typing import NamedTuple, Optional

import pytest
import torch

from ultimus_kernels import BACKEND_DEVICE, FUSED_BACKENDS, UltimusParams
from ultimus_kernels.dispatch import unavailable_reason

FUSED = FUSED_BACKENDS
# Where each fused backend is tested here: Triton runs through its interpreter when there is no GPU.
DEVICE_OF = {name: BACKEND_DEVICE[name] for name in FUSED}
if not torch.cuda.is_available():
    DEVICE_OF["triton"] = "cpu"


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, computed in float64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def assert_rel_close(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "result") -> None:
    """rel_err(out, ref) <= tol, or a message that says where the worst element is and its values."""
    err = rel_err(out, ref)
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


__all__ = ["FUSED", "Inputs", "assert_rel_close", "backend_or_skip", "gpu_backend_or_skip", "make_inputs", "rel_err"]
