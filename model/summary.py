"""A per-layer summary of a model: output shape and parameter count of each layer."""

from __future__ import annotations

import torch
from torch import nn

from ultimus_kernels import UltimusBlock


def _layers(model: nn.Module):
    """Leaf modules, with each UltimusBlock reported as one layer (its Linears are inside it)."""
    inside_block: set[str] = set()
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix + ".") for prefix in inside_block):
            continue
        if isinstance(module, UltimusBlock):
            inside_block.add(name)
            yield name, module
        elif not list(module.children()):
            yield name, module


def summary(model: nn.Module, input_shape=(1, 3, 32, 32)) -> str:
    shapes: dict[str, tuple] = {}
    layers = list(_layers(model))
    hooks = [
        m.register_forward_hook(lambda mod, inp, out, n=n: shapes.__setitem__(n, tuple(out.shape))) for n, m in layers
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.randn(*input_shape, device=next(model.parameters()).device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    width = max(len(n) for n, _ in layers) + 2
    lines = [f"{'layer':<{width}}{'type':<20}{'output shape':<18}{'params':>9}", "-" * (width + 47)]
    for name, module in layers:
        params = sum(p.numel() for p in module.parameters())
        lines.append(f"{name:<{width}}{type(module).__name__:<20}{str(shapes[name]):<18}{params:>9,}")
    total = sum(p.numel() for p in model.parameters())
    lines += ["-" * (width + 47), f"total params: {total:,}"]
    return "\n".join(lines)
