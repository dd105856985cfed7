"""UltimusNet: parameter count, structure, summary, backends."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _util import backend_or_skip, rel_err
from model import UltimusNet, summary

ROOT = Path(__file__).resolve().parent.parent


def test_parameter_count_is_the_assignments():
    assert sum(p.numel() for p in UltimusNet().parameters()) == 25_882


def test_state_dict_keys_and_shapes():
    sd = UltimusNet().state_dict()
    assert sd["features.0.weight"].shape == (16, 3, 3, 3)
    assert sd["features.4.weight"].shape == (48, 32, 3, 3)
    for i in range(4):
        assert sd[f"blocks.{i}.q.weight"].shape == (8, 48)
        assert sd[f"blocks.{i}.out.weight"].shape == (48, 8)
    assert sd["head.weight"].shape == (10, 48)
    assert set(UltimusNet(backend="reference").state_dict()) == set(UltimusNet(backend="auto").state_dict())


def test_batchnorm_and_dropout_options():
    net = UltimusNet(batchnorm=True, dropout=0.1)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) == 3
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_forward_shape_and_backend_switch():
    net = UltimusNet(backend="reference")
    images = torch.randn(3, 3, 32, 32)
    out = net(images)
    assert out.shape == (3, 10)
    net.backend = "auto"
    assert all(b.backend == "auto" for b in net.blocks)
    assert torch.allclose(net(images), out, atol=1e-5)


def test_summary_lists_layers_and_total():
    text = summary(UltimusNet())
    assert "blocks.3" in text and "UltimusBlock" in text and "(1, 48)" in text
    assert "total params: 25,882" in text


def test_python_m_model_prints_summary():
    out = subprocess.run([sys.executable, "-m", "model"], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert "total params: 25,882" in out


@pytest.mark.parametrize("backend", ["triton", "cpu", "cuda"])
def test_net_on_each_backend_matches_reference(backend):
    device = backend_or_skip(backend)
    torch.manual_seed(0)
    net = UltimusNet(backend="reference").to(device).double()
    images = torch.randn(5, 3, 32, 32, dtype=torch.float64, device=device)
    out_ref = net(images)
    grads_ref = torch.autograd.grad(out_ref.logsumexp(1).sum(), list(net.parameters()))
    net.backend = backend
    out = net(images)
    grads = torch.autograd.grad(out.logsumexp(1).sum(), list(net.parameters()))
    assert rel_err(out, out_ref) < 1e-12
    for g, g_ref in zip(grads, grads_ref):
        assert rel_err(g, g_ref) < 1e-10


@pytest.mark.parametrize("cutout", [8, 16, 5])
def test_cutout_hole_is_cutout_by_cutout(cutout):
    """The hole is exactly cutout x cutout where it lies inside the image (clipped at the edges)."""
    from model.data import augment

    images = torch.ones(400, 3, 32, 32)
    out = augment(images, torch.Generator().manual_seed(0), pad=0, cutout=cutout)
    holes = (out[:, 0] == 0).sum((1, 2))
    assert holes.max().item() == cutout * cutout
    assert set(holes.unique().tolist()) <= set(range(cutout * cutout + 1))
    assert (holes == 0).any() and (holes == cutout * cutout).sum() > 50
