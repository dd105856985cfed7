"""The training loop: processes and devices, batches, one epoch of training, evaluation. Everything a
step needs travels in one RunContext."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from model.data import Dataset, Split, augmentation, normalize


@dataclass
class RunContext:
    """One process's run: its settings, place in the job, data, model and optimisation state."""

    args: argparse.Namespace
    data: Dataset
    device: torch.device
    rank: int = 0
    world: int = 1
    model: Any = None  # what the steps call: the network, wrapped in DDP and/or torch.compile
    net: Any = None  # the network itself (state_dict, parameters)
    opt: Any = None
    sched: Any = None
    scaler: Any = None
    graphed: Any = None  # --cuda-graph: (GraphedTrainStep, its StepState, its generator), made once

    @property
    def main_process(self) -> bool:
        return self.rank == 0


def setup_distributed(args):
    """(rank, world_size, device). Under torchrun: one process per GPU (NCCL) or CPU process (gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if args.device:
        device = torch.device(args.device)  # a torch.device, or the string a checkpoint kept
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


# ------------------------------------------------------------------------------------------------
# Batches
# ------------------------------------------------------------------------------------------------


class _GatherBatches(torch.utils.data.Dataset):
    """Item i is the whole batch of indices chunks[i], gathered from uint8 tensors in host memory."""

    def __init__(self, split: Split, chunks):
        self.split, self.chunks = split, chunks

    def __len__(self):
        return len(self.chunks)

    def __getitem__(self, i):
        idx = self.chunks[i]
        return self.split.images[idx], self.split.labels[idx]


def batches(split: Split, indices: torch.Tensor, batch_size: int, device, workers: int):
    """Yield (uint8 images, labels) on `device` for `indices`, in order."""
    chunks = list(indices.split(batch_size))
    if split.images.device.type != "cpu":  # the data set lives on the device: index it there
        for idx in chunks:
            idx = idx.to(device)
            yield split.images[idx], split.labels[idx]
        return
    loader = torch.utils.data.DataLoader(
        _GatherBatches(split, chunks), batch_size=None, num_workers=workers, pin_memory=device.type == "cuda"
    )
    for images, labels in loader:
        yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)


def epoch_indices(n: int, epoch: int, args, rank: int, world: int) -> torch.Tensor:
    """This process's shard of a seeded shuffle: the same for a given (seed, epoch), resumed or not."""
    sampler = torch.utils.data.DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    sampler.set_epoch(epoch)
    return torch.tensor(list(sampler), dtype=torch.int64)


# ------------------------------------------------------------------------------------------------
# Training and evaluation
# ------------------------------------------------------------------------------------------------


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite: the weights are no longer worth training or saving."""

    def __init__(self, epoch: int, step: int, lr: float):
        super().__init__(f"the training loss stopped being finite at epoch {epoch}, step {step} (lr {lr:.3e})")
        self.epoch, self.step, self.lr = epoch, step, lr


CHECK_EVERY = 20  # steps between looks at the device-side sums (progress bar, divergence): no sync per step


@dataclass
class StepState:
    """What a training step updates besides the model and the optimiser, all on the device and updated
    in place, so that the step has no host synchronisation and can be captured as a CUDA graph and
    replayed: its index in the epoch, the first step whose loss was not finite (-1: none yet), and the
    epoch's sums (loss, correct, count)."""

    index: torch.Tensor
    first_bad: torch.Tensor
    stats: torch.Tensor

    @classmethod
    def zeros(cls, device) -> "StepState":
        return cls(
            index=torch.zeros((), dtype=torch.int64, device=device),
            first_bad=torch.full((), -1, dtype=torch.int64, device=device),
            stats=torch.zeros(3, dtype=torch.float64, device=device),
        )


def train_step(ctx: RunContext, images, labels, gen, state: StepState, augment, amp_dtype) -> None:
    """One optimisation step on a batch of uint8 images: augment, forward, loss, backward, optimiser and
    schedule step, the running sums. Device work only (no .item(), no tensor made from a host value),
    so the eager loop and a captured CUDA graph run the same code."""
    data, device = ctx.data, ctx.device
    x = augment(normalize(images, data.mean, data.std), gen)
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        logits = ctx.model(x)
        loss = F.cross_entropy(logits.float(), labels)
    ctx.opt.zero_grad(set_to_none=True)
    ctx.scaler.scale(loss).backward()
    ctx.scaler.step(ctx.opt)
    ctx.scaler.update()
    ctx.sched.step()
    with torch.no_grad():
        loss = loss.detach()
        state.first_bad.copy_(torch.where((state.first_bad < 0) & ~torch.isfinite(loss), state.index, state.first_bad))
        count = torch.full((), len(labels), dtype=torch.float64, device=device)
        state.stats += torch.stack([loss.double() * count, (logits.argmax(1) == labels).sum().double(), count])
        state.index += 1


def train_epoch(ctx: RunContext, epoch: int, bar) -> tuple[float, float]:
    """One epoch of training; returns (mean loss, accuracy) over every process's samples. With
    --cuda-graph the step is replayed as a CUDA graph (training/cuda_graph.py)."""
    args, data, device, rank = ctx.args, ctx.data, ctx.device, ctx.rank
    ctx.model.train()
    seed = args.seed * 100_003 + epoch * 1009 + rank
    torch.manual_seed(seed)  # dropout: reseeded per epoch
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    augment = augmentation(args.augment)
    if getattr(args, "cuda_graph", False):  # (absent from the settings of runs saved before it existed)
        # One graph for the whole run: its state and generator are made once and reset in place.
        if ctx.graphed is None:
            from .cuda_graph import GraphedTrainStep

            state, gen = StepState.zeros(device), torch.Generator(device=device)
            step = GraphedTrainStep(lambda i, t: train_step(ctx, i, t, gen, state, augment, amp_dtype), gen)
            ctx.graphed = step, state, gen
        run_step, state, gen = ctx.graphed
        state.index.zero_(), state.first_bad.fill_(-1), state.stats.zero_()
        gen.manual_seed(seed)
        first_step = int(ctx.sched.step_count)
        lr_of = lambda i: ctx.sched.lr_at(first_step + i)  # noqa: E731
    else:
        state, gen = StepState.zeros(device), torch.Generator(device=device).manual_seed(seed)
        lrs = []

        def run_step(images, labels):
            lrs.append(ctx.sched.get_last_lr()[0])  # the lr this step uses
            train_step(ctx, images, labels, gen, state, augment, amp_dtype)

        lr_of = lrs.__getitem__
    idx = epoch_indices(len(data.train.labels), epoch, args, rank, ctx.world)
    steps = 0
    for step, (images, labels) in enumerate(batches(data.train, idx, args.batch_size, device, args.workers)):
        run_step(images, labels)
        steps = step + 1
        bar.update(1)
        if step % CHECK_EVERY == 0:
            _stop_if_diverged(state.first_bad, epoch, steps, lr_of)
            if not bar.disable:
                s = state.stats.tolist()
                bar.set_postfix(loss=f"{s[0] / s[2]:.3f}", acc=f"{100 * s[1] / s[2]:.1f}%", lr=f"{lr_of(step):.2e}")
    _stop_if_diverged(state.first_bad, epoch, steps, lr_of)
    s = all_reduce_sum(state.stats.clone()).tolist()
    return s[0] / s[2], s[1] / s[2]


def _stop_if_diverged(first_bad: torch.Tensor, epoch: int, steps: int, lr_of) -> None:
    """Raise TrainingDiverged if any process has seen a non-finite loss (every process checks at the
    same steps, so under DDP they stop together). `steps`: the steps run so far this epoch; `lr_of`:
    step -> its learning rate."""
    bad = first_bad.clone()
    if dist.is_initialized():
        flag = (bad >= 0).to(torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and bad.item() < 0:
            bad.fill_(steps - 1)  # another process diverged: this one stops at the same point
    step = int(bad.item())
    if step >= 0:
        raise TrainingDiverged(epoch, step + 1, lr_of(step))


@torch.no_grad()
def evaluate(ctx: RunContext, collect_wrong: int = 0):
    """(loss, accuracy) on the test split, reduced over processes; optionally the first wrong ones."""
    model, data, args, rank, world, device = ctx.model, ctx.data, ctx.args, ctx.rank, ctx.world, ctx.device
    model.eval()
    n = len(data.test.labels)
    idx = torch.arange(rank, n, world)
    stats = torch.zeros(3, dtype=torch.float64, device=device)
    wrong = []
    # Batches of --test-batch-size: a model that mixes the samples of a batch (the batch-attention
    # preset) gives results that depend on it.
    for images, labels in batches(data.test, idx, args.test_batch_size, device, args.workers):
        logits = model(normalize(images, data.mean, data.std)).float()
        pred = logits.argmax(1)
        stats += torch.stack(
            [
                F.cross_entropy(logits, labels, reduction="sum").double(),
                (pred == labels).sum().double(),
                torch.tensor(len(labels), dtype=torch.float64, device=device),
            ]
        )
        if len(wrong) < collect_wrong:
            for i in (pred != labels).nonzero().flatten()[: collect_wrong - len(wrong)].tolist():
                wrong.append((images[i].cpu(), int(pred[i]), int(labels[i])))
    s = all_reduce_sum(stats).tolist()
    return s[0] / s[2], s[1] / s[2], wrong
