"""The LR range test: an exponential sweep of the learning rate on a copy of the starting weights."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from model.data import augmentation, normalize

from .loop import RunContext, batches
from .optim import make_optimizer


def lr_range_test(ctx: RunContext, steps: int = 100, start: float = 1e-6, end: float = 1.0):
    """Exponential LR sweep on a copy of ctx.net's starting weights, with the run's optimiser and
    augmentation; returns (pick, lrs, smoothed losses)."""
    net, data, args, device = ctx.net, ctx.data, ctx.args, ctx.device
    initial = {k: v.clone() for k, v in net.state_dict().items()}
    opt = make_optimizer(args, net.parameters(), lr=start)
    augment = augmentation(args.augment)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    idx = torch.randperm(len(data.train.labels), generator=torch.Generator().manual_seed(args.seed))
    idx = idx.repeat(math.ceil(steps * args.batch_size / len(idx)) + 1)[: steps * args.batch_size]
    net.train()
    lrs, losses, avg, best = [], [], 0.0, float("inf")
    for i, (images, labels) in enumerate(batches(data.train, idx, args.batch_size, device, 0)):
        lr = start * (end / start) ** (i / max(1, steps - 1))
        for group in opt.param_groups:
            group["lr"] = lr
        loss = F.cross_entropy(net(augment(normalize(images, data.mean, data.std), gen)), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        avg = 0.98 * avg + 0.02 * loss.item()
        smoothed = avg / (1 - 0.98 ** (i + 1))  # bias-corrected exponential moving average
        lrs.append(lr)
        losses.append(smoothed)
        best = min(best, smoothed)
        if not math.isfinite(smoothed) or smoothed > 4 * best:
            break
    net.load_state_dict(initial)
    lo = max(1, len(losses) // 10)  # the first steps are noise
    i_min = min(range(lo, len(losses)), key=losses.__getitem__) if len(losses) > lo else len(losses) - 1
    if args.lr_find_pick in ("min10", "min"):
        pick = lrs[i_min] / 10 if args.lr_find_pick == "min10" else lrs[i_min]
    else:
        logs = [math.log(lr) for lr in lrs]
        slopes = [(losses[i + 1] - losses[i - 1]) / (logs[i + 1] - logs[i - 1]) for i in range(lo, max(lo + 1, i_min))]
        pick = lrs[lo + min(range(len(slopes)), key=slopes.__getitem__)] if slopes else lrs[i_min] / 10
    return pick, lrs, losses
