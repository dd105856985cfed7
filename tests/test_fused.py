"""Every fused backend (triton, cpu, cuda) against the reference: values, gradients, gradcheck,
determinism, extreme inputs. Triton runs through its interpreter when there is no GPU (conftest)."""

import math
import subprocess
import sys
import textwrap

import pytest
import torch

from _util import assert_rel_close, backend_or_skip, gpu_backend_or_skip, make_inputs, per_sample_norms, rel_err
from ultimus_kernels import UltimusBlock, ultimus, ultimus_reference

SHAPES = [(1, 48, 8), (7, 48, 8), (33, 20, 3), (130, 7, 1), (5, 17, 32), (3, 256, 5)]
TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


LOW_PRECISION = (torch.float16, torch.bfloat16)


def check_against_reference(backend, device, B, D, d, dtype, residual=True, bias=True, logit_scale=1.0):
    """Forward and every gradient against the float64 reference: within TOL[dtype] for float32 and
    float64 (a weight gradient relative to the larger of its norm and its per-sample terms' norm, see
    `per_sample_norms`); for float16/bfloat16 within twice the error of the reference itself run in that dtype (the
    scale a half-precision result can be held to), never looser than TOL[dtype] (1e-2), never tighter
    than the dtype's epsilon (one rounding of the output)."""
    args = make_inputs(B, D, d, dtype=dtype, device=device, bias=bias, logit_scale=logit_scale)
    y = ultimus(*args, residual=residual, backend=backend)
    assert y.dtype == dtype and y.shape == (B, D)
    gy = torch.randn(B, D, dtype=torch.float64).to(device=device, dtype=dtype)
    grads = (y, *torch.autograd.grad(y, args.tensors(), gy))

    def reference(inputs, grad_out):
        y_ref = ultimus_reference(*inputs, residual=residual)
        return (y_ref, *torch.autograd.grad(y_ref, inputs.tensors(), grad_out))

    ref64 = reference(
        type(args)(*(t.detach().double().requires_grad_() if t is not None else None for t in args)), gy.double()
    )
    ref_same = reference(args, gy) if dtype in LOW_PRECISION else None
    names = ["forward"] + [f"gradient of {n}" for n, t in zip(args._fields, args) if t is not None]
    scales = [0.0] + per_sample_norms(args, gy, residual)
    for i, (name, g, g64, scale) in enumerate(zip(names, grads, ref64, scales)):
        assert g.dtype == (args.tensors()[i - 1].dtype if i else dtype) and g.shape == g64.shape, name
        tol = TOL[dtype]
        if ref_same is not None:
            tol = min(TOL[dtype], max(torch.finfo(dtype).eps, 2 * rel_err(ref_same[i], g64, scale)))
        assert_rel_close(g, g64, tol, name, scale)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B,D,d", SHAPES)
def test_parity_with_reference(fused_backend, dtype, B, D, d):
    backend, device = fused_backend
    check_against_reference(backend, device, B, D, d, dtype)


@pytest.mark.parametrize("residual,bias", [(False, True), (True, False), (False, False)])
def test_parity_without_residual_or_bias(fused_backend, residual, bias):
    backend, device = fused_backend
    check_against_reference(backend, device, 9, 48, 8, torch.float32, residual=residual, bias=bias)


@pytest.mark.parametrize("residual,bias", [(True, True), (False, False)])
def test_gradcheck_float64(fused_backend, residual, bias):
    backend, device = fused_backend
    args = make_inputs(3, 6, 3, device=device, bias=bias)
    assert torch.autograd.gradcheck(lambda *a: ultimus(*a, residual=residual, backend=backend), tuple(args))


def test_backward_is_deterministic(fused_backend):
    backend, device = fused_backend
    args = make_inputs(1000, 48, 8, dtype=torch.float32, device=device)
    gy = torch.randn(1000, 48, device=device)
    runs = [
        torch.autograd.grad(ultimus(*args, backend=backend), [t for t in args if t is not None], gy) for _ in range(2)
    ]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def scaled_logit_inputs(B, D, d, dtype, device, logit, k_bias=None):
    """Inputs whose attention logits s q_i k_j have magnitude ~`logit`: Wq, bq and Wk, bk each scaled by
    sqrt(logit). `k_bias` (optional) replaces bk, to put k itself at the edge of the dtype's range."""
    args = make_inputs(B, D, d, dtype=torch.float64, requires_grad=False)
    root = logit**0.5
    args = args._replace(wq=args.wq * root, bq=args.bq * root, wk=args.wk * root, bk=args.bk * root)
    if k_bias is not None:
        args = args._replace(wk=args.wk * 0, bk=k_bias.double())
    return type(args)(*(t.to(dtype=dtype, device=device).requires_grad_() for t in args))


def grads_of(fn, args, gy):
    y = fn(*args)
    return (y, *torch.autograd.grad(y, args, gy))


# The whole finite range of each dtype: tiny logits (uniform rows), ordinary, sharp (ill-conditioned),
# and huge (one-hot rows, where a softmax whose largest exponent is not exactly 0 overflows).
LOGITS = {
    torch.float32: [1e-38, 1e-12, 1.0, 30.0, 1e3, 1e8, 1e20, 1e30, 1e37],
    torch.float64: [1e-300, 1e-30, 1.0, 30.0, 1e3, 1e20, 1e100, 1e200, 1e300],
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_logits_across_the_whole_finite_range_match_the_float64_reference(fused_backend, dtype):
    """Forward and every gradient against the float64 reference of the same inputs. Large logits are
    ill-conditioned (a rounding error in q or k moves a near one-hot softmax), so the float32 reference's
    own error sets the scale: each result is held to 10x the error of that reference, and never looser
    than the dtype's tolerance. In float64 that error is scaled by float64's epsilon over float32's (the
    same conditioning, at float64's rounding): at logits ~1e3 float64 kernels and float64 PyTorch differ
    by up to ~3e-12 on some inputs, past a flat 1e-12. Where float32 overflows, the flat tolerance holds."""
    backend, device = fused_backend
    eps_ratio = torch.finfo(torch.float64).eps / torch.finfo(torch.float32).eps
    for logit in LOGITS[dtype]:
        args = scaled_logit_inputs(16, 24, 8, dtype, device, logit)
        gy = torch.randn(16, 24, dtype=torch.float64, device=device)
        got = grads_of(lambda *a: ultimus(*a, backend=backend), args, gy.to(dtype))
        ref64 = grads_of(ultimus_reference, [t.detach().double().requires_grad_() for t in args], gy)
        ref32 = grads_of(ultimus_reference, [t.detach().float().requires_grad_() for t in args], gy.float())
        for name, g, g64, g32 in zip(["y", *"x wq bq wk bk wv bv wo bo".split()], got, ref64, ref32):
            assert torch.isfinite(g).all(), (logit, name)
            ref_err = rel_err(g32, g64) * (eps_ratio if dtype == torch.float64 else 1.0)
            tol = max(TOL[dtype], 10 * ref_err) if math.isfinite(ref_err) else TOL[dtype]
            assert_rel_close(g, g64, tol, f"{name} at logits ~{logit:g}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_hot_rows_and_k_at_the_edge_of_the_range(fused_backend, dtype):
    """Two keys a hair apart at huge logits must give the reference's [1, 0] row (not [0.5, 0.5] or
    NaN); k near the dtype's largest value, where k_j - max_j k overflows, with a q_i of exactly 0
    must give a uniform row, as the reference does."""
    backend, device = fused_backend
    big = torch.finfo(dtype).max
    x = torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=dtype, device=device)
    wq = torch.zeros(2, 4, dtype=dtype, device=device)
    wk = torch.zeros(2, 4, dtype=dtype, device=device)
    wv = torch.zeros(2, 4, dtype=dtype, device=device)
    wq[:, 0] = big**0.5 / 2
    wk[0, 0], wk[1, 0] = big**0.5 / 2, big**0.5 / 2 * (1 - 1e-6 if dtype == torch.float32 else 1 - 1e-14)
    wv[:, 0] = 1.0
    wo = torch.eye(4, 2, dtype=dtype, device=device)
    args = [x, wq, None, wk, None, wv, None, wo, None]
    y = ultimus(*args, residual=False, backend=backend)
    assert torch.equal(y.cpu(), ultimus_reference(*args, residual=False).cpu())
    assert y[0, :2].tolist() == [2.0, 0.0]
    # k = +-0.9 max: k_j - k_ext overflows to -inf. Row 0 has q_0 = 0 exactly (uniform), row 1 a small q.
    k_bias = torch.tensor([0.9, -0.9, 0.5, -0.2], dtype=torch.float64) * big
    for logit_q in (1e-3, 1e-30):
        args = scaled_logit_inputs(5, 6, 4, dtype, device, 1.0, k_bias=k_bias)
        with torch.no_grad():
            args.wq[0].zero_()
            args.bq[0] = 0.0
            args.wq.mul_(logit_q)
            args.bq[1:] *= logit_q
        y = ultimus(*args, backend=backend)
        y_ref = ultimus_reference(*[t.detach().double() for t in args])
        assert torch.isfinite(y).all()
        assert rel_err(y, y_ref) < TOL[dtype]


def test_row_offsets_past_2_to_the_31_elements(fused_backend):
    """Element offsets row * stride past 2^31 must not wrap around: x is a view whose rows lie 2^30 + 1
    elements apart (8 GiB of address space, of which only the rows read are ever touched). Run in a
    child process, so that a wrong address fails this test instead of crashing the suite."""
    backend, device = fused_backend
    if device.type == "cuda" and torch.cuda.get_device_properties(device).total_memory < 12 << 30:
        pytest.skip("needs 9 GiB of GPU memory")
    code = f"""
        import os, torch
        if not torch.cuda.is_available(): os.environ.setdefault("TRITON_INTERPRET", "1")
        from ultimus_kernels import ultimus, ultimus_reference
        stride = 2**30 + 1  # fits in int32; row 2 starts at element 2^31 + 2
        storage = torch.empty(2 * stride + 16, dtype=torch.float32, device="{device.type}")
        x = storage.as_strided((3, 16), (stride, 1))
        x.copy_(torch.randn(3, 16))
        x.requires_grad_()
        params = [torch.randn(*s, device=x.device, requires_grad=True) * 0.3
                  for s in [(4, 16), (4,), (4, 16), (4,), (4, 16), (4,), (16, 4), (16,)]]
        y = ultimus(x, *params, backend="{backend}")
        (gx,) = torch.autograd.grad(y.square().sum(), [x])
        x64 = x.detach().double().requires_grad_()
        y64 = ultimus_reference(x64, *[p.detach().double() for p in params])
        (gx64,) = torch.autograd.grad(y64.square().sum(), [x64])
        err = lambda a, b: ((a.double() - b).norm() / b.norm()).item()
        assert err(y, y64) < 2e-5 and err(gx, gx64) < 2e-5, (err(y, y64), err(gx, gx64))
        print("ok")
    """
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stderr[-3000:]


def test_nan_in_x_propagates_to_its_row_only(fused_backend):
    backend, device = fused_backend
    args = make_inputs(6, 48, 8, dtype=torch.float32, device=device, requires_grad=False)
    args.x[2, 5] = float("nan")
    y = ultimus(*args, backend=backend)
    assert torch.isnan(y[2]).all()
    assert torch.isfinite(y[[0, 1, 3, 4, 5]]).all()


def test_non_contiguous_x_and_gy(fused_backend):
    backend, device = fused_backend
    args = make_inputs(11, 24, 8, device=device, requires_grad=False)
    wide = torch.randn(11, 48, dtype=torch.float64, device=device)
    x_strided = wide[:, ::2].requires_grad_()  # stride (48, 2)
    x_transposed = torch.randn(24, 11, dtype=torch.float64, device=device).T.requires_grad_()
    for x in (x_strided, x_transposed):
        assert not x.is_contiguous()
        y = ultimus(x, *args.params, backend=backend)
        gy = torch.randn(24, 11, dtype=torch.float64, device=device).T  # non-contiguous gradient
        (gx,) = torch.autograd.grad(y, [x], gy)
        x_ref = x.detach().clone().requires_grad_()
        y_ref = ultimus_reference(x_ref, *args.params)
        (gx_ref,) = torch.autograd.grad(y_ref, [x_ref], gy)
        assert rel_err(y, y_ref) < 1e-12 and rel_err(gx, gx_ref) < 1e-12


def test_empty_batch(fused_backend):
    backend, device = fused_backend
    args = make_inputs(0, 48, 8, dtype=torch.float32, device=device)
    y = ultimus(*args, backend=backend)
    assert y.shape == (0, 48)
    grads = torch.autograd.grad(y.sum(), [args.x, args.wq, args.bo])
    assert grads[0].shape == (0, 48) and (grads[1] == 0).all() and (grads[2] == 0).all()


def test_only_requested_gradients(fused_backend):
    backend, device = fused_backend
    args = make_inputs(5, 48, 8, dtype=torch.float32, device=device, requires_grad=False)
    args.x.requires_grad_()  # x only
    (gx,) = torch.autograd.grad(ultimus(*args, backend=backend).sum(), [args.x])
    x_ref = args.x.detach().double().requires_grad_()
    (gx_ref,) = torch.autograd.grad(
        ultimus_reference(x_ref, *[a.double() if a is not None else None for a in args.params]).sum(), [x_ref]
    )
    assert rel_err(gx, gx_ref) < 2e-5
    args.x.requires_grad_(False)
    args.wo.requires_grad_()  # wo only
    (gwo,) = torch.autograd.grad(ultimus(*args, backend=backend).sum(), [args.wo])
    assert gwo.shape == (48, 8) and torch.isfinite(gwo).all()


def test_mixed_precision_weights(fused_backend):
    """fp32 master weights with lower-precision activations: output in x's dtype, gradients in the
    weights' dtype."""
    backend, device = fused_backend
    act = torch.float32 if device.type == "cpu" and backend == "triton" else torch.bfloat16
    args = make_inputs(8, 48, 8, dtype=torch.float32, device=device)
    x = args.x.detach().to(act).requires_grad_()
    y = ultimus(x, *args.params, backend=backend)
    assert y.dtype == act
    gx, gwq = torch.autograd.grad(y.float().sum(), [x, args.wq])
    assert gx.dtype == act and gwq.dtype == torch.float32


def test_block_is_drop_in(fused_backend):
    backend, device = fused_backend
    torch.manual_seed(0)
    block = UltimusBlock(48, 8, backend="reference").to(device).double()
    keys = set(block.state_dict())
    x = torch.randn(13, 48, dtype=torch.float64, device=device, requires_grad=True)
    y_ref = block(x)
    g_ref = torch.autograd.grad(y_ref.square().sum(), [x, *block.parameters()])
    block.backend = backend
    assert set(block.state_dict()) == keys
    y = block(x)
    g = torch.autograd.grad(y.square().sum(), [x, *block.parameters()])
    assert rel_err(y, y_ref) < 1e-12
    for a, b in zip(g, g_ref):
        assert rel_err(a, b) < 1e-11


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("B,D,d", [(7, 48, 8), (33, 20, 3)])
def test_half_precision(fused_backend, dtype, B, D, d):
    """float16 and bfloat16 rows on every fused backend, wherever it runs. In Triton's interpreter tl.dot
    misreads bfloat16 operands, so there bfloat16 must keep to the kernels without bf16 products: this
    caught y ~1e9 from the D = 48, d = 8 tensor-core forward."""
    backend, device = fused_backend
    check_against_reference(backend, device, B, D, d, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,D,d", [(1000, 48, 8), (5, 256, 32)])
def test_half_precision_on_gpu(backend, dtype, B, D, d):
    device = gpu_backend_or_skip(backend)
    check_against_reference(backend, device, B, D, d, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_batch_on_gpu(backend, dtype):
    device = gpu_backend_or_skip(backend)
    check_against_reference(backend, device, 100_003, 48, 8, dtype)


def half_rows_reference(inputs, x, gy, params):
    """float64 math on half-precision rows x, gy and float32 parameters: (gx, the parameters' gradients in
    the bwd ops' flat layout gWq | gWk | gWv | gWo | gbq | gbk | gbv | gbo, their per-sample scale)."""
    inputs64 = type(inputs)(x.double().requires_grad_(), *[t.double().requires_grad_() for t in params])
    grads64 = torch.autograd.grad(ultimus_reference(*inputs64), inputs64.tensors(), gy.double())
    flat = torch.cat([g.reshape(-1) for g in grads64[1::2] + grads64[2::2]])
    return grads64[0], flat, max(per_sample_norms(inputs64, gy.double(), True)[1:])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_half_backward_keeps_fp32_accuracy_on_gpu(dtype):
    """The CUDA half-precision backward runs its projections as tf32 tensor-core products of exact rows
    and split weights (tests/test_cuda_emulation.py checks the same on the CPU emulation): on the
    hardware, gx within its final rounding plus 1e-4 and the float32 parameter gradients within
    float32's tolerance of float64 math on the same rows."""
    device = gpu_backend_or_skip("cuda")
    inputs = make_inputs(100_003, 48, 8, requires_grad=False)
    x, gy = inputs.x.to(device, dtype), torch.randn(100_003, 48).to(device, dtype)
    params = [t.to(device, torch.float32) for t in inputs[1:]]
    gx, flat = torch.ops.ultimus_ext.bwd(gy, x, *params, True, True, True)
    gx64, flat64, scale = half_rows_reference(inputs, x, gy, params)
    unit = 2**-8 if dtype == torch.bfloat16 else 2**-11
    excess = ((gx.double() - gx64).abs() - unit * gx64.abs()).max().item()
    assert excess <= 1e-4, f"{dtype} backward: gx error {excess:.2e} beyond its final rounding"
    assert_rel_close(flat, flat64, TOL[torch.float32], "parameter gradients", scale)


def test_triton_half_rows_weight_gradients_keep_float32_accuracy():
    """With half-precision x and gy the Triton backward's weight-gradient products split only the
    per-sample factor into tf32 parts (tf32x2: the rows are exact in tf32). The float32 parameter
    gradients must still hold float32's tolerance against float64 math on the same rows; on a GPU, one-pass
    tf32 products miss it (Triton's interpreter computes every dot in float32, so on the CPU this checks
    the split and the layout only)."""
    device = backend_or_skip("triton")
    dtype = torch.float16 if device.type == "cpu" else torch.bfloat16  # the interpreter has no bfloat16
    inputs = make_inputs(300, 48, 8, requires_grad=False)
    x, gy = inputs.x.to(device, dtype), torch.randn(300, 48).to(device, dtype)
    params = [t.to(device, torch.float32) for t in inputs[1:]]
    _, flat = torch.ops.ultimus_triton.bwd(gy, x, *params, True, True, True)
    _, flat64, scale = half_rows_reference(inputs, x, gy, params)
    assert_rel_close(flat, flat64, TOL[torch.float32], "parameter gradients", scale)


# What the split products may add to a result's final rounding, absolute, for results of order 1: each
# split leaves 2^-17 of a number in bf16 parts (a few 1e-6 on a sum of a block's terms; 1e-4 still shows a
# missing lo term, 2^-9 of its terms) and 2^-22 in float16 parts (the CPU runs; 1e-5 shows a missing term).
SPLIT_SLACK = {torch.bfloat16: 1e-4, torch.float16: 1e-5}


@pytest.mark.parametrize("dots", ["split", "tf32"])
@pytest.mark.parametrize(
    "B,residual,bias,programs",
    [(1, True, True, None), (5, False, False, None), (300, True, False, None), (1500, True, True, 1)],
)
def test_triton_half_forward_on_tensor_cores_keeps_fp32_accuracy(monkeypatch, dots, B, residual, bias, programs):
    """The half-precision Triton forward of the common block (D = 48, d = 8) runs both projections in
    tl.dot: bfloat16 rows against weights split into two bfloat16 numbers, and z split likewise ("split"),
    float16 rows (exact in tf32) against weights and z split into a tf32 head and the rest ("tf32"). Either
    way y must be float64 math on the same rows and parameters rounded once: within that rounding plus
    SPLIT_SLACK (1e-5 for tf32 parts). The interpreter has no bfloat16 and computes tf32 products in
    float32, so on the CPU "split" runs in float16 on float16 rows (the same code and layouts; a GPU run
    checks bfloat16 and tf32 rounding).
    `programs` = 1: one program of the persistent grid loops over several tiles."""
    device = backend_or_skip("triton")
    from ultimus_kernels.ops import ultimus_triton

    dtype = torch.bfloat16 if dots == "split" and device.type == "cuda" else torch.float16
    if device.type == "cpu":
        monkeypatch.setattr(ultimus_triton, "_half_dots", lambda x, D, d: dots)
    if programs is not None:
        monkeypatch.setattr(ultimus_triton, "_num_programs", lambda num_tiles, device: programs)
    inputs = make_inputs(B, 48, 8, bias=bias, requires_grad=False)
    x = inputs.x.to(device, dtype)
    assert ultimus_triton._half_dots(x, 48, 8) == dots
    params = [None if t is None else t.to(device, torch.float32) for t in inputs[1:]]
    y = torch.ops.ultimus_triton.fwd(x, *params, residual)
    y64 = ultimus_reference(x.double(), *[None if t is None else t.double() for t in params], residual=residual)
    unit = 2**-8 if dtype == torch.bfloat16 else 2**-11
    excess = ((y.double() - y64).abs() - unit * y64.abs()).max().item()
    slack = SPLIT_SLACK[dtype] if dots == "split" else 1e-5
    assert y.dtype == dtype and excess <= slack, f"{dots} forward: y error {excess:.2e} beyond its final rounding"


@pytest.mark.parametrize(
    "B,residual,bias,need,programs",
    [
        (1, True, True, (True, True), None),
        (5, False, False, (True, True), None),
        (300, True, False, (True, False), None),
        (300, False, True, (False, True), None),
        (1500, True, True, (True, True), 1),
    ],
)
def test_triton_bf16_backward_on_tensor_cores_keeps_fp32_accuracy(monkeypatch, B, residual, bias, need, programs):
    """The bfloat16 Triton backward of the common block (D = 48, d = 8) runs every product in tl.dot on
    bf16 parts: x and gy exact, the weights, g = [gq | gk | gv] and z split into hi + lo. gx must be
    float64 math on the same rows rounded once, within that rounding plus SPLIT_SLACK, and the float32
    parameter gradients within float32's tolerance; only the requested gradients are computed. On the CPU
    the interpreter (no bfloat16) runs the same code on float16 rows and float16 parts. `programs` = 1: one
    program of the persistent grid loops over several tiles and sums them into its partial row."""
    device = backend_or_skip("triton")
    from ultimus_kernels.ops import ultimus_triton

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16
    if device.type == "cpu":
        monkeypatch.setattr(ultimus_triton, "_half_dots", lambda x, D, d: "split")
    if programs is not None:
        monkeypatch.setattr(ultimus_triton, "_num_programs", lambda num_tiles, device: programs)
    inputs = make_inputs(B, 48, 8, bias=bias, requires_grad=False)
    x, gy = inputs.x.to(device, dtype), torch.randn(B, 48).to(device, dtype)
    params = [None if t is None else t.to(device, torch.float32) for t in inputs[1:]]
    gx, flat = torch.ops.ultimus_triton.bwd(gy, x, *params, residual, *need)
    inputs64 = type(inputs)(x.double(), *[None if t is None else t.double() for t in params])
    inputs64 = type(inputs)(*[None if t is None else t.requires_grad_() for t in inputs64])
    grads64 = torch.autograd.grad(ultimus_reference(*inputs64, residual=residual), inputs64.tensors(), gy.double())
    assert gx.shape == ((B, 48) if need[0] else (0,)) and flat.shape[0] == (4 * 8 * 48 + 3 * 8 + 48 if need[1] else 0)
    if need[0]:
        unit = 2**-8 if dtype == torch.bfloat16 else 2**-11
        excess = ((gx.double() - grads64[0]).abs() - unit * grads64[0].abs()).max().item()
        assert gx.dtype == dtype and excess <= SPLIT_SLACK[dtype], f"gx error {excess:.2e} beyond its final rounding"
    if need[1]:
        weights, biases = grads64[1:5] if not bias else grads64[1::2], () if not bias else grads64[2::2]
        flat64 = torch.cat([g.reshape(-1) for g in weights + biases])
        scale = max(per_sample_norms(inputs64, gy.double(), residual)[1:])
        assert_rel_close(flat[: flat64.numel()], flat64, TOL[torch.float32], "parameter gradients", scale)


def test_triton_half_forward_runs_on_tensor_cores_only_where_it_can(monkeypatch):
    """bfloat16 and float16 rows of the common block take the tensor-core forward; float32 and float64
    rows, other sizes and GPUs before sm_80 (no bf16 or tf32 tensor cores) keep the one-sample-per-thread
    kernel. In the interpreter, whose tl.dot misreads bfloat16 operands, only float16 rows do."""
    from types import SimpleNamespace

    from ultimus_kernels.ops import ultimus_triton

    rows = lambda dtype, device="cuda:1": SimpleNamespace(dtype=dtype, device=torch.device(device))  # noqa: E731
    dots = ultimus_triton._half_dots
    monkeypatch.setattr(ultimus_triton, "interpreter_active", lambda: False)
    monkeypatch.setattr(ultimus_triton, "_CAPABILITY", {0: (7, 5), 1: (8, 0)})
    assert dots(rows(torch.bfloat16), 48, 8) == "split" and dots(rows(torch.float16), 48, 8) == "tf32"
    assert dots(rows(torch.float32), 48, 8) is None and dots(rows(torch.float64), 48, 8) is None
    assert dots(rows(torch.bfloat16), 64, 8) is None and dots(rows(torch.float16), 48, 16) is None
    assert dots(rows(torch.bfloat16, "cuda:0"), 48, 8) is None
    monkeypatch.setattr(ultimus_triton, "interpreter_active", lambda: True)
    assert dots(rows(torch.float16, "cpu"), 48, 8) == "tf32" and dots(rows(torch.bfloat16, "cpu"), 48, 8) is None


def test_triton_backward_that_does_not_fit_the_gpu_says_so(monkeypatch):
    """Triton refuses a kernel whose shared memory exceeds the GPU's when it loads it: the float64 tile
    backward at D > 128 and d > 16 needs 384 KB (sm_90 compile), past an H100's 227 KB. The error names
    the call and what runs it instead, from the public API and the raw ops alike. (Here the launch is made
    to fail as a GPU's would; the interpreter has no shared-memory limit.)"""
    device = backend_or_skip("triton")
    from triton.runtime.errors import OutOfResources

    from ultimus_kernels import ultimus_stack
    from ultimus_kernels.ops import ultimus_triton

    real = torch.library.wrap_triton
    too_big = {ultimus_triton.ultimus_bwd_kernel, ultimus_triton.ultimus_stack_bwd_kernel}

    def wrap_triton(kernel):
        if kernel not in too_big:
            return real(kernel)

        class Launcher:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    raise OutOfResources(393216, 232448, "shared memory")

                return launch

        return Launcher()

    monkeypatch.setattr(torch.library, "wrap_triton", wrap_triton)
    message = r"backend 'triton' cannot run {} for D=100, d=20 with torch.float64 inputs on this GPU \(out of resource"
    args = make_inputs(3, 100, 20, device=device)
    y = ultimus(*args, backend="triton")
    with pytest.raises(RuntimeError, match=message.format("bwd")):
        y.sum().backward()
    with pytest.raises(RuntimeError, match=message.format("bwd")):
        torch.ops.ultimus_triton.bwd(torch.ones_like(y), *(t.detach() for t in args), True, True, True)
    y = ultimus_stack(args.x, [args.params, args.params], backend="triton")
    with pytest.raises(RuntimeError, match=message.format("stack_bwd") + r".*'cuda' or 'reference' runs it"):
        y.sum().backward()


def test_triton_persistent_kernels_take_their_grid_size_at_run_time():
    """Every persistent Triton kernel (one that loops over tiles) takes the number of programs as a run-time
    argument. At small B that number follows the batch size; as a tl.constexpr each new number of tiles
    (an epoch's last, partial batch, an evaluation batch) would compile the kernel anew on a GPU."""
    import inspect

    import triton

    from ultimus_kernels.ops import ultimus_triton

    kernels = [k for k in vars(ultimus_triton).values() if isinstance(k, triton.runtime.jit.KernelInterface)]
    signatures = {k.fn.__name__: inspect.signature(k.fn).parameters for k in kernels}
    persistent = {name: params for name, params in signatures.items() if "num_tiles" in params}
    assert {"ultimus_bwd_rows_kernel", "ultimus_fwd_half_dot_kernel", "ultimus_stack_bwd_kernel"} <= set(persistent)
    for name, params in persistent.items():
        grid_size = [p for p in params.values() if p.name.lower() == "num_programs"]
        assert len(grid_size) == 1 and "constexpr" not in str(grid_size[0].annotation), name


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_autocast_on_gpu(backend):
    device = gpu_backend_or_skip(backend)
    from model import UltimusNet

    net = UltimusNet(backend=backend).to(device)
    images = torch.randn(16, 3, 32, 32, device=device)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = net(images)
    logits.float().sum().backward()
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in net.parameters())


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_torch_compile_fullgraph_on_gpu(backend):
    device = gpu_backend_or_skip(backend)
    from model import UltimusNet

    torch.manual_seed(0)
    net = UltimusNet(backend=backend).to(device)
    compiled = torch.compile(net, fullgraph=True)
    images = torch.randn(32, 3, 32, 32, device=device)
    out = compiled(images)
    out.logsumexp(1).sum().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    net.backend = "reference"
    out_ref = net(images)
    out_ref.logsumexp(1).sum().backward()
    assert rel_err(out, out_ref) < 1e-4
    for g, p in zip(grads, net.parameters()):
        assert rel_err(g, p.grad) < 1e-3


@pytest.mark.parametrize("large_batch", [1, 1 << 40], ids=["float32 copies", "converted per thread"])
def test_triton_half_precision_weights_either_way(monkeypatch, large_batch):
    """From B = _LARGE_BATCH up, the per-sample Triton launchers hand the kernels float32 copies of
    half-precision weights rather than have every thread convert every weight it reads: exact copies,
    the same numbers either way."""
    device = backend_or_skip("triton")
    from ultimus_kernels.ops import ultimus_triton

    dtype = torch.float16 if device.type == "cpu" else torch.bfloat16  # the interpreter has no bfloat16
    w, b = torch.randn(8, 48, device=device, dtype=dtype), None
    copied, no_bias = ultimus_triton._per_sample_weights(ultimus_triton._LARGE_BATCH, w, b)
    assert copied.dtype == torch.float32 and torch.equal(copied, w.float()) and no_bias is None
    assert ultimus_triton._per_sample_weights(ultimus_triton._LARGE_BATCH - 1, w)[0].dtype == dtype

    monkeypatch.setattr(ultimus_triton, "_LARGE_BATCH", large_batch)
    check_against_reference("triton", device, 9, 48, 8, dtype)


def test_triton_vector_weight_loads_hold_for_misaligned_weights():
    """The per-sample Triton kernels read weights four at a time in 16-byte vector loads, which Triton
    emits only where it has specialised the pointer as 16-byte aligned (on a GPU a misaligned vector load
    faults). A weight 4 bytes past an aligned address takes the narrower loads and the same numbers."""
    device = backend_or_skip("triton")
    args = make_inputs(9, 48, 8, dtype=torch.float32, device=device)
    buffer = torch.randn(8 * 48 + 1, device=device)
    buffer[1:].view(8, 48).copy_(args.wk.detach())
    args = args._replace(wk=buffer[1:].view(8, 48).requires_grad_())  # misaligned for 16-byte loads
    y = ultimus(*args, backend="triton")
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, args.tensors(), gy)
    args64 = type(args)(*(t.detach().double().requires_grad_() for t in args))
    y64 = ultimus_reference(*args64)
    grads64 = torch.autograd.grad(y64, args64.tensors(), gy.double())
    assert rel_err(y, y64) < TOL[torch.float32]
    for g, g64 in zip(grads, grads64):
        assert rel_err(g, g64) < TOL[torch.float32]
