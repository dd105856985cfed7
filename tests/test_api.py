"""The public contract: argument checking, backend selection, the module, the extension build."""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ultimus_kernels
from _util import make_inputs
from ultimus_kernels import (
    BACKENDS,
    MAX_ATTN_DIM,
    MAX_DIM,
    UltimusBlock,
    UltimusParams,
    available_backends,
    ultimus,
    ultimus_reference,
)
from ultimus_kernels.dispatch import resolve_backend

GOOD = dict(B=4, D=12, d=3)


def good_args():
    return make_inputs(GOOD["B"], GOOD["D"], GOOD["d"], dtype=torch.float32, requires_grad=False)


def call(args, **kw):
    return ultimus(*args, backend=kw.pop("backend", "reference"), **kw)


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_good_call_returns_b_by_d_in_x_dtype(backend):
    y = call(good_args(), backend=backend)
    assert y.shape == (4, 12) and y.dtype == torch.float32


NAMES = ("x", "wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo")

# case: (argument, its bad value as a function of the good ones, exception, message)
BAD_INPUT = {
    "x 1-D": ("x", lambda a: a["x"][0], ValueError, "x must be 2-D"),
    "x 3-D": ("x", lambda a: a["x"].unsqueeze(0), ValueError, "x must be 2-D"),
    "x integer": ("x", lambda a: torch.ones(4, 12, dtype=torch.int64), TypeError, "floating-point"),
    "x of another width": ("x", lambda a: torch.randn(4, 13), ValueError, r"wq must have shape \(3, 13\)"),
    "x not a tensor": ("x", lambda a: [[1.0] * 12] * 4, TypeError, "x must be a torch.Tensor"),
    "x complex": ("x", lambda a: a["x"].to(torch.complex64), TypeError, "x must be a floating-point"),
    "x float8": ("x", lambda a: a["x"].to(torch.float8_e4m3fn), TypeError, "x must be one of float32"),
    "wq integer": ("wq", lambda a: a["wq"].int(), TypeError, "wq must be a floating-point"),
    "wq empty": ("wq", lambda a: torch.randn(0, 12), ValueError, "at least 1"),
    "wk too tall": ("wk", lambda a: torch.randn(4, 12), ValueError, "wk must have shape"),
    "wv too narrow": ("wv", lambda a: torch.randn(3, 11), ValueError, "wv must have shape"),
    "wo transposed": ("wo", lambda a: a["wo"].T, ValueError, r"wo must have shape \(12, 3\)"),
    "wo missing": ("wo", lambda a: None, TypeError, "wo is required"),
    "wo float8": ("wo", lambda a: a["wo"].to(torch.float8_e5m2), TypeError, "wo must be one of float32"),
    "bq too long": ("bq", lambda a: torch.randn(4), ValueError, "bq must have shape"),
    "bk on meta": ("bk", lambda a: a["bk"].to("meta"), ValueError, "one device"),
    "bo too short": ("bo", lambda a: torch.randn(3), ValueError, "bo must have shape"),
    "bq not a tensor": ("bq", lambda a: [0.0] * 3, TypeError, "bq must be a torch.Tensor"),
    "wk a number": ("wk", lambda a: 1.0, TypeError, "wk must be a torch.Tensor"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_gets_a_clear_error(case):
    """Also after good calls with these sizes: then "auto" and "cpu" take the hot path, which leaves
    the checking to the C++ op (the same messages), and must name what is wrong just the same."""
    name, make_bad, exc, match = BAD_INPUT[case]
    for backend in ["reference", "auto", "cpu"]:
        call(good_args(), backend=backend)
        args = dict(zip(NAMES, good_args()))
        args[name] = make_bad(args)
        with pytest.raises(exc, match=match):
            call([args[n] for n in NAMES], backend=backend)


def test_empty_batch_returns_empty_result():
    args = make_inputs(0, 12, 3, dtype=torch.float32)
    y = call(args)
    assert y.shape == (0, 12)
    y.sum().backward()
    assert args.x.grad.shape == (0, 12)


@pytest.mark.parametrize("backend", ["reference", "auto", "cpu"])
@pytest.mark.parametrize("residual", ["no", 0, 1, None, torch.tensor(True)])
def test_residual_must_be_a_bool(backend, residual):
    if backend not in available_backends("cpu") + ["auto"]:
        pytest.skip(f"{backend} not available here")
    with pytest.raises(TypeError, match="residual must be a bool"):
        call(good_args(), backend=backend, residual=residual)
    with pytest.raises(TypeError, match="residual must be a bool"):
        UltimusBlock(12, 3, residual=residual)


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        call(good_args(), backend="fast")
    with pytest.raises(ValueError, match="unknown backend"):
        UltimusBlock(backend="fast")


def test_unavailable_backend_raises_runtime_error_naming_it():
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable on cpu"):
        call(good_args(), backend="cuda")


@pytest.mark.parametrize("backend", ["triton", "cpu", "cuda"])
def test_sizes_past_a_fused_limit_are_refused_with_the_limit(backend):
    device = "cuda" if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()) else "cpu"
    if backend not in available_backends(device):
        pytest.skip(f"{backend} not available here")
    for D, d, limit in [(MAX_DIM + 1, 4, f"D <= {MAX_DIM}"), (16, MAX_ATTN_DIM + 1, f"d <= {MAX_ATTN_DIM}")]:
        args = make_inputs(2, D, d, dtype=torch.float32, device=device, requires_grad=False)
        with pytest.raises(ValueError, match=limit):
            call(args, backend=backend)
    # ... while the sizes every backend must support work, and "auto" falls back past the limit.
    assert call(
        make_inputs(2, MAX_DIM, MAX_ATTN_DIM, dtype=torch.float32, device=device, requires_grad=False), backend=backend
    ).shape == (2, MAX_DIM)
    assert resolve_backend("auto", torch.device(device), MAX_DIM + 1, 4) == "reference"


def test_available_backends_lists_reference_and_names_reasons():
    assert available_backends("cpu")[0] == "reference"
    report = ultimus_kernels.backend_report("cpu")
    assert set(report) == set(BACKENDS)
    assert all(why is None or (isinstance(why, str) and why) for why in report.values())
    assert report["cuda"] is not None


def test_python_m_ultimus_kernels_reports_backends():
    out = subprocess.run([sys.executable, "-m", "ultimus_kernels"], capture_output=True, text=True, check=True).stdout
    for name in BACKENDS:
        assert name in out


def test_block_state_dict_does_not_depend_on_backend():
    a = UltimusBlock(48, 8, backend="reference")
    b = UltimusBlock(48, 8, backend="auto")
    assert (
        list(a.state_dict())
        == list(b.state_dict())
        == ["q.weight", "q.bias", "k.weight", "k.bias", "v.weight", "v.bias", "out.weight", "out.bias"]
    )
    b.load_state_dict(a.state_dict())
    x = torch.randn(5, 48)
    b.backend = "reference"
    assert torch.equal(a(x), b(x))
    assert "backend='reference'" in repr(b)
    nb = UltimusBlock(48, 8, bias=False)
    assert list(nb.state_dict()) == ["q.weight", "k.weight", "v.weight", "out.weight"]


# --- the compiled extensions -------------------------------------------------------------------


def _build_info():
    path = Path(ultimus_kernels.__file__).parent / "_build_info.json"
    return json.loads(path.read_text()) if path.exists() else {}


def test_cpu_extension_was_built():
    """`pip install -e .` builds the C++ CPU extension unless told not to."""
    note = _build_info().get("_C", "")
    if note.startswith("skipped: ULTIMUS_NO_EXTENSIONS"):
        pytest.skip(note)
    assert "cpu" in available_backends("cpu"), ultimus_kernels.backend_report("cpu")["cpu"]


def test_cuda_sources_compiled_when_nvcc_is_present():
    note = _build_info().get("_C_cuda", "")
    if shutil.which("nvcc") is None or torch.version.cuda is None or note.startswith("skipped: ULTIMUS_"):
        pytest.skip(f"no CUDA build expected here ({note or 'nvcc not on PATH'})")
    assert note == "built", note
    assert importlib.util.find_spec("ultimus_kernels._C_cuda") is not None
    importlib.import_module("ultimus_kernels._C_cuda")  # loads (and registers) even without a GPU


def test_torch_compile_fullgraph_with_cpu_backend():
    if "cpu" not in available_backends("cpu"):
        pytest.skip("cpu backend not built")
    block = UltimusBlock(48, 8, backend="cpu")
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    x = torch.randn(9, 48, requires_grad=True)
    y = compiled(x)
    y.square().sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    block.backend = "reference"
    y_ref = block(x_ref)
    assert torch.allclose(y, y_ref, atol=1e-5)


@pytest.mark.parametrize("wrap", ["weight_norm", "prune"])
def test_block_with_parametrized_or_pruned_linears(wrap):
    """Weights that are not plain parameters (torch.nn.utils parametrizations, pruning) are read as the
    module computes them."""
    block = UltimusBlock(12, 3, backend="auto").double()
    if wrap == "weight_norm":
        torch.nn.utils.parametrizations.weight_norm(block.q)
    else:
        import torch.nn.utils.prune as prune

        prune.l1_unstructured(block.out, "weight", amount=0.5)
    x = torch.randn(5, 12, dtype=torch.float64)
    y = block(x)
    reference = ultimus_reference(x, *UltimusParams.of(block))
    assert torch.allclose(y, reference, atol=1e-12)
