"""The fused stack of blocks (`ultimus_stack`, `UltimusStack`, the stack ops) against the reference
applied block by block: values, every gradient, gradcheck, determinism, the contract of a single block
(errors, B = 0, NaN rows, requested gradients only), autograd beyond the first backward, compile,
opcheck, the module and the network."""

import copy
import functools

import pytest
import torch
from torch import nn

from _util import FUSED, assert_rel_close, backend_or_skip, gpu_backend_or_skip, make_inputs, rel_err
from ultimus_kernels import (
    UltimusBlock,
    UltimusParams,
    UltimusStack,
    available_backends,
    ultimus,
    ultimus_stack,
    ultimus_stack_reference,
)
from ultimus_kernels.checks import PARAM_NAMES

TOL = {torch.float64: 1e-12, torch.float32: 2e-5}


def make_stack(L, B, D, d, dtype=torch.float64, device="cpu", bias=True):
    """x and L blocks' parameters, fresh and random; x requires grad, as do the parameters."""
    blocks = [make_inputs(B, D, d, dtype=dtype, device=device, bias=bias) for _ in range(L)]
    return blocks[0].x, [b.params for b in blocks]


def flat_tensors(x, params):
    return [x] + [t for block in params for t in block if t is not None]


def per_sample_scales(x, params, gy, residual):
    """For each tensor of flat_tensors: the norm of its gradient's per-sample terms (see
    _util.per_sample_norms, here through the whole stack): the scale a batch-summed gradient is held to."""
    detached = [[None if t is None else t.detach().double() for t in block] for block in params]
    names = [(i, j) for i, block in enumerate(detached) for j, t in enumerate(block) if t is not None]

    def sample_loss(values, x_b, gy_b):
        blocks = [list(block) for block in detached]
        for (i, j), value in zip(names, values):
            blocks[i][j] = value
        return (ultimus_stack_reference(x_b[None], blocks, residual=residual)[0] * gy_b).sum()

    values = [detached[i][j] for i, j in names]
    grads, grad_x = torch.func.vmap(torch.func.grad(sample_loss, argnums=(0, 1)), in_dims=(None, 0, 0))(
        values, x.detach().double(), gy.detach().double()
    )
    return [grad_x.norm().item()] + [g.norm().item() for g in grads]


def check_stack(backend, device, L, B, D, d, dtype, residual=True, bias=True):
    x, params = make_stack(L, B, D, d, dtype=dtype, device=device, bias=bias)
    y = ultimus_stack(x, params, residual=residual, backend=backend)
    assert y.dtype == dtype and y.shape == (B, D)
    gy = torch.randn(B, D, dtype=torch.float64).to(device=device, dtype=dtype)
    tensors = flat_tensors(x, params)
    grads = torch.autograd.grad(y, tensors, gy)

    tensors64 = [t.detach().double().requires_grad_() for t in tensors]
    it = iter(tensors64[1:])
    params64 = [[None if t is None else next(it) for t in block] for block in params]
    y64 = ultimus_stack_reference(tensors64[0], params64, residual=residual)
    grads64 = torch.autograd.grad(y64, tensors64, gy.double())
    assert_rel_close(y, y64, TOL[dtype], f"forward of {L} blocks")
    scales = per_sample_scales(x, params, gy, residual)
    for i, (g, g64, scale) in enumerate(zip(grads, grads64, scales)):
        assert g.dtype == tensors[i].dtype and g.shape == g64.shape
        assert_rel_close(g, g64, TOL[dtype], f"gradient of tensor {i} of {L} blocks", scale)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("L", [1, 2, 3, 4])
def test_stack_matches_the_reference_block_by_block(fused_backend, L, dtype):
    backend, device = fused_backend
    check_stack(backend, device, L, 37, 20, 3, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_stack_of_four_at_a_large_batch_on_gpu(backend):
    """The common size at a batch of many tiles per thread block: the kernels the GPU runs at scale (for
    CUDA, the forward on the tensor cores, 3xTF32), against float64 block by block; then bf16 rows with
    float32 weights, whose forward must be off by no more than its final rounding plus float32's
    tolerance (fp32 math between the blocks)."""
    device = gpu_backend_or_skip(backend)
    check_stack(backend, device, 4, 20_003, 48, 8, torch.float32)
    x, params = make_stack(4, 20_003, 48, 8, dtype=torch.float32, device=device)
    x = x.detach().bfloat16()
    y = ultimus_stack(x, params, backend=backend)
    y64 = ultimus_stack_reference(x.double(), [[t.detach().double() for t in block] for block in params])
    excess = ((y.double() - y64).abs() - 2**-8 * y64.abs()).max().item() / y64.abs().max().item()
    assert excess <= TOL[torch.float32], f"bf16 stack forward: error {excess:.2e} of max|y| beyond its rounding"


@pytest.mark.parametrize("L", [3, 5])
def test_triton_stack_backward_carries_its_scratch_rows_across_tiles(monkeypatch, L):
    """One program runs several tiles in turn, as the persistent grid does on a GPU (the interpreter would
    give each tile a program of its own): every tile recomputes its blocks' inputs in the program's two
    sets of scratch rows, the second set holding the input kept for the next block, and adds its gradient
    terms to the program's partial row after the tile before it. Three and five blocks: both ways an input
    is found (recomputed, kept), block 0 reading x, and a recomputation through three blocks."""
    device = backend_or_skip("triton")
    from ultimus_kernels.ops import ultimus_triton

    monkeypatch.setattr(ultimus_triton, "_num_programs", lambda num_tiles, device: 1)
    check_stack("triton", device, L, 1030, 48, 8, torch.float32)  # 1024-row tiles in the interpreter: two


@pytest.mark.parametrize("L", [1, 2, 4])
@pytest.mark.parametrize("residual,bias", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_stack_forward_on_tensor_cores(monkeypatch, L, residual, bias, dtype):
    """The common block's stack forward on the tensor cores (ultimus_stack_fwd_dot_kernel): 3xTF32 products
    of split float32 parts, q | k | v through the tile's own rows of y, one program over two tiles. float32
    against float64 block by block within float32's tolerance; float16 rows within their final rounding
    plus float32's tolerance, the math between the blocks in float32. (The interpreter runs the tf32
    products in float32, so dropping a cross term of the split, 2^-11 of the result, still fails here.)"""
    device = backend_or_skip("triton")
    from ultimus_kernels.ops import ultimus_triton

    monkeypatch.setattr(ultimus_triton, "_num_programs", lambda num_tiles, device: 1)
    B = 1030 if device.type == "cpu" else 300  # two tiles of 1024 rows in the interpreter, three of 128 on a GPU
    x, params = make_stack(L, B, 48, 8, dtype=torch.float32, device=device, bias=bias)
    x = x.detach().to(dtype)
    params = [[None if t is None else t.detach() for t in block] for block in params]
    assert ultimus_triton._stack_dots(x, 48, 8)
    y = torch.ops.ultimus_triton.stack_fwd(x, [t for block in params for t in block if t is not None], bias, residual)
    y64 = ultimus_stack_reference(x.double(), [[None if t is None else t.double() for t in b] for b in params],
                                  residual=residual)  # fmt: skip
    rounding = 0.0 if dtype == torch.float32 else 2.0**-11
    excess = ((y.double() - y64).abs() - rounding * y64.abs()).clamp_min(0).norm() / y64.norm()
    assert y.dtype == dtype and excess <= TOL[torch.float32], f"{L} blocks: error {excess:.2e} beyond y's rounding"


def test_triton_stack_forward_runs_on_tensor_cores_only_where_it_can(monkeypatch):
    """float32 and half rows of the common block take the tensor-core stack forward; float64 rows, other
    sizes and GPUs before sm_80 keep the one-sample-per-thread kernel."""
    from types import SimpleNamespace

    from ultimus_kernels.ops import ultimus_triton

    rows = lambda dtype, device="cpu": SimpleNamespace(dtype=dtype, device=torch.device(device))  # noqa: E731
    dots = ultimus_triton._stack_dots
    assert all(dots(rows(dtype), 48, 8) for dtype in (torch.float32, torch.float16, torch.bfloat16))
    assert not dots(rows(torch.float64), 48, 8) and not dots(rows(torch.float32), 40, 8)
    assert not dots(rows(torch.float32), 48, 4)
    monkeypatch.setattr(ultimus_triton, "interpreter_active", lambda: False)
    monkeypatch.setattr(ultimus_triton, "_CAPABILITY", {0: (7, 5), 1: (9, 0)})
    assert not dots(rows(torch.float32, "cuda:0"), 48, 8) and dots(rows(torch.float32, "cuda:1"), 48, 8)


@pytest.mark.parametrize("B,D,d", [(1, 48, 8), (70, 7, 1), (5, 17, 32)])
def test_stack_over_odd_shapes(fused_backend, B, D, d):
    backend, device = fused_backend
    check_stack(backend, device, 3, B, D, d, torch.float32)


@pytest.mark.parametrize("residual,bias", [(False, True), (True, False), (False, False)])
def test_stack_without_residual_or_bias(fused_backend, residual, bias):
    backend, device = fused_backend
    check_stack(backend, device, 2, 9, 12, 4, torch.float32, residual=residual, bias=bias)


def test_stack_with_some_biases_absent(fused_backend):
    backend, device = fused_backend
    x, params = make_stack(2, 6, 10, 3, device=device)
    params[1] = params[1]._replace(bk=None, bo=None)
    y = ultimus_stack(x, params, backend=backend)
    y_ref = ultimus_stack_reference(x, params)
    assert rel_err(y, y_ref) < 1e-12
    for g, g_ref in zip(torch.autograd.grad(y.sum(), params[1].wk), torch.autograd.grad(y_ref.sum(), params[1].wk)):
        assert rel_err(g, g_ref) < 1e-11


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_stack_in_half_precision(fused_backend, dtype):
    """Half activations with fp32 master weights: computed in fp32, returned in x's dtype, each
    parameter's gradient in its own dtype."""
    backend, device = fused_backend
    x, params = make_stack(3, 16, 12, 4, dtype=torch.float32, device=device)
    x_half = x.detach().to(dtype).requires_grad_()
    y = ultimus_stack(x_half, params, backend=backend)
    assert y.dtype == dtype
    y_ref = ultimus_stack_reference(x_half.double(), [[t.double() for t in block] for block in params])
    assert rel_err(y, y_ref) < 1e-2
    y.float().sum().backward()
    assert x_half.grad.dtype == dtype and params[0].wq.grad.dtype == torch.float32


def test_gradcheck_float64(fused_backend):
    backend, device = fused_backend
    x, params = make_stack(3, 4, 6, 2, device=device)
    tensors = flat_tensors(x, params)

    def stack(x, *flat):
        return ultimus_stack(x, [flat[i : i + 8] for i in range(0, len(flat), 8)], backend=backend)

    assert torch.autograd.gradcheck(stack, tuple(tensors))


def test_gradients_are_bit_identical_across_runs(fused_backend):
    backend, device = fused_backend
    x, params = make_stack(4, 300, 24, 5, dtype=torch.float32, device=device)
    tensors = flat_tensors(x, params)
    gy = torch.randn(300, 24, device=device)
    first = torch.autograd.grad(ultimus_stack(x, params, backend=backend), tensors, gy)
    second = torch.autograd.grad(ultimus_stack(x, params, backend=backend), tensors, gy)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_only_the_requested_gradients(fused_backend):
    backend, device = fused_backend
    x, params = make_stack(2, 5, 8, 2, device=device)
    params = [UltimusParams(*(t.detach() if t is not None else None for t in block)) for block in params]
    y = ultimus_stack(x, params, backend=backend)
    assert y.grad_fn is not None
    (gx,) = torch.autograd.grad(y.sum(), x)
    assert rel_err(gx, torch.autograd.grad(ultimus_stack_reference(x, params).sum(), x)[0]) < 1e-11
    frozen_x = x.detach()
    params[1] = params[1]._replace(wo=params[1].wo.clone().requires_grad_())
    (g_wo,) = torch.autograd.grad(ultimus_stack(frozen_x, params, backend=backend).sum(), params[1].wo)
    assert rel_err(g_wo, torch.autograd.grad(ultimus_stack_reference(frozen_x, params).sum(), params[1].wo)[0]) < 1e-11


def test_empty_batch_and_empty_stack(fused_backend):
    backend, device = fused_backend
    x, params = make_stack(3, 0, 8, 2, device=device)
    y = ultimus_stack(x, params, backend=backend)
    assert y.shape == (0, 8)
    grads = torch.autograd.grad(y.sum(), flat_tensors(x, params))
    assert grads[0].shape == (0, 8) and all((g == 0).all() for g in grads[1:])
    x = torch.randn(4, 8, device=device)
    assert ultimus_stack(x, [], backend=backend) is x


def test_nan_stays_in_its_row(fused_backend):
    backend, device = fused_backend
    x, params = make_stack(3, 6, 8, 2, dtype=torch.float32, device=device)
    x = x.detach().clone()
    x[2, 5] = float("nan")
    y = ultimus_stack(x, params, backend=backend)
    assert y[2].isnan().all() and y[[0, 1, 3, 4, 5]].isfinite().all()


def test_double_backward_and_forward_mode(fused_backend):
    backend, device = fused_backend
    x, params = make_stack(2, 5, 8, 2, device=device)
    results = []
    for run in ("fused", "reference"):
        y = ultimus_stack(x, params, backend=backend) if run == "fused" else ultimus_stack_reference(x, params)
        (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        results.append(torch.autograd.grad(g.sum(), params[1].wq)[0])
    assert rel_err(*results) < 1e-10
    tangent = torch.randn_like(x)
    primals = x.detach()
    detached = [[t.detach() if t is not None else None for t in block] for block in params]
    _, ty = torch.func.jvp(lambda x_: ultimus_stack(x_, detached, backend=backend), (primals,), (tangent,))
    _, ty_ref = torch.func.jvp(lambda x_: ultimus_stack_reference(x_, detached), (primals,), (tangent,))
    assert rel_err(ty, ty_ref) < 1e-10
    grad = torch.func.grad(lambda x_: ultimus_stack(x_, detached, backend=backend).square().sum())(primals)
    grad_ref = torch.func.grad(lambda x_: ultimus_stack_reference(x_, detached).square().sum())(primals)
    assert rel_err(grad, grad_ref) < 1e-12


# --- errors: the public function and the raw ops -------------------------------------------------


@pytest.mark.parametrize("backend", ["auto", "cpu"])
def test_bad_blocks_are_named_by_index(backend):
    """After a good call, so that the hot path (the C++ op checks) is the one refusing."""
    x, params = make_stack(3, 4, 12, 3)
    run = functools.partial(ultimus_stack, backend=backend)
    run(x, params)
    bad = list(params)
    bad[0] = bad[0]._replace(wk="wk")
    with pytest.raises(TypeError, match="ultimus: block 0: wk must be a torch.Tensor"):
        run(x, bad)
    bad = list(params)
    bad[2] = bad[2]._replace(wq=bad[2].wq[:, :5])
    with pytest.raises(ValueError, match=r"ultimus: block 2: wq must have shape \(3, 12\)"):
        run(x, bad)
    bad = list(params)
    bad[1] = bad[1]._replace(bo=bad[1].bo.to(torch.int32))
    with pytest.raises(TypeError, match="ultimus: block 1: bo must be a floating-point tensor"):
        run(x, bad)
    other_width = make_stack(1, 4, 12, 5)[1][0]
    with pytest.raises(ValueError, match="block 1 has d=5 but block 0 has d=3"):
        run(x, [params[0], other_width])
    with pytest.raises(TypeError, match="params must be a sequence of per-block"):
        run(x, params[0].wq)
    with pytest.raises(TypeError, match="block 0: expected the 8 parameters"):
        run(x, [params[0][:7]])
    with pytest.raises(TypeError, match="residual must be a bool"):
        run(x, params, residual="yes")
    with pytest.raises(ValueError, match="x must be 2-D"):
        run(x[0], params)


def test_sizes_past_the_fused_limits_are_refused_and_auto_falls_back():
    x, params = make_stack(2, 3, 257, 2)
    for backend in ("cpu",) if "cpu" in available_backends("cpu") else ():
        with pytest.raises(ValueError, match="backend 'cpu' supports D <= 256, got D=257"):
            ultimus_stack(x, params, backend=backend)
    assert rel_err(ultimus_stack(x, params), ultimus_stack_reference(x, params)) < 1e-12


def stack_op_families():
    out = []
    if "cpu" in available_backends("cpu"):
        out.append(("cpu", torch.ops.ultimus_ext.stack_fwd.default, torch.ops.ultimus_ext.stack_bwd.default))
    if "triton" in available_backends("cuda" if torch.cuda.is_available() else "cpu"):
        out.append(("triton", torch.ops.ultimus_triton.stack_fwd.default, torch.ops.ultimus_triton.stack_bwd.default))
    if torch.cuda.is_available() and "cuda" in available_backends("cuda"):
        out.append(("cuda", torch.ops.ultimus_ext.stack_fwd.default, torch.ops.ultimus_ext.stack_bwd.default))
    return out


STACK_OPS = stack_op_families()


def flat_params(params, bias=True):
    return [t for block in params for t in (block if bias else block[0::2])]


@pytest.mark.parametrize("backend,fwd,bwd", STACK_OPS, ids=[f[0] for f in STACK_OPS])
def test_raw_stack_ops_check_their_inputs(backend, fwd, bwd):
    device = backend_or_skip(backend)
    x, params = make_stack(2, 4, 12, 3, dtype=torch.float32, device=device)
    x = x.detach()
    flat = [t.detach() for t in flat_params(params)]
    cases = [
        ((x, flat[:7], True, True), ValueError, r"ultimus: params must hold 8 tensors per block \(wq, bq, wk"),
        ((x, flat[:4], False, True), ValueError, r"ultimus: block 0: wk must have shape \(3, 12\)"),
        ((x, flat[:8] + [flat[8][:, :5]] + flat[9:], True, True), ValueError, "ultimus: block 1: wq must have shape"),
        ((x.long(), flat, True, True), TypeError, "ultimus: x must be a floating-point tensor"),
        ((x, flat[:8] + [flat[8].to("meta")] + flat[9:], True, True), ValueError, "block 1: all tensors must be on"),
    ]
    for args, exc, message in cases:
        with pytest.raises(exc, match=message):
            fwd(*args)
        with pytest.raises(exc, match=message):
            bwd(torch.ones_like(x), *args, True, True)
    with pytest.raises((TypeError, ValueError, RuntimeError), match="gy must have x's shape"):
        bwd(x[:2], x, flat, True, True, True, True)


@pytest.mark.parametrize("backend,fwd,bwd", STACK_OPS, ids=[f[0] for f in STACK_OPS])
def test_raw_stack_ops_train_and_their_bwd_refuses_differentiation(backend, fwd, bwd):
    device = backend_or_skip(backend)
    for bias in (True, False):
        x, params = make_stack(3, 6, 12, 3, device=device, bias=bias)
        flat = flat_params(params, bias)
        y = fwd(x, flat, bias, True)
        y_ref = ultimus_stack_reference(x, params)
        assert rel_err(y, y_ref) < 1e-12
        grads = torch.autograd.grad(y.square().sum(), [x, *flat])
        grads_ref = torch.autograd.grad(y_ref.square().sum(), [x, *flat])
        assert all(rel_err(g, r) < 1e-11 for g, r in zip(grads, grads_ref))
        gx, gparams = bwd(torch.ones_like(y), x, flat, bias, True, True, True)
        assert gx.shape == (6, 12) and gparams.shape == (3 * (4 * 3 * 12 + 3 * 3 + 12),)
        with pytest.raises(RuntimeError, match="stack_bwd is not differentiable|no autograd formula"):
            torch.autograd.grad(gx.sum(), x)


@pytest.mark.parametrize("backend,fwd,bwd", STACK_OPS, ids=[f[0] for f in STACK_OPS])
def test_raw_stack_bwd_reads_the_incoming_gradient_in_xs_dtype(backend, fwd, bwd):
    # As the single block's bwd op (test_ops.py): a float32 gy for half-precision x is read in x's dtype.
    device = backend_or_skip(backend)
    half = torch.float16 if device.type == "cpu" and backend == "triton" else torch.bfloat16  # interpreter: no bf16
    x, params = make_stack(2, 5, 48, 8, dtype=half, device=device)
    x, flat = x.detach(), [t.detach() for t in flat_params(params)]
    gy = torch.randn(5, 48, device=device)
    wide = bwd(gy, x, flat, True, True, True, True)
    rounded = bwd(gy.to(half), x, flat, True, True, True, True)
    assert all(torch.equal(w, r) for w, r in zip(wide, rounded))


@pytest.mark.parametrize("backend,fwd,bwd", STACK_OPS, ids=[f[0] for f in STACK_OPS])
def test_opcheck_of_the_stack_ops(backend, fwd, bwd):
    device = backend_or_skip(backend)
    interpreted = backend == "triton" and device.type == "cpu"  # see test_ops.test_opcheck_of_the_ops
    fwd_utils = ("test_schema", "test_autograd_registration") if interpreted else torch.library._OPCHECK_DEFAULT_UTILS
    bwd_utils = ("test_schema",) if interpreted else ("test_schema", "test_faketensor")
    for bias in (True, False):
        x, params = make_stack(2, 5, 12, 3, dtype=torch.float32, device=device, bias=bias)
        flat = flat_params(params, bias)
        torch.library.opcheck(fwd, (x, flat, bias, True), test_utils=fwd_utils)
        plain = [t.detach() for t in flat]
        torch.library.opcheck(bwd, (torch.randn(5, 12, device=device), x.detach(), plain, bias, True, True, True),
                              test_utils=bwd_utils)  # fmt: skip


def test_torch_compile_fullgraph_of_a_stack():
    if "cpu" not in available_backends("cpu"):
        pytest.skip("cpu backend not built")
    stack = UltimusStack(3, 16, 4, backend="cpu")
    compiled = torch.compile(stack, fullgraph=True, backend="aot_eager")
    x = torch.randn(9, 16, requires_grad=True)
    y = compiled(x)
    y.square().sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    reference = copy.deepcopy(stack)
    reference.backend = "reference"
    y_ref = reference(x_ref)
    y_ref.square().sum().backward()
    assert torch.allclose(y, y_ref, atol=1e-5) and torch.allclose(x.grad, x_ref.grad, atol=1e-5)
    for p, p_ref in zip(stack.parameters(), reference.parameters()):
        assert torch.allclose(p.grad, p_ref.grad, atol=1e-4)


# --- the module and the network ------------------------------------------------------------------


def test_stack_module_is_a_sequential_of_blocks():
    stack = UltimusStack(4, 12, 3, backend="reference")
    assert isinstance(stack, nn.Sequential) and len(stack) == 4 and isinstance(stack[1], UltimusBlock)
    assert isinstance(stack[1:3], UltimusStack) and len(stack[1:3]) == 2 and stack[1:3][0] is stack[1]
    sequential = nn.Sequential(*(UltimusBlock(12, 3) for _ in range(4)))
    assert list(stack.state_dict()) == list(sequential.state_dict())
    sequential.load_state_dict(stack.state_dict())
    stack2 = UltimusStack(4, 12, 3)
    stack2.load_state_dict(sequential.state_dict())
    x = torch.randn(5, 12)
    assert torch.allclose(stack2(x), sequential(x), atol=1e-6) and torch.allclose(stack2(x), stack(x), atol=1e-6)
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        stack.backend = "fast"
    stack.backend = "auto"
    assert all(block.backend == "auto" for block in stack)


def test_stack_module_runs_blocks_set_apart_on_their_own_terms():
    stack = UltimusStack(3, 12, 3, backend="auto").double()
    x = torch.randn(4, 12, dtype=torch.float64)
    fused = stack(x)
    stack[1].backend = "reference"  # one block set apart: the stack runs block by block
    assert rel_err(stack(x), fused) < 1e-12
    stack[2] = nn.Identity()
    assert rel_err(stack(x), stack[1](stack[0](x))) < 1e-12


@pytest.mark.parametrize("backend", [b for b in FUSED if b != "cuda"])
def test_network_trains_the_same_with_the_stack_as_with_single_blocks(backend):
    """UltimusNet's blocks are an UltimusStack; the same network run block by block (a Sequential of
    the same blocks) takes the same steps, within float tolerance."""
    from model import UltimusNet

    device = backend_or_skip(backend)
    torch.manual_seed(1)
    net = UltimusNet(backend=backend).to(device)
    single = copy.deepcopy(net)
    single.blocks = nn.Sequential(*single.blocks)
    images, labels = torch.randn(16, 3, 32, 32, device=device), torch.randint(0, 10, (16,), device=device)
    for model in (net, single):
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(images), labels).backward()
            opt.step()
    for (name, p), p_single in zip(net.named_parameters(), single.parameters()):
        assert rel_err(p, p_single) < 1e-4, name


def test_stack_block_parameters_are_named_like_ultimus():
    assert PARAM_NAMES == UltimusParams._fields
    x, params = make_stack(2, 3, 8, 2)
    y = ultimus_stack(x, params, backend="reference")
    y_loop = ultimus(ultimus(x, *params[0], backend="reference"), *params[1], backend="reference")
    assert torch.equal(y, y_loop)
