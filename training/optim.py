"""The optimiser and the learning-rate schedule a run's settings name (--optimizer, --schedule and the
one-cycle flags), for training and for the LR range test alike."""

from __future__ import annotations

import torch

from .cli import DEFAULTS
from .device_schedule import DeviceOneCycle

ONE_CYCLE_FLAGS = ("pct_start", "div_factor", "final_div_factor", "anneal", "three_phase")


def make_optimizer(args, params, lr: float) -> torch.optim.Optimizer:
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=args.momentum, weight_decay=args.weight_decay)
    if getattr(args, "cuda_graph", False):
        # The step is replayed as a graph: Adam keeps its step count on the device (capturable) and reads
        # lr and beta1 from the schedule's tensors. Per tensor, not foreach: foreach Adam turns a tensor
        # beta1 into a host number (a sync, which cannot be captured); per tensor it stays a tensor.
        return torch.optim.Adam(params, lr=lr, weight_decay=args.weight_decay, capturable=True, foreach=False)
    return torch.optim.Adam(params, lr=lr, weight_decay=args.weight_decay)


def make_schedule(args, opt: torch.optim.Optimizer, max_lr: float, steps_per_epoch: int):
    """OneCycleLR over the whole run (stepped once per batch), or a constant learning rate; with
    --cuda-graph the same schedule computed on the device (DeviceOneCycle)."""
    one_cycle = dict(
        max_lr=max_lr,
        pct_start=args.pct_start,
        div_factor=args.div_factor,
        final_div_factor=args.final_div_factor,
        three_phase=args.three_phase,
        # Adam's beta1 is cycled (0.95 -> 0.85 -> 0.95) as it always was here; SGD keeps --momentum.
        cycle_momentum=args.optimizer == "adam",
    )
    total_steps = args.epochs * steps_per_epoch
    if getattr(args, "cuda_graph", False):
        constant = args.schedule == "constant"
        return DeviceOneCycle(opt, total_steps=total_steps, anneal=args.anneal, constant=constant, **one_cycle)
    if args.schedule == "constant":
        for group in opt.param_groups:
            group["lr"] = max_lr
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    return torch.optim.lr_scheduler.OneCycleLR(opt, total_steps=total_steps, anneal_strategy=args.anneal, **one_cycle)


def describe(args) -> str:
    """E.g. "Adam + OneCycleLR" or "Adam + OneCycleLR (pct_start 0.2083, anneal linear)": the one-cycle
    settings that differ from the defaults are named."""
    opt = "Adam" if args.optimizer == "adam" else f"SGD (momentum {args.momentum:g})"
    if args.schedule == "constant":
        return f"{opt}, constant lr"
    changed = [
        f"{name} {getattr(args, name):.4g}"
        if isinstance(getattr(args, name), float)
        else f"{name} {getattr(args, name)}"
        for name in ONE_CYCLE_FLAGS
        if getattr(args, name) != DEFAULTS[name]
    ]
    return f"{opt} + OneCycleLR" + (f" ({', '.join(changed)})" if changed else "")
