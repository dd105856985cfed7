"""The raw ops (torch.ops.ultimus_ext.* and torch.ops.ultimus_triton.*), used directly: the same
checks and messages as the public API, fakes that check devices, registration on import (a fresh
process can call, differentiate, compile, export and reload them), opcheck."""

import re
import subprocess
import sys
import textwrap

import pytest
import torch

import ultimus_kernels
from _util import backend_or_skip, make_inputs, rel_err
from ultimus_kernels import available_backends, ultimus, ultimus_reference

NAMES = ("x", "wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo")


def op_families():
    """(backend, fwd op, bwd op) for every op family that runs here."""
    out = []
    if "cpu" in available_backends("cpu"):
        out.append(("cpu", torch.ops.ultimus_ext.fwd.default, torch.ops.ultimus_ext.bwd.default))
    if "triton" in available_backends("cuda" if torch.cuda.is_available() else "cpu"):
        out.append(("triton", torch.ops.ultimus_triton.fwd.default, torch.ops.ultimus_triton.bwd.default))
    if torch.cuda.is_available() and "cuda" in available_backends("cuda"):
        out.append(("cuda", torch.ops.ultimus_ext.fwd.default, torch.ops.ultimus_ext.bwd.default))
    return out


FAMILIES = op_families()
FAMILY_IDS = [f[0] for f in FAMILIES]


def good(backend, B=4, D=12, d=3):
    device = backend_or_skip(backend)
    return dict(zip(NAMES, make_inputs(B, D, d, dtype=torch.float32, device=device, requires_grad=False)))


# Each case: the argument replaced, a function of the good arguments giving its bad value, the
# exception and the start of the message the public API gives.
BAD = {
    "integer x": ("x", lambda a: a["x"].to(torch.int64), TypeError, "ultimus: x must be a floating-point tensor"),
    "complex x": ("x", lambda a: a["x"].to(torch.complex64), TypeError, "ultimus: x must be a floating-point"),
    "float8 x": ("x", lambda a: a["x"].to(torch.float8_e4m3fn), TypeError, "ultimus: x must be one of float32"),
    "float8 wq": ("wq", lambda a: a["wq"].to(torch.float8_e5m2), TypeError, "ultimus: wq must be one of float32"),
    "1-D x": ("x", lambda a: a["x"][0], ValueError, r"ultimus: x must be 2-D \(B, D\), got shape \(12,\)"),
    "short wq": ("wq", lambda a: a["wq"][:, :5], ValueError, r"ultimus: wq must have shape \(3, 12\)"),
    "wide wk": ("wk", lambda a: torch.randn(3, 13, device=a["x"].device), ValueError, "ultimus: wk must have shape"),
    "transposed wo": ("wo", lambda a: a["wo"].T, ValueError, r"ultimus: wo must have shape \(12, 3\)"),
    "long bq": (
        "bq",
        lambda a: torch.randn(4, device=a["x"].device),
        ValueError,
        r"ultimus: bq must have shape \(3,\)",
    ),
    "short bo": ("bo", lambda a: a["bo"][:5], ValueError, r"ultimus: bo must have shape \(12,\)"),
    "meta bq": ("bq", lambda a: a["bq"].to("meta"), ValueError, "ultimus: all tensors must be on one device"),
    "meta wo": ("wo", lambda a: a["wo"].to("meta"), ValueError, "ultimus: all tensors must be on one device"),
}


def call_fwd(op, a, residual=True):
    return op(*(a[n] for n in NAMES), residual)


@pytest.mark.parametrize("backend,fwd,bwd", FAMILIES, ids=FAMILY_IDS)
@pytest.mark.parametrize("case", list(BAD))
def test_raw_ops_check_like_the_public_api(backend, fwd, bwd, case):
    name, make_bad, exc, message = BAD[case]
    a = good(backend)
    a[name] = make_bad(a)
    with pytest.raises(exc, match=message) as public:
        ultimus(*(a[n] for n in NAMES), backend=backend)
    with pytest.raises(exc, match=message) as raw_fwd:
        call_fwd(fwd, a)
    gy = torch.randn(4, 12, device=backend_or_skip(backend))
    with pytest.raises(exc, match=message) as raw_bwd:
        bwd(gy, *(a[n] for n in NAMES), True, True, True)
    assert str(raw_fwd.value).startswith(str(public.value).split("\n")[0][:60])
    assert str(raw_bwd.value).startswith(str(public.value).split("\n")[0][:60])


@pytest.mark.parametrize("backend,fwd,bwd", FAMILIES, ids=FAMILY_IDS)
def test_raw_ops_enforce_the_size_limits(backend, fwd, bwd):
    for D, d, limit in [(257, 2, "D <= 256"), (8, 33, "d <= 32")]:
        a = good(backend, B=2, D=D, d=d)
        with pytest.raises(ValueError, match=f"backend '{backend}' supports {limit}"):
            call_fwd(fwd, a)
        with pytest.raises(ValueError, match=f"backend '{backend}' supports {limit}"):
            bwd(torch.zeros_like(a["x"]), *(a[n] for n in NAMES), True, True, True)


@pytest.mark.parametrize("backend,fwd,bwd", FAMILIES, ids=FAMILY_IDS)
def test_raw_bwd_checks_the_incoming_gradient(backend, fwd, bwd):
    a = good(backend)
    for gy, message in [
        (torch.randn(4, 11, device=a["x"].device), r"gy must have x's shape \(4, 12\)"),
        (torch.ones(4, 12, dtype=torch.int32, device=a["x"].device), "gy must be a floating-point"),
        (torch.randn(4, 12, device="meta"), "one device"),
    ]:
        with pytest.raises((ValueError, TypeError), match=message):
            bwd(gy, *(a[n] for n in NAMES), True, True, True)


@pytest.mark.parametrize("backend,fwd,bwd", FAMILIES, ids=FAMILY_IDS)
def test_raw_bwd_reads_the_incoming_gradient_in_xs_dtype(backend, fwd, bwd):
    # A float32 gy for half-precision x (never autograd's, but the raw op takes it) is read rounded to x's
    # dtype by every backend, so they all give one answer. D = 48, d = 8: Triton's bf16 kernels run there.
    device = backend_or_skip(backend)
    half = torch.float16 if device.type == "cpu" and backend == "triton" else torch.bfloat16  # interpreter: no bf16
    a = dict(zip(NAMES, make_inputs(5, 48, 8, dtype=half, device=device, requires_grad=False)))
    gy = torch.randn(5, 48, device=device)  # float32, mostly not exact in half precision
    assert not torch.equal(gy, gy.to(half).float())
    wide = bwd(gy, *(a[n] for n in NAMES), True, True, True)
    rounded = bwd(gy.to(half), *(a[n] for n in NAMES), True, True, True)
    assert wide[0].dtype == half
    assert all(torch.equal(w, r) for w, r in zip(wide, rounded))


@pytest.mark.parametrize("backend,fwd,bwd", FAMILIES, ids=FAMILY_IDS)
def test_raw_ops_refuse_a_non_bool_residual(backend, fwd, bwd):
    a = good(backend)
    with pytest.raises((TypeError, RuntimeError), match="bool"):
        call_fwd(fwd, a, residual="no")


@pytest.mark.parametrize("backend,fwd,bwd", FAMILIES, ids=FAMILY_IDS)
def test_raw_ops_are_differentiable_and_match_the_reference(backend, fwd, bwd):
    device = backend_or_skip(backend)
    args = make_inputs(6, 12, 3, device=device)
    y = fwd(*args, True)
    grads = torch.autograd.grad(y.square().sum(), [t for t in args if t is not None])
    y_ref = ultimus_reference(*args)
    grads_ref = torch.autograd.grad(y_ref.square().sum(), [t for t in args if t is not None])
    assert rel_err(y, y_ref) < 1e-12
    for g, g_ref in zip(grads, grads_ref):
        assert rel_err(g, g_ref) < 1e-11
    gx, gparams = bwd(torch.ones_like(y), *(t.detach() if t is not None else None for t in args), True, True, True)
    assert gx.shape == (6, 12) and gparams.shape == (4 * 3 * 12 + 3 * 3 + 12,)


@pytest.mark.parametrize("backend,fwd,bwd", FAMILIES, ids=FAMILY_IDS)
def test_opcheck_of_the_ops(backend, fwd, bwd):
    device = backend_or_skip(backend)
    # Triton's CPU interpreter cannot run a launch on FakeTensors (it reads their data pointers), so the
    # fake-tensor and AOT checks of the Triton ops need a GPU; the schema and autograd checks run here.
    interpreted = backend == "triton" and device.type == "cpu"
    fwd_utils = ("test_schema", "test_autograd_registration") if interpreted else torch.library._OPCHECK_DEFAULT_UTILS
    bwd_utils = ("test_schema",) if interpreted else ("test_schema", "test_faketensor")
    for bias in (True, False):
        args = make_inputs(5, 12, 3, dtype=torch.float32, device=device, bias=bias)
        torch.library.opcheck(fwd, (*args, True), test_utils=fwd_utils)
        gy = torch.randn(5, 12, device=device)
        plain = [a.detach() if a is not None else None for a in args]
        torch.library.opcheck(bwd, (gy, *plain, True, True, True), test_utils=bwd_utils)


def run_fresh(code: str) -> str:
    """Run `code` in a new Python process (Triton through its interpreter when there is no GPU)."""
    prelude = "import os, torch\nif not torch.cuda.is_available(): os.environ.setdefault('TRITON_INTERPRET', '1')\n"
    proc = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_fresh_process_import_then_raw_op_with_backward():
    if not FAMILIES:
        pytest.skip("no fused backend here")
    out = run_fresh("""
        import ultimus_kernels  # registers the ops, their fakes and their autograd: nothing else is touched
        families = []
        if hasattr(torch.ops.ultimus_ext, "fwd"):
            families.append(torch.ops.ultimus_ext.fwd)
        try:
            families.append(torch.ops.ultimus_triton.fwd)
        except (AttributeError, RuntimeError):
            pass
        for fwd in families:
            x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
            w = [torch.randn(2, 8, dtype=torch.float64, requires_grad=True) for _ in range(3)]
            wo = torch.randn(8, 2, dtype=torch.float64, requires_grad=True)
            y = fwd(x, w[0], None, w[1], None, w[2], None, wo, None, True)
            y.square().sum().backward()
            ref = ultimus_kernels.ultimus_reference(x, w[0], None, w[1], None, w[2], None, wo, None)
            (gx,) = torch.autograd.grad(ref.square().sum(), [x])
            assert torch.allclose(x.grad, gx), fwd
        print("ok", len(families))
    """)
    assert out.startswith("ok")


def test_torch_compile_as_the_first_use_in_a_fresh_process():
    if "cpu" not in available_backends("cpu"):
        pytest.skip("cpu backend not built")
    out = run_fresh("""
        from ultimus_kernels import UltimusBlock
        block = UltimusBlock(48, 8, backend="cpu")
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
        x = torch.randn(9, 48, requires_grad=True)
        compiled(x).square().sum().backward()
        x_ref = x.detach().clone().requires_grad_()
        block.backend = "reference"
        block(x_ref).square().sum().backward()
        assert torch.allclose(x.grad, x_ref.grad, atol=1e-5)
        print("ok")
    """)
    assert out.startswith("ok")


def test_exported_program_reloads_and_trains_in_a_fresh_process(tmp_path):
    if "cpu" not in available_backends("cpu"):
        pytest.skip("cpu backend not built")
    path = tmp_path / "block.pt2"
    run_fresh(f"""
        from ultimus_kernels import UltimusBlock
        torch.manual_seed(0)
        block = UltimusBlock(16, 4, backend="cpu")
        ep = torch.export.export(block, (torch.randn(5, 16),), dynamic_shapes={{"x": {{0: torch.export.Dim("batch")}}}})
        assert "ultimus_ext.fwd" in str(ep.graph), ep.graph
        torch.export.save(ep, {str(path)!r})
        torch.save(block.state_dict(), {str(path) + ".sd"!r})
    """)
    out = run_fresh(f"""
        import ultimus_kernels
        module = torch.export.load({str(path)!r}).module()
        x = torch.randn(7, 16, requires_grad=True)
        module(x).square().sum().backward()
        ref = ultimus_kernels.UltimusBlock(16, 4, backend="reference")
        ref.load_state_dict(torch.load({str(path) + ".sd"!r}))
        x_ref = x.detach().clone().requires_grad_()
        ref(x_ref).square().sum().backward()
        assert torch.allclose(x.grad, x_ref.grad, atol=1e-5)
        grads = {{n.split('.')[-2] + '.' + n.split('.')[-1]: p.grad for n, p in module.named_parameters()}}
        assert all(g is not None for g in grads.values()), grads
        assert torch.allclose(grads["q.weight"], ref.q.weight.grad, atol=1e-5)
        print("ok")
    """)
    assert out.startswith("ok")


def test_import_never_fails_and_reports_missing_extensions():
    report = ultimus_kernels.backend_report("cpu")
    assert report["reference"] is None
    assert all(isinstance(why, str) and why for name, why in report.items() if why is not None)
    assert re.search(r"python -m ultimus_kernels|\w", report["cuda"])


@pytest.mark.parametrize("backend,fwd,bwd", FAMILIES, ids=FAMILY_IDS)
def test_raw_ops_refuse_forward_mode_tangents_instead_of_dropping_them(backend, fwd, bwd):
    import torch.autograd.forward_ad as fwAD

    a = good(backend)
    with fwAD.dual_level():
        dual_x = fwAD.make_dual(a["x"], torch.randn_like(a["x"]))
        args = [dual_x if n == "x" else a[n] for n in NAMES]
        with pytest.raises(RuntimeError, match="jvp is not implemented|no forward-mode AD rule"):
            fwd(*args, True)
        with pytest.raises(RuntimeError, match="jvp is not implemented|no forward-mode AD rule"):
            bwd(torch.ones_like(a["x"]), *args, True, True, True)
        # ... while the public path has the rule.
        out = fwAD.unpack_dual(ultimus(*args, backend=backend))
        assert out.tangent is not None and torch.isfinite(out.tangent).all()


@pytest.mark.parametrize("backend,fwd,bwd", FAMILIES, ids=FAMILY_IDS)
def test_raw_bwd_op_is_not_differentiable_and_says_so(backend, fwd, bwd):
    a = good(backend)
    x = a["x"].clone().requires_grad_()
    gx, _ = bwd(torch.ones_like(x), x, *(a[n] for n in NAMES[1:]), True, True, True)
    with pytest.raises(RuntimeError, match="not differentiable|no autograd formula"):
        gx.sum().backward()
