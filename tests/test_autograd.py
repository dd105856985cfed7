"""Autograd beyond the first backward, on every backend: double backward (gradient penalties,
Hessian-vector products), forward-mode AD (torch.func.jvp, make_dual), torch.func.grad / jacrev /
vmap, and the named UltimusFunction. Every result is compared with the float64 reference."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.func as tf

from _util import FUSED, backend_or_skip, make_inputs, rel_err
from ultimus_kernels import UltimusFunction, ultimus, ultimus_reference

BACKENDS = ("reference", *FUSED)
NAMES = ("x", "wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo")


def device_for(backend):
    return torch.device("cpu") if backend == "reference" else backend_or_skip(backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("residual", [True, False])
def test_double_backward_matches_reference(backend, residual):
    """A gradient penalty: d/dθ ||dL/dx||^2 through the fused backward."""
    device = device_for(backend)
    args = make_inputs(5, 12, 4, device=device)

    def penalty_grads(fn):
        y = fn(*args, residual=residual)
        (gx,) = torch.autograd.grad(y.square().sum(), [args.x], create_graph=True)
        return torch.autograd.grad(gx.square().sum() + y.sum(), args.tensors())

    got = penalty_grads(lambda *a, **k: ultimus(*a, backend=backend, **k))
    want = penalty_grads(ultimus_reference)
    for name, g, g_ref in zip(NAMES, got, want):
        assert rel_err(g, g_ref) < 1e-10, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_hessian_vector_product_matches_reference(backend):
    device = device_for(backend)
    args = make_inputs(4, 10, 3, device=device, bias=False)
    v = [torch.randn_like(t) for t in args.tensors()]
    hvps = []
    for fn in (lambda *a: ultimus(*a, backend=backend), ultimus_reference):
        grads = torch.autograd.grad(fn(*args).pow(3).sum(), args.tensors(), create_graph=True)
        hvps.append(torch.autograd.grad(sum((g * u).sum() for g, u in zip(grads, v)), args.tensors()))
    for g, g_ref in zip(*hvps):
        assert rel_err(g, g_ref) < 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_func_jvp_matches_reference(backend):
    device = device_for(backend)
    args = make_inputs(6, 12, 4, device=device, requires_grad=False)
    tangents = tuple(torch.randn_like(t) for t in args.tensors())

    def f(backend_fn):
        def call(x, wq, bq, wk, bk, wv, bv, wo, bo):
            return backend_fn(x, wq, bq, wk, bk, wv, bv, wo, bo)

        return call

    y, ty = tf.jvp(f(lambda *a: ultimus(*a, backend=backend)), tuple(args), tangents)
    y_ref, ty_ref = tf.jvp(f(ultimus_reference), tuple(args), tangents)
    assert rel_err(y, y_ref) < 1e-12
    assert rel_err(ty, ty_ref) < 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_ad_dual_tensors_match_reference(backend):
    """make_dual / unpack_dual with a tangent on x and on wo only (the others have none)."""
    device = device_for(backend)
    args = make_inputs(5, 8, 2, device=device, requires_grad=False)
    tx, two = torch.randn_like(args.x), torch.randn_like(args.wo)
    results = []
    for fn in (lambda *a: ultimus(*a, backend=backend), ultimus_reference):
        with fwAD.dual_level():
            dual = args._replace(x=fwAD.make_dual(args.x, tx), wo=fwAD.make_dual(args.wo, two))
            out = fwAD.unpack_dual(fn(*dual))
            assert out.tangent is not None
            results.append(out.tangent)
    assert rel_err(*results) < 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_func_grad_jacrev_and_vmap(backend):
    device = device_for(backend)
    inputs = make_inputs(3, 6, 2, device=device, requires_grad=False)
    x, params = inputs.x, inputs.params

    def block(fn):
        return lambda x_: fn(x_, *params)

    fused, ref = block(lambda *a: ultimus(*a, backend=backend)), block(ultimus_reference)
    assert (
        rel_err(tf.grad(lambda x_: fused(x_).square().sum())(x), tf.grad(lambda x_: ref(x_).square().sum())(x)) < 1e-12
    )
    assert rel_err(tf.jacrev(fused)(x), tf.jacrev(ref)(x)) < 1e-12
    assert rel_err(tf.jacfwd(fused)(x), tf.jacfwd(ref)(x)) < 1e-12
    stacked = torch.randn(4, 3, 6, dtype=x.dtype, device=device)  # vmap over 4 batches of 3 samples
    assert rel_err(tf.vmap(fused)(stacked), tf.vmap(ref)(stacked)) < 1e-12

    # Per-sample weight gradients: vmap of grad with respect to a weight.
    def loss_of_wo(fn):
        return lambda wo, x_: fn(x_[None], *params._replace(wo=wo)).square().sum()

    per_sample = tf.vmap(tf.grad(loss_of_wo(lambda *a: ultimus(*a, backend=backend))), in_dims=(None, 0))
    per_sample_ref = tf.vmap(tf.grad(loss_of_wo(ultimus_reference)), in_dims=(None, 0))
    assert rel_err(per_sample(params.wo, x), per_sample_ref(params.wo, x)) < 1e-12


@pytest.mark.parametrize("backend", FUSED)
def test_ultimus_function_runs_every_fused_backend(backend):
    device = backend_or_skip(backend)
    args = make_inputs(4, 12, 3, device=device)
    y = UltimusFunction.apply(backend, True, *args)
    assert "UltimusFunction" in type(y.grad_fn).__name__
    y_ref = ultimus_reference(*args)
    grads = torch.autograd.grad(y.sum(), args.tensors())
    grads_ref = torch.autograd.grad(y_ref.sum(), args.tensors())
    assert rel_err(y, y_ref) < 1e-12
    for g, g_ref in zip(grads, grads_ref):
        assert rel_err(g, g_ref) < 1e-12


@pytest.mark.parametrize("backend", FUSED)
def test_public_path_takes_the_cheapest_autograd_boundary(backend):
    """The C++ ops' own C++ autograd node for cpu/cuda; UltimusFunction for Triton and under forward AD."""
    device = backend_or_skip(backend)
    args = make_inputs(4, 12, 3, device=device)
    node = ultimus(*args, backend=backend).grad_fn.name()
    assert ("UltimusAutograd" in node) if backend in ("cpu", "cuda") else ("UltimusFunction" in node), node
