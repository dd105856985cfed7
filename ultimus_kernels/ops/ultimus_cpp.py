"""Python side of the compiled extensions: loading, fake (meta) implementations, autograd.

The C++ sources live in csrc/: `ultimus_kernels._C` (CPU kernels; defines the ops
`torch.ops.ultimus_ext.fwd` / `.bwd`) and `ultimus_kernels._C_cuda` (their CUDA kernels). Both are
built by `pip install -e .` when possible; see setup.py for the switches. `load()` runs when
`ultimus_kernels` is imported: it imports whichever extensions were built (never failing) and
registers the ops' fakes, vmap rules and double backward (their autograd is C++), so that a fresh
process can call, compile, export or load the raw ops without touching the public API first.
"""

from __future__ import annotations

import json
from importlib import import_module
from pathlib import Path
from typing import Optional

import torch

from .autograd import (
    fake_bwd,
    fake_fwd,
    fake_stack_bwd,
    fake_stack_fwd,
    register_differentiable_backward,
    register_fused_ops,
)

_BUILD_INFO = Path(__file__).resolve().parent.parent / "_build_info.json"
_load_errors: dict[str, Optional[str]] = {}


def _build_note(short: str) -> str:
    try:
        note = json.loads(_BUILD_INFO.read_text()).get(short)
    except (OSError, ValueError):
        note = None
    return f"at install time: {note}" if note else "not built (reinstall with `pip install -e .`; see README)"


def _import(short: str) -> Optional[str]:
    """Import ultimus_kernels.<short>; None on success, else why it is not usable."""
    try:
        import_module(f"ultimus_kernels.{short}")
        return None
    except ImportError as exc:
        if "No module named" in str(exc):
            return _build_note(short)
        return (
            f"the compiled extension failed to load ({exc}); it was probably built against another torch: "
            "reinstall with `pip install -e . --no-build-isolation`"
        )


def load() -> None:
    """Import the built extensions and register what the ops need from Python; once, never raising."""
    if _load_errors:
        return
    _load_errors["_C"] = _import("_C")
    _load_errors["_C_cuda"] = _import("_C_cuda") if _load_errors["_C"] is None else "needs ultimus_kernels._C"
    if _load_errors["_C"] is None:
        for name, fake in (
            ("fwd", fake_fwd),
            ("bwd", fake_bwd),
            ("stack_fwd", fake_stack_fwd),
            ("stack_bwd", fake_stack_bwd),
        ):
            torch.library.register_fake(f"ultimus_ext::{name}")(fake)
        ops = torch.ops.ultimus_ext
        fwd, bwd, stack_fwd, stack_bwd = (
            getattr(ops, name).default for name in ("fwd", "bwd", "stack_fwd", "stack_bwd")
        )
        # autograd: csrc/ultimus_ops.cpp
        register_fused_ops(
            ("cpu", "cuda"), fwd, bwd, native_autograd=True, stack_fwd_op=stack_fwd, stack_bwd_op=stack_bwd
        )
        register_differentiable_backward("ultimus_ext", bwd, stack_bwd)


def unavailable_reason(backend: str, device: torch.device) -> Optional[str]:
    load()
    if backend == "cpu":
        if device.type != "cpu":
            return f"the 'cpu' backend runs on CPU tensors, not {device.type}"
        return _load_errors["_C"]
    if backend == "cuda":
        if device.type != "cuda":
            return f"the 'cuda' backend runs on CUDA tensors, not {device.type}"
        if not torch.cuda.is_available():
            return "no CUDA device is available"
        return _load_errors["_C"] or _load_errors["_C_cuda"]
    raise ValueError(backend)
