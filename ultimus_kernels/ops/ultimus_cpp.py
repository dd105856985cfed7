"""Python side of the compiled extensions: loading, fake (meta) implementations, autograd.

The C++ sources live in csrc/: `ultimus_kernels._C` (CPU kernels; defines the ops
`torch.ops.ultimus_ext.fwd` / `.bwd`) and `ultimus_kernels._C_cuda` (their CUDA kernels). Both are
built by `pip install -e .` when possible; see setup.py for the switches.
"""
from __future__ import annotations

import json
from importlib import import_module
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from .autograd import register_fused_autograd

_BUILD_INFO = Path(__file__).resolve().parent.parent / "_build_info.json"
_load_errors: dict[str, Optional[str]] = {}


def _build_note(short: str) -> str:
    try:
        note = json.loads(_BUILD_INFO.read_text()).get(short)
    except (OSError, ValueError):
        note = None
    return f"at install time: {note}" if note else "not built (reinstall with `pip install -e .`; see README)"


def _load(short: str) -> Optional[str]:
    """Import ultimus_kernels.<short> once; None on success, else why it is not usable."""
    if short not in _load_errors:
        try:
            import_module(f"ultimus_kernels.{short}")
            _load_errors[short] = None
            if short == "_C":
                _register()
        except ImportError as exc:
            missing = "No module named" in str(exc)
            _load_errors[short] = (_build_note(short) if missing else
                                   f"the compiled extension failed to load ({exc}); it was probably built against "
                                   "another torch: reinstall with `pip install -e . --no-build-isolation`")
    return _load_errors[short]


def unavailable_reason(backend: str, device: torch.device) -> Optional[str]:
    if backend == "cpu":
        if device.type != "cpu":
            return f"the 'cpu' backend runs on CPU tensors, not {device.type}"
        return _load("_C")
    if backend == "cuda":
        if device.type != "cuda":
            return f"the 'cuda' backend runs on CUDA tensors, not {device.type}"
        if not torch.cuda.is_available():
            return "no CUDA device is available"
        return _load("_C") or _load("_C_cuda")
    raise ValueError(backend)


_registered = False


def _register() -> None:
    """Fake implementations (for torch.compile and opcheck) and autograd for the C++ ops; once."""
    global _registered
    if _registered:
        return

    @torch.library.register_fake("ultimus_ext::fwd")
    def _fwd_fake(x, wq, bq, wk, bk, wv, bv, wo, bo, residual):
        return x.new_empty(x.shape)

    @torch.library.register_fake("ultimus_ext::bwd")
    def _bwd_fake(gy, x, wq, bq, wk, bk, wv, bv, wo, bo, residual, need_gx, need_gw):
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        D, d = x.shape[1], wq.shape[0]
        gx = x.new_empty(x.shape if need_gx else (0,))
        shapes = [(d, D), (d,)] * 3 + [(D, d), (D,)]
        return gx, *(x.new_empty(s if need_gw else (0,), dtype=acc) for s in shapes)

    register_fused_autograd("ultimus_ext::fwd", torch.ops.ultimus_ext.bwd.default)
    _registered = True


def ultimus_cpp(x, wq, bq, wk, bk, wv, bv, wo, bo, residual: bool = True) -> Tensor:
    """Differentiable fused Ultimus block on the compiled CPU / CUDA kernels (validated inputs)."""
    _register()
    return torch.ops.ultimus_ext.fwd(x, wq, bq, wk, bk, wv, bv, wo, bo, residual)
