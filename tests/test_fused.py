"""Every fused backend (triton, cpu, cuda) against the reference: values, gradients, gradcheck,
determinism, extreme inputs. Triton runs through its interpreter when there is no GPU (conftest)."""
import pytest
import torch

from ultimus_kernels import UltimusBlock, ultimus, ultimus_reference
from _util import FUSED, backend_or_skip, gpu_backend_or_skip, make_inputs, rel_err

SHAPES = [(1, 48, 8), (7, 48, 8), (33, 20, 3), (130, 7, 1), (5, 17, 32), (3, 256, 5)]
TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def check_against_reference(backend, device, B, D, d, dtype, residual=True, bias=True, logit_scale=1.0,
                            tol=None):
    """Forward and every gradient within `tol` (default TOL[dtype]) of the float64 reference."""
    tol = TOL[dtype] if tol is None else tol
    args = make_inputs(B, D, d, dtype=dtype, device=device, bias=bias, logit_scale=logit_scale)
    y = ultimus(*args, residual=residual, backend=backend)
    assert y.dtype == dtype and y.shape == (B, D)
    gy = torch.randn(B, D, dtype=torch.float64).to(device=device, dtype=dtype)
    wrt = [t for t in args if t is not None]
    grads = torch.autograd.grad(y, wrt, gy)

    ref_args = [t.detach().double().requires_grad_() if t is not None else None for t in args]
    y_ref = ultimus_reference(*ref_args, residual=residual)
    ref_grads = torch.autograd.grad(y_ref, [t for t in ref_args if t is not None], gy.double())
    assert rel_err(y, y_ref) < tol, "forward"
    names = [n for n, t in zip("x wq bq wk bk wv bv wo bo".split(), args) if t is not None]
    for name, g, g_ref, t in zip(names, grads, ref_grads, wrt):
        assert g.dtype == t.dtype and g.shape == t.shape
        assert rel_err(g, g_ref) < tol, f"gradient of {name}"


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B,D,d", SHAPES)
def test_parity_with_reference(backend, dtype, B, D, d):
    device = backend_or_skip(backend)
    check_against_reference(backend, device, B, D, d, dtype)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("residual,bias", [(False, True), (True, False), (False, False)])
def test_parity_without_residual_or_bias(backend, residual, bias):
    device = backend_or_skip(backend)
    check_against_reference(backend, device, 9, 48, 8, torch.float32, residual=residual, bias=bias)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("residual,bias", [(True, True), (False, False)])
def test_gradcheck_float64(backend, residual, bias):
    device = backend_or_skip(backend)
    args = make_inputs(3, 6, 3, device=device, bias=bias)
    assert torch.autograd.gradcheck(lambda *a: ultimus(*a, residual=residual, backend=backend), args)


@pytest.mark.parametrize("backend", FUSED)
def test_backward_is_deterministic(backend):
    device = backend_or_skip(backend)
    args = make_inputs(1000, 48, 8, dtype=torch.float32, device=device)
    gy = torch.randn(1000, 48, device=device)
    runs = [torch.autograd.grad(ultimus(*args, backend=backend), [t for t in args if t is not None], gy)
            for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", FUSED)
def test_extreme_logits_stay_finite_and_match(backend):
    device = backend_or_skip(backend)
    # |logits| ~ 1e4: a softmax without the max subtraction overflows to inf/NaN here.
    args = make_inputs(16, 48, 8, device=device, logit_scale=60.0, requires_grad=False)
    x, wq, bq, wk, bk = args[:5]
    logits = (x @ wq.T + bq).abs().max() * (x @ wk.T + bk).abs().max() / 8**0.5
    assert logits > 1e3
    y = ultimus(*args, backend=backend)
    assert torch.isfinite(y).all()
    assert rel_err(y, ultimus_reference(*args)) < 1e-10
    # In float32, logits this large carry ~1e-4 absolute rounding error whatever the summation order,
    # and the near one-hot softmax amplifies it in the gradients. The float32 reference shows the
    # scale of that: hold the kernel to 10x the reference's own error, and never looser than 5e-5.
    torch.manual_seed(1234)
    args32 = make_inputs(16, 48, 8, dtype=torch.float32, device=device, logit_scale=30.0)
    ref64 = [t.detach().double().requires_grad_() if t is not None else None for t in args32]
    gy = torch.randn(16, 48, dtype=torch.float64, device=device)
    g64 = torch.autograd.grad(ultimus_reference(*ref64), [t for t in ref64 if t is not None], gy)
    g32_ref = torch.autograd.grad(ultimus_reference(*args32), [t for t in args32 if t is not None], gy.float())
    g32 = torch.autograd.grad(ultimus(*args32, backend=backend), [t for t in args32 if t is not None], gy.float())
    for a, a_ref, a64 in zip(g32, g32_ref, g64):
        assert torch.isfinite(a).all()
        assert rel_err(a, a64) < max(5e-5, 10 * rel_err(a_ref, a64))


@pytest.mark.parametrize("backend", FUSED)
def test_nan_in_x_propagates_to_its_row_only(backend):
    device = backend_or_skip(backend)
    args = make_inputs(6, 48, 8, dtype=torch.float32, device=device, requires_grad=False)
    args[0][2, 5] = float("nan")
    y = ultimus(*args, backend=backend)
    assert torch.isnan(y[2]).all()
    assert torch.isfinite(y[[0, 1, 3, 4, 5]]).all()


@pytest.mark.parametrize("backend", FUSED)
def test_non_contiguous_x_and_gy(backend):
    device = backend_or_skip(backend)
    args = make_inputs(11, 24, 8, device=device, requires_grad=False)
    wide = torch.randn(11, 48, dtype=torch.float64, device=device)
    x_strided = wide[:, ::2].requires_grad_()  # stride (48, 2)
    x_transposed = torch.randn(24, 11, dtype=torch.float64, device=device).T.requires_grad_()
    for x in (x_strided, x_transposed):
        assert not x.is_contiguous()
        y = ultimus(x, *args[1:], backend=backend)
        gy = torch.randn(24, 11, dtype=torch.float64, device=device).T  # non-contiguous gradient
        (gx,) = torch.autograd.grad(y, [x], gy)
        x_ref = x.detach().clone().requires_grad_()
        y_ref = ultimus_reference(x_ref, *args[1:])
        (gx_ref,) = torch.autograd.grad(y_ref, [x_ref], gy)
        assert rel_err(y, y_ref) < 1e-12 and rel_err(gx, gx_ref) < 1e-12


@pytest.mark.parametrize("backend", FUSED)
def test_empty_batch(backend):
    device = backend_or_skip(backend)
    args = make_inputs(0, 48, 8, dtype=torch.float32, device=device)
    y = ultimus(*args, backend=backend)
    assert y.shape == (0, 48)
    grads = torch.autograd.grad(y.sum(), [args[0], args[1], args[8]])
    assert grads[0].shape == (0, 48) and (grads[1] == 0).all() and (grads[2] == 0).all()


@pytest.mark.parametrize("backend", FUSED)
def test_only_requested_gradients(backend):
    device = backend_or_skip(backend)
    args = make_inputs(5, 48, 8, dtype=torch.float32, device=device, requires_grad=False)
    args[0].requires_grad_()  # x only
    (gx,) = torch.autograd.grad(ultimus(*args, backend=backend).sum(), [args[0]])
    x_ref = args[0].detach().double().requires_grad_()
    (gx_ref,) = torch.autograd.grad(ultimus_reference(x_ref, *[a.double() if a is not None else None
                                                               for a in args[1:]]).sum(), [x_ref])
    assert rel_err(gx, gx_ref) < 2e-5
    args[0].requires_grad_(False)
    args[7].requires_grad_()  # wo only
    (gwo,) = torch.autograd.grad(ultimus(*args, backend=backend).sum(), [args[7]])
    assert gwo.shape == (48, 8) and torch.isfinite(gwo).all()


@pytest.mark.parametrize("backend", FUSED)
def test_mixed_precision_weights(backend):
    """fp32 master weights with lower-precision activations: output in x's dtype, gradients in the
    weights' dtype."""
    device = backend_or_skip(backend)
    act = torch.float32 if device.type == "cpu" and backend == "triton" else torch.bfloat16
    args = make_inputs(8, 48, 8, dtype=torch.float32, device=device)
    x = args[0].detach().to(act).requires_grad_()
    y = ultimus(x, *args[1:], backend=backend)
    assert y.dtype == act
    gx, gwq = torch.autograd.grad(y.float().sum(), [x, args[1]])
    assert gx.dtype == act and gwq.dtype == torch.float32


@pytest.mark.parametrize("backend", FUSED)
def test_block_is_drop_in(backend):
    device = backend_or_skip(backend)
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


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,D,d", [(7, 48, 8), (1000, 48, 8), (33, 20, 3), (5, 256, 32)])
def test_half_precision_on_gpu(backend, dtype, B, D, d):
    device = gpu_backend_or_skip(backend)
    check_against_reference(backend, device, B, D, d, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_large_batch_on_gpu(backend):
    device = gpu_backend_or_skip(backend)
    check_against_reference(backend, device, 100_003, 48, 8, torch.float32)


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
