"""docs/ULTIMUS_MATH.md, executed: its backward and forward-mode formulas, written out batched in plain
PyTorch, against autograd of the reference; its exact-exponent form against the textbook softmax; its
partial-row layout against the ops' flat gradient vector."""

import math

import torch
import torch.func as tf

from _util import make_inputs, rel_err
from ultimus_kernels import ultimus_reference
from ultimus_kernels.ops.autograd import param_grads
from ultimus_kernels.reference import ultimus_reference_jvp


def forward_parts(x, wq, bq, wk, bk, wv, bv, wo, bo):
    q, k, v = x @ wq.T + bq, x @ wk.T + bk, x @ wv.T + bv
    s = 1 / math.sqrt(wq.shape[0])
    A = torch.softmax(s * q[:, :, None] * k[:, None, :], dim=2)
    z = torch.einsum("bi,bij->bj", v, A)
    return q, k, v, A, z, s


def test_backward_formulas_match_autograd():
    args = make_inputs(7, 12, 5)
    x, wq, bq, wk, bk, wv, bv, wo, bo = args
    gy = torch.randn(7, 12, dtype=torch.float64)
    with torch.no_grad():
        q, k, v, A, z, s = forward_parts(*args)
        gz = gy @ wo  # gz = Wo^T gy
        r = (A * gz[:, None, :]).sum(2)  # r[i] = sum_j A[i, j] gz[j] = gv[i]
        gS = A * v[:, :, None] * (gz[:, None, :] - r[:, :, None])
        gq = s * (gS * k[:, None, :]).sum(2)
        gk = s * (gS * q[:, :, None]).sum(1)
        gv = r
        gx = gy + gq @ wq + gk @ wk + gv @ wv
        doc = [gx, gq.T @ x, gq.sum(0), gk.T @ x, gk.sum(0), gv.T @ x, gv.sum(0), gy.T @ z, gy.sum(0)]
    autograd = torch.autograd.grad(ultimus_reference(*args), args, gy)
    for mine, theirs in zip(doc, autograd):
        assert rel_err(mine, theirs) < 1e-13


def test_forward_mode_formula_matches_autograd():
    args = make_inputs(5, 9, 4, requires_grad=False)
    tangents = [torch.randn_like(t) for t in args]
    _, expected = tf.jvp(lambda *a: ultimus_reference(*a), tuple(args), tuple(tangents))
    assert rel_err(ultimus_reference_jvp(args, tangents), expected) < 1e-13
    # A missing tangent means zero.
    partial = [tangents[0]] + [None] * 8
    _, expected_x_only = tf.jvp(lambda x_: ultimus_reference(x_, *args.params), (args.x,), (tangents[0],))
    assert rel_err(ultimus_reference_jvp(args, partial), expected_x_only) < 1e-13


def test_exact_exponent_form_equals_the_softmax():
    q = torch.randn(50, 8, dtype=torch.float64) * 3
    k = torch.randn(50, 8, dtype=torch.float64) * 3
    s = 1 / math.sqrt(8)
    sq = s * q
    k_ext = torch.where(sq >= 0, k.amax(1, keepdim=True), k.amin(1, keepdim=True))
    exponent = sq[:, :, None] * (k[:, None, :] - k_ext[:, :, None])
    assert (exponent <= 0).all() and (exponent.amax(2) == 0).all()
    A = exponent.exp() / exponent.exp().sum(2, keepdim=True)
    assert rel_err(A, torch.softmax(sq[:, :, None] * k[:, None, :], dim=2)) < 1e-14


def test_partial_row_layout_cuts_into_the_eight_gradients():
    D, d = 6, 3
    sizes = [d * D] * 4 + [d] * 3 + [D]
    flat = torch.cat([torch.full((n,), float(i)) for i, n in enumerate(sizes)])
    gwq, gbq, gwk, gbk, gwv, gbv, gwo, gbo = param_grads(flat, D, d)
    assert gwq.shape == (d, D) and gwo.shape == (D, d) and gbo.shape == (D,)
    assert [t.unique().item() for t in (gwq, gwk, gwv, gwo, gbq, gbk, gbv, gbo)] == list(range(8))
