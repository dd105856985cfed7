"""The CUDA kernels, run on the CPU: csrc/cuda/ultimus_cuda.cuh compiled with the C++ compiler against
the CUDA emulation of csrc/cuda/emulation.h (one std::thread per CUDA thread, a barrier per
__syncthreads). The launchers are the CUDA extension's own, so these tests check, without a GPU, what
the kernels compute and which kernel each call gets: the rows kernels (D = 48, d = 8, float32 math)
and the generic ones (every other size, float64), against the float64 reference. The GPU tests run
the same kernels on the hardware (tests/test_fused.py and the others, with a GPU)."""

import pytest
import torch
from _cuda_emulation import NoCompiler, build
from test_stack import make_stack, per_sample_scales

from _util import assert_rel_close, make_inputs, per_sample_norms
from ultimus_kernels import ultimus_reference, ultimus_stack_reference

TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
ROWS = (48, 8)  # the size the rows kernels are compiled for


@pytest.fixture(scope="module")
def emu():
    try:
        module = build()  # a failed build fails the tests; only a missing compiler skips them
    except NoCompiler as exc:
        pytest.skip(str(exc))
    module.set_multiprocessors(2)  # a persistent grid of 2 blocks: several tiles per block at small B
    return module


def flat_param_grads(grads, inputs):
    """The bwd op's flat vector (ultimus.h's partial-row layout) from per-tensor gradients; absent
    biases contribute nothing to the comparison."""
    gwq, gbq, gwk, gbk, gwv, gbv, gwo, gbo = grads
    weights = [gwq, gwk, gwv, gwo]
    biases = [gbq, gbk, gbv, gbo] if inputs.bq is not None else []
    return torch.cat([g.reshape(-1) for g in weights + biases])


def check_block(emu, B, D, d, dtype, family, residual=True, bias=True, logit_scale=1.0, need=(True, True)):
    inputs = make_inputs(B, D, d, bias=bias, logit_scale=logit_scale)
    gy = torch.randn(B, D, dtype=torch.float64)
    x, *params = [None if t is None else t.detach().to(dtype) for t in inputs]
    y = emu.fwd(x, *params, residual)
    # bf16 rows of the common size go forward on the tensor cores (from sm_80)
    fwd_family = "bf16 tensor cores" if family == "rows" and dtype == torch.bfloat16 else family
    assert emu.last_kernel() == fwd_family and y.dtype == dtype and y.shape == (B, D)
    gx, flat = emu.bwd(gy.to(dtype), x, *params, residual, *need)
    # half-precision rows of the common size go backward with their projections on the tensor cores
    bwd_family = "tf32 tensor cores" if family == "rows" and dtype in (torch.float16, torch.bfloat16) else family
    assert emu.last_kernel() == bwd_family

    y64 = ultimus_reference(*inputs, residual=residual)
    tensors = inputs.tensors()
    grads64 = torch.autograd.grad(y64, tensors, gy)
    assert_rel_close(y, y64, TOL[dtype], "forward")
    scales = per_sample_norms(inputs, gy, residual)
    if need[0]:
        assert gx.dtype == dtype
        assert_rel_close(gx, grads64[0], TOL[dtype], "gx")
    else:
        assert gx.numel() == 0
    if need[1]:
        it = iter(grads64[1:])
        full = [None if t is None else next(it) for t in inputs[1:]]
        want = flat_param_grads(full, inputs)
        got = flat[: want.numel()]  # with no biases, their slots are left out of the comparison
        assert flat.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert_rel_close(got, want, TOL[dtype], "parameter gradients", max(scales[1:]))
    else:
        assert flat.numel() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B", [1, 127, 700])
def test_rows_kernels_match_the_reference(emu, B, dtype):
    check_block(emu, B, *ROWS, dtype, "rows")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_rows_kernels_without_residual_or_bias(emu, residual, bias, dtype):
    check_block(emu, 300, *ROWS, dtype, "rows", residual=residual, bias=bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("need", [(True, False), (False, True)])
def test_rows_backward_computes_only_what_is_asked(emu, need, dtype):
    check_block(emu, 260, *ROWS, dtype, "rows", need=need)


@pytest.mark.parametrize(
    "B, D, d, dtype",
    [
        (300, *ROWS, torch.float64),
        (257, 20, 5, torch.float32),
        (70, 48, 12, torch.float32),
        (90, 33, 3, torch.bfloat16),
    ],
)
def test_generic_kernels_serve_every_other_case(emu, B, D, d, dtype):
    check_block(emu, B, D, d, dtype, "generic")


@pytest.mark.parametrize("bias", [True, False])
def test_generic_kernels_at_the_largest_sizes_read_parameters_from_device_memory(emu, bias):
    """float64 at D = 256, d = 32: one block's parameters are 265 KB, past an H100's 227 KB of shared memory
    per block (these sizes raised "needs ... bytes of shared memory"). The generic kernels then leave them
    in device memory and give the shared memory to the tiles: the single block through the stack kernels
    with L = 1. float32 near the limits takes that path for a stack's backward (three tiles)."""
    check_block(emu, 40, 256, 32, torch.float64, "generic", bias=bias)
    check_stack(emu, 2, 256, 32, torch.float64, "generic", B=40, bias=bias)
    check_stack(emu, 2, 251, 30, torch.float32, "generic", B=20, bias=bias)


def test_generic_kernels_on_a_gpu_with_little_shared_memory(emu):
    """With 48 KB of shared memory the parameters of D = 100, d = 20 (34 KB in float32) leave too little
    room for the tiles: they stay in device memory. Past what even an 8-row tile needs, a clear error."""
    try:
        emu.set_shared_memory_per_block(48 * 1024)
        check_block(emu, 37, 100, 20, torch.float32, "generic")
        check_block(emu, 37, 100, 20, torch.float32, "generic", bias=False, need=(False, True))
        check_stack(emu, 3, 100, 20, torch.float64, "generic", B=37)
        emu.set_shared_memory_per_block(8 * 1024)  # an 8-row float64 x tile of D = 256 is 16 KB
        x = torch.randn(5, 256, dtype=torch.float64)
        params = [t.detach() for t in make_inputs(5, 256, 32)[1:]]
        with pytest.raises(RuntimeError, match=r"D=256, d=32 needs \d+ bytes of shared memory, more than this GPU's"):
            emu.fwd(x, *params, True)
    finally:
        emu.set_shared_memory_per_block(227 * 1024)


def test_gpus_without_tf32_tensor_cores_get_the_generic_backward(emu):
    """The rows backward sums its weight gradients with tf32 mma.sync (sm_80 on): on a Turing-class
    GPU the forward is still the rows kernel's and the backward the generic one's."""
    try:
        emu.set_compute_capability_major(7)
        inputs = make_inputs(200, *ROWS, dtype=torch.float32, requires_grad=False)
        emu.fwd(*inputs, True)
        assert emu.last_kernel() == "rows"
        gx, flat = emu.bwd(torch.randn(200, 48), *inputs, True, True, True)
        assert emu.last_kernel() == "generic"
    finally:
        emu.set_compute_capability_major(9)
    check_block(emu, 200, *ROWS, torch.float32, "rows")


@pytest.mark.parametrize("B", [50, 300])
def test_bf16_forward_on_the_tensor_cores_keeps_fp32_accuracy(emu, B):
    """The bf16 forward's products run as bf16 tensor-core products of split operands (good to about
    2^-16 of their terms): its error must be the final rounding to bf16 (2^-8 of y) plus that, not the
    2^-8 of the terms that bf16 math would leave (those of size 1 here)."""
    inputs = make_inputs(B, *ROWS, requires_grad=False)
    x = inputs.x.to(torch.bfloat16)
    params = [None if t is None else t.float() for t in inputs[1:]]
    y = emu.fwd(x, *params, True)
    assert emu.last_kernel() == "bf16 tensor cores"
    y32 = ultimus_reference(x.double(), *[None if t is None else t.double() for t in params])
    excess = ((y.double() - y32).abs() - 2**-8 * y32.abs()).max().item()  # bf16: unit roundoff 2^-8
    assert excess <= 1e-4, f"bf16 forward: error {excess:.2e} beyond the final bf16 rounding"
    emu.set_compute_capability_major(7)
    try:
        assert torch.equal(emu.fwd(x, *params, True), y) or emu.last_kernel() == "rows"
        assert emu.last_kernel() == "rows"  # before sm_80: the fp32-FMA rows kernel
    finally:
        emu.set_compute_capability_major(9)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_backward_on_the_tensor_cores_keeps_fp32_accuracy(emu, dtype):
    """The half-precision backward's projections run as tf32 tensor-core products: exact rows times
    split weights, and split g times split weights for gx. gx's error must be its final rounding (the
    dtype's unit roundoff of gx) plus 1e-4, and the float32 parameter gradients must hold float32's
    tolerance, against float64 math on the same half-precision rows; one-pass tf32 products (2^-11)
    would fail both."""
    B = 300
    inputs = make_inputs(B, *ROWS, requires_grad=False)
    x, gy = inputs.x.to(dtype), torch.randn(B, 48).to(dtype)
    params = [None if t is None else t.float() for t in inputs[1:]]
    gx, flat = emu.bwd(gy, x, *params, True, True, True)
    assert emu.last_kernel() == "tf32 tensor cores"
    again = emu.bwd(gy, x, *params, True, True, True)
    assert torch.equal(again[0], gx) and torch.equal(again[1], flat)  # deterministic
    inputs64 = type(inputs)(x.double().requires_grad_(), *[t.double().requires_grad_() for t in params])
    y64 = ultimus_reference(*inputs64)
    grads64 = torch.autograd.grad(y64, inputs64.tensors(), gy.double())
    unit = 2**-8 if dtype == torch.bfloat16 else 2**-11
    excess = ((gx.double() - grads64[0]).abs() - unit * grads64[0].abs()).max().item()
    assert excess <= 1e-4, f"{dtype} backward: gx error {excess:.2e} beyond its final rounding"
    scale = max(per_sample_norms(inputs64, gy.double(), True)[1:])
    assert_rel_close(flat, flat_param_grads(grads64[1:], inputs64), TOL[torch.float32], "parameter gradients", scale)


def test_huge_finite_logits_stay_exact(emu):
    """Logits near 1e30: the row maximum is exact, so the softmax neither overflows nor loses its top entry."""
    check_block(emu, 200, *ROWS, torch.float32, "rows", logit_scale=1e15)


def test_unaligned_or_strided_activations(emu):
    """A view at an offset of one element cannot be read as 16-byte vectors: the generic kernel serves
    it. A transposed (non-contiguous) x is made contiguous once and gets the rows kernel."""
    inputs = make_inputs(65, *ROWS, dtype=torch.float32, requires_grad=False)
    params = list(inputs[1:])
    storage = torch.randn(65 * 48 + 1)
    x = storage[1:].view(65, 48)
    assert x.data_ptr() % 16 != 0
    y = emu.fwd(x, *params, True)
    assert emu.last_kernel() == "generic"
    assert_rel_close(y, ultimus_reference(x.double(), *[p.double() for p in params]), 2e-5)
    xt = torch.randn(48, 65).t()
    y = emu.fwd(xt, *params, True)
    assert emu.last_kernel() == "rows"
    assert_rel_close(y, ultimus_reference(xt.double(), *[p.double() for p in params]), 2e-5)


def test_nan_stays_in_its_row_and_gradients_are_deterministic(emu):
    inputs = make_inputs(300, *ROWS, dtype=torch.float32, requires_grad=False)
    x = inputs.x.clone()
    x[5, 7] = float("nan")
    y = emu.fwd(x, *inputs[1:], True)
    assert y[5].isnan().all() and not y[torch.arange(300) != 5].isnan().any()
    gy = torch.randn(300, 48)
    gx, _ = emu.bwd(gy, x, *inputs[1:], True, True, False)
    assert not gx[torch.arange(300) != 5].isnan().any()
    y16 = emu.fwd(x.bfloat16(), *inputs[1:], True)  # the bf16 forward's rows pass through shared fragments
    assert emu.last_kernel() == "bf16 tensor cores"
    assert y16[5].isnan().all() and not y16[torch.arange(300) != 5].isnan().any()
    gx16, _ = emu.bwd(gy.bfloat16(), x.bfloat16(), *inputs[1:], True, True, False)  # and its backward's too
    assert emu.last_kernel() == "tf32 tensor cores"
    assert not gx16[torch.arange(300) != 5].isnan().any()
    runs = [emu.bwd(gy, inputs.x, *inputs[1:], True, True, True) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_empty_batch(emu):
    inputs = make_inputs(0, *ROWS, dtype=torch.float32, requires_grad=False)
    launches = emu.launches()
    assert emu.fwd(*inputs, True).shape == (0, 48)
    gx, flat = emu.bwd(torch.zeros(0, 48), *inputs, True, True, True)
    assert gx.shape == (0, 48) and torch.equal(flat, torch.zeros(4 * 8 * 48 + 3 * 8 + 48))  # no samples: zero
    assert emu.launches() == launches


def check_stack(emu, L, D, d, dtype, family, B=300, residual=True, bias=True):
    x, params = make_stack(L, B, D, d, bias=bias)
    flat = [t.detach().to(dtype) for block in params for t in block if t is not None]
    y = emu.stack_fwd(x.detach().to(dtype), flat, bias, residual)
    assert emu.last_kernel() == family
    y64 = ultimus_stack_reference(x, params, residual=residual)
    assert_rel_close(y, y64, TOL[dtype], "stack forward")
    gy = torch.randn(B, D, dtype=torch.float64)
    gx, grads = emu.stack_bwd(gy.to(dtype), x.detach().to(dtype), flat, bias, residual, True, True)
    assert emu.last_kernel() == family
    tensors = [x] + [t for block in params for t in block if t is not None]
    grads64 = torch.autograd.grad(y64, tensors, gy)
    scales = per_sample_scales(x, params, gy, residual)
    assert_rel_close(gx, grads64[0], TOL[dtype], "stack gx")
    per_block = grads.view(L, -1)
    per = 8 if bias else 4
    for block in range(L):
        mine = list(grads64[1 + per * block : 1 + per * (block + 1)])
        full = mine if bias else [mine[0], None, mine[1], None, mine[2], None, mine[3], None]
        want = flat_param_grads(full, make_inputs(1, D, d, bias=bias))
        got = per_block[block][: want.numel()]  # without biases, their slots are left out of the comparison
        assert_rel_close(got, want, TOL[dtype], f"block {block}'s parameter gradients", max(scales[1:]))


@pytest.mark.parametrize(
    "L, D, d, dtype",
    [(1, *ROWS, torch.float32), (3, *ROWS, torch.float32), (2, 20, 5, torch.float32), (2, *ROWS, torch.bfloat16)],
)
def test_stack_kernels_match_the_reference_block_by_block(emu, L, D, d, dtype):
    # the stack kernels of the common size run on the tensor cores (from sm_80)
    check_stack(emu, L, D, d, dtype, "tf32 tensor cores" if (D, d) == ROWS else "generic")


@pytest.mark.parametrize("B", [1, 5, 33])
def test_tensor_core_kernels_at_batches_below_a_tile(emu, B):
    """Fewer rows than a warp's 32 (or a thread block's 128): the rows past B are zeros in the
    fragments, and must reach neither the outputs nor the weight gradients."""
    check_stack(emu, 2, *ROWS, torch.float32, "tf32 tensor cores", B=B)
    check_block(emu, B, *ROWS, torch.bfloat16, "rows")  # the bf16 forward and half backward on the tensor cores


@pytest.mark.parametrize("residual,bias", [(False, True), (True, False), (False, False)])
def test_tensor_core_stack_without_residual_or_bias(emu, residual, bias):
    check_stack(emu, 3, *ROWS, torch.float32, "tf32 tensor cores", B=200, residual=residual, bias=bias)


def test_tensor_core_stack_backward_keeps_fp32_accuracy_and_is_deterministic(emu):
    """Every product of the stack backward runs in 3xTF32 from split operands; one-pass tf32 (2^-11 of
    the terms) would miss float32's tolerance on gx and on the weight gradients (check_stack). Four
    blocks at a batch of several tiles per thread block; then bit-identical reruns."""
    check_stack(emu, 4, *ROWS, torch.float32, "tf32 tensor cores", B=600)
    x, params = make_stack(4, 600, *ROWS, dtype=torch.float32)
    flat = [t.detach() for block in params for t in block]
    gy = torch.randn(600, 48)
    runs = [emu.stack_bwd(gy, x.detach(), flat, True, True, True, True) for _ in range(2)]
    assert emu.last_kernel() == "tf32 tensor cores"
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_stack_forward_on_the_tensor_cores_keeps_fp32_accuracy(emu, dtype, residual, bias):
    """The stack forward's projections run as 3xTF32 tensor-core products of split rows and split
    weights, block after block on rows kept in shared memory. Its error must be the final rounding to
    the dtype plus float32's tolerance, against float64 math on the same rounded inputs; one-pass tf32
    products (2^-11 of their terms) would fail it. Four blocks without a residual can amplify rounding
    (float32 eager itself then misses 2e-5 of max|y| on about 1 input in 100): the tolerance grows to 8x
    what float32 eager makes on the same inputs (3xTF32 drops terms at 2^-22 and the fast exp2 errs by
    2 ulp, a few times float32's own rounding; with the 8x, 0 of 400 random stacks failed, with 2x 7).
    B = 300: rows past B pad a warp's last 32, and the persistent grid walks several tiles per warp."""
    L, B = 4, 300
    x, params = make_stack(L, B, *ROWS, bias=bias)
    x = x.detach().to(dtype)
    blocks = [[None if t is None else t.detach().float() for t in block] for block in params]
    flat = [t for block in blocks for t in block if t is not None]
    y = emu.stack_fwd(x, flat, bias, residual)
    assert emu.last_kernel() == "tf32 tensor cores" and y.dtype == dtype
    blocks64 = [[None if t is None else t.double() for t in block] for block in blocks]
    y64 = ultimus_stack_reference(x.double(), blocks64, residual=residual)
    y32 = ultimus_stack_reference(x.float(), blocks, residual=residual)
    unit = {torch.float32: 0.0, torch.float16: 2**-11, torch.bfloat16: 2**-8}[dtype]
    scale = y64.abs().max().item()
    tol = max(TOL[torch.float32], 8 * (y32.double() - y64).abs().max().item() / scale)
    excess = ((y.double() - y64).abs() - unit * y64.abs()).max().item() / scale
    assert excess <= tol, f"{dtype} stack forward: error {excess:.2e} of max|y| beyond its rounding, over {tol:.1e}"
    assert torch.equal(emu.stack_fwd(x, flat, bias, residual), y)  # deterministic


def test_stack_backward_falls_back_to_the_rows_kernel(emu):
    """Where the tensor-core stack backward's shared memory (L blocks' weights, 9 KB each, and the
    74 KB tile) does not fit but the rows kernel's does, the rows kernel serves, with the same results."""
    x, params = make_stack(4, 130, *ROWS, dtype=torch.float32)
    flat = [t.detach() for block in params for t in block]
    gy = torch.randn(130, 48)
    gx, grads = emu.stack_bwd(gy, x.detach(), flat, True, True, True, True)
    assert emu.last_kernel() == "tf32 tensor cores"
    try:
        emu.set_shared_memory_per_block(100 * 1024)
        gx_rows, grads_rows = emu.stack_bwd(gy, x.detach(), flat, True, True, True, True)
        assert emu.last_kernel() == "rows"
    finally:
        emu.set_shared_memory_per_block(227 * 1024)
    assert_rel_close(gx, gx_rows.double(), 2e-5, "gx, tensor cores against rows")
    assert_rel_close(grads, grads_rows.double(), 2e-5, "parameter gradients, tensor cores against rows")


def test_how_many_blocks_the_tensor_core_stack_kernels_hold(emu):
    """On an H100's 227 KB of shared memory per block: the forward's fragments for up to 14 blocks, the
    backward's weights for up to 17 (the README says so); one more block and the rows kernels serve."""
    for L, fwd, bwd in [(14, "tf32 tensor cores", "tf32 tensor cores"), (15, "rows", "tf32 tensor cores"),
                        (17, "rows", "tf32 tensor cores"), (18, "rows", "rows")]:  # fmt: skip
        x, params = make_stack(L, 40, *ROWS, dtype=torch.float32)
        flat = [t.detach() for block in params for t in block]
        emu.stack_fwd(x.detach(), flat, True, True)
        assert emu.last_kernel() == fwd, L
        emu.stack_bwd(torch.randn(40, 48), x.detach(), flat, True, True, True, True)
        assert emu.last_kernel() == bwd, L


def test_stack_forward_falls_back_to_the_rows_kernel(emu):
    """Before sm_80, or where the L blocks' tensor-core fragments (14.6 KB a block, and 20 KB of the
    warps' scratch) do not fit in shared memory but their RowsLayouts (6.4 KB) do, the stack forward is
    the rows kernel's, with the same results."""
    x, params = make_stack(3, 130, *ROWS, dtype=torch.float32)
    flat = [t.detach() for block in params for t in block]
    y = emu.stack_fwd(x.detach(), flat, True, True)
    assert emu.last_kernel() == "tf32 tensor cores"
    y64 = ultimus_stack_reference(x.double(), [[t.double() for t in block] for block in params])
    assert_rel_close(y, y64, 2e-5, "stack forward on the tensor cores")
    try:
        emu.set_compute_capability_major(7)
        assert_rel_close(emu.stack_fwd(x.detach(), flat, True, True), y64, 2e-5, "sm_70 stack forward")
        assert emu.last_kernel() == "rows"
        emu.set_compute_capability_major(9)
        emu.set_shared_memory_per_block(48 * 1024)
        assert_rel_close(emu.stack_fwd(x.detach(), flat, True, True), y64, 2e-5, "48 KB stack forward")
        assert emu.last_kernel() == "rows"
    finally:
        emu.set_compute_capability_major(9)
        emu.set_shared_memory_per_block(227 * 1024)


def test_nan_stays_in_its_row_through_the_tensor_core_stack(emu):
    """A row's A fragments feed only that row's accumulators: a NaN in x row 5 leaves every other row
    of the stack's output, and of its input gradient, finite."""
    x, params = make_stack(4, 200, *ROWS, dtype=torch.float32)
    x = x.detach().clone()
    x[5, 7] = float("nan")
    flat = [t.detach() for block in params for t in block]
    y = emu.stack_fwd(x, flat, True, True)
    assert emu.last_kernel() == "tf32 tensor cores"
    assert y[5].isnan().all() and y[torch.arange(200) != 5].isfinite().all()
    gx, _ = emu.stack_bwd(torch.randn(200, 48), x, flat, True, True, True, False)
    assert emu.last_kernel() == "tf32 tensor cores"
    assert gx[5].isnan().any() and gx[torch.arange(200) != 5].isfinite().all()


def test_a_stack_past_what_shared_memory_holds_gets_the_generic_kernels(emu):
    """The rows stack kernels keep every block's weights on chip: with shared memory for five blocks'
    weights, a stack of six gets the generic kernels (which hold one block at a time)."""
    try:
        emu.set_shared_memory_per_block(32 * 1024)
        check_stack(emu, 6, *ROWS, torch.float32, "generic")
    finally:
        emu.set_shared_memory_per_block(227 * 1024)


@pytest.mark.parametrize("need", [(True, False), (False, True)])
def test_stack_backward_computes_only_what_is_asked(emu, need):
    x, params = make_stack(2, 140, *ROWS, dtype=torch.float32)
    flat = [t.detach() for block in params for t in block]
    gy = torch.randn(140, 48)
    gx, grads = emu.stack_bwd(gy, x.detach(), flat, True, True, *need)
    assert emu.last_kernel() == "tf32 tensor cores"
    full_gx, full_grads = emu.stack_bwd(gy, x.detach(), flat, True, True, True, True)
    if need[0]:
        assert torch.equal(gx, full_gx) and grads.numel() == 0
    else:
        assert gx.numel() == 0 and torch.equal(grads, full_grads)
    empty_gx, empty_grads = emu.stack_bwd(gy[:0], x.detach()[:0], flat, True, True, True, True)
    assert empty_gx.shape == (0, 48) and not empty_grads.any()


def test_a_kernel_keeps_the_largest_shared_memory_it_was_allowed(emu):
    """Past 48 KB a kernel needs an allowance (cudaFuncSetAttribute) for its shared memory, and the
    emulation fails a launch beyond it, as a GPU does. A stack kernel launched for 6 blocks, then 5,
    then 6 again must still be allowed the 6 blocks' shared memory: the allowance only ever grows."""
    for L in (6, 5, 6):
        x, params = make_stack(L, 130, *ROWS, dtype=torch.float32)
        flat = [t.detach() for block in params for t in block]
        emu.stack_bwd(torch.randn(130, 48), x.detach(), flat, True, True, True, True)
        assert emu.last_kernel() == "tf32 tensor cores"
