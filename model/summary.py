"""A per-layer summary of a model: output shape and parameter count of each layer."""

from __future__ import annotations

import torch
from torch import nn

from ultimus_kernels import UltimusBlock


def _as_one_layer(module: nn.Module) -> bool:
    """An UltimusBlock (its Linears are inside it), a module that asks to be (`summary_as_one_layer`: the
    variant blocks, a ViT's attention and MLP), or a module with parameters of its own (a class token)."""
    return (
        isinstance(module, UltimusBlock) or getattr(module, "summary_as_one_layer", False) or bool(module._parameters)
    )


def _layers(model: nn.Module):
    """Leaf modules, with the modules _as_one_layer says reported as one layer each."""
    inside_block: set[str] = set()
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix + ".") for prefix in inside_block):
            continue
        if _as_one_layer(module):
            inside_block.add(name)
            yield name, module
        elif not list(module.children()):
            yield name, module


def _record(shapes: dict, calls: dict, name: str, out) -> None:
    if hasattr(out, "shape"):
        shapes[name] = tuple(out.shape)
    calls[name] = calls.get(name, 0) + 1


def _shape(shapes: dict, name: str):
    """The layer's output shape; for a layer its parent runs without calling it (an UltimusStack runs its
    blocks in one fused kernel), the nearest ancestor's, which every such block shares."""
    while name not in shapes and "." in name:
        name = name.rsplit(".", 1)[0]
    return shapes.get(name, "-")


def summary(model: nn.Module, input_shape=(1, 3, 32, 32)) -> str:
    """One line per layer: name, type (with "x N" for a layer the forward applies N times: shared
    weights), output shape of one sample batch, parameters; then the total (shared weights once)."""
    shapes: dict[str, tuple] = {}
    calls: dict[str, int] = {}
    layers = list(_layers(model))
    hooks = [
        m.register_forward_hook(lambda mod, inp, out, n=n: _record(shapes, calls, n, out))
        for n, m in model.named_modules()
        if n
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
    types = {n: type(m).__name__ + (f" x {calls[n]}" if calls.get(n, 1) > 1 else "") for n, m in layers}
    type_width = max(20, max(len(t) for t in types.values()) + 2)
    rule = "-" * (width + type_width + 27)
    lines = [f"{'layer':<{width}}{'type':<{type_width}}{'output shape':<18}{'params':>9}", rule]
    for name, module in layers:
        params = sum(p.numel() for p in module.parameters())
        lines.append(f"{name:<{width}}{types[name]:<{type_width}}{str(_shape(shapes, name)):<18}{params:>9,}")
    total = sum(p.numel() for p in model.parameters())
    lines += [rule, f"total params: {total:,}"]
    return "\n".join(lines)
