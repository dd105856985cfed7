"""Train UltimusNet on CIFAR-10: Adam with the one-cycle learning-rate policy, 24 epochs by default.

    python train.py                                   # CIFAR-10 in ./data (downloaded if missing)
    python train.py --dataset synthetic --epochs 2    # offline, no download needed
    python train.py --backend triton --amp bf16       # on a GPU, fused Triton kernels, bf16 autocast
    python train.py --lr-find                         # pick --max-lr with an LR range test first
    python train.py --resume runs/20261123-101500     # continue a killed run to the same result
    torchrun --nproc_per_node=2 train.py ...          # DistributedDataParallel (NCCL on GPUs, gloo on CPU)

Writes to --out (default runs/<timestamp>): history.json, curves.png, misclassified.png,
lr_find.png (with --lr-find), checkpoint.pt (every epoch, atomically) and final.pt (best weights).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from model import UltimusNet
from model.data import DataUnavailable, Split, augment, load_cifar10, load_synthetic, normalize

DEFAULT_MAX_LR = 0.01  # Adam's one-cycle peak for this 26k-parameter net; --lr-find measures it instead
DATA_ON_DEVICE_LIMIT = 2 << 30  # keep the data set in GPU memory when it is smaller than this


def _number(kind, low=None, high=None, low_open=False, high_open=True, what=""):
    """An argparse type: `kind` (int or float) in [low, high) (or the open/closed variants given)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value
    return parse


def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError("no CUDA device is available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


POSITIVE_INT = _number(int, 1, what="an integer >= 1")
COUNT = _number(int, 0, what="an integer >= 0")
SEED = _number(int, 0, 2**63, what="an integer in [0, 2^63)")
POSITIVE = _number(float, 0, low_open=True, what="a number > 0")
NON_NEGATIVE = _number(float, 0, what="a number >= 0")
PROBABILITY = _number(float, 0, 1, what="a probability in [0, 1)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--dataset", choices=["cifar10", "synthetic"], default="cifar10",
                   help="cifar10 (torchvision) or synthetic: an offline, learnable 10-class stand-in (default cifar10)")
    d.add_argument("--data-dir", default="./data", help="where CIFAR-10 is, or is downloaded to (default ./data)")
    d.add_argument("--no-download", action="store_true", help="never download CIFAR-10; stop if it is missing")
    d.add_argument("--train-size", type=POSITIVE_INT, default=None,
                   help="training images: a seeded subsample of CIFAR-10, or the synthetic set's size (default 50000)")
    d.add_argument("--test-size", type=POSITIVE_INT, default=None, help="test images, likewise (default 10000)")
    d.add_argument("--workers", type=COUNT, default=2,
                   help="background processes gathering batches when the data stays in host memory (default 2)")
    m = p.add_argument_group("model")
    m.add_argument("--backend", choices=["auto", "reference", "triton", "cpu", "cuda"], default="auto",
                   help="Ultimus block implementation (default auto: the fastest that runs on --device)")
    m.add_argument("--batchnorm", action="store_true", help="BatchNorm after each convolution")
    m.add_argument("--dropout", type=PROBABILITY, default=0.0,
                   help="dropout on the pooled features, in [0, 1) (default 0)")
    m.add_argument("--compile", action="store_true", help="torch.compile the model")
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=POSITIVE_INT, default=24, help="epochs (default 24)")
    o.add_argument("--batch-size", type=POSITIVE_INT, default=128, help="batch size per process (default 128)")
    o.add_argument("--max-lr", type=POSITIVE, default=None,
                   help=f"one-cycle peak learning rate, > 0 (default {DEFAULT_MAX_LR}, or measured by --lr-find)")
    o.add_argument("--weight-decay", type=NON_NEGATIVE, default=0.0, help="Adam weight decay, >= 0 (default 0)")
    o.add_argument("--lr-find", action="store_true",
                   help="run an LR range test first (exponential sweep, smoothed loss) and use its pick as --max-lr")
    o.add_argument("--lr-find-pick", choices=["min10", "steepest"], default="min10",
                   help="LR range test pick: the loss minimum's LR / 10, or the steepest descent (default min10)")
    o.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off",
                   help="autocast on GPU: bf16, or fp16 with a gradient scaler (default off)")
    r = p.add_argument_group("run")
    r.add_argument("--device", type=_device, default=None, help="cpu, cuda or cuda:N (default cuda when available)")
    r.add_argument("--seed", type=SEED, default=0, help="seed: the run is deterministic given it (default 0)")
    r.add_argument("--out", default=None,
                   help="output folder (default runs/<timestamp>); one that already holds a run is refused "
                        "unless --overwrite is given")
    r.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (its checkpoints, history and plots are deleted first)")
    r.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the run whose checkpoint.pt is in DIR (its settings are kept; only --device, "
                        "--workers, --no-progress and --stop-after-epoch may be given with it)")
    r.add_argument("--stop-after-epoch", type=POSITIVE_INT, default=None, metavar="N",
                   help="stop after epoch N as if interrupted (continue later with --resume)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars, only the per-epoch lines")
    return p


# What `--resume` lets a user change; every other setting is the run's own.
KEEP_ON_RESUME = ("resume", "stop_after_epoch", "device", "workers", "no_progress")
# The files a run writes into --out.
RUN_FILES = ("checkpoint.pt", "final.pt", "history.json", "curves.png", "misclassified.png", "lr_find.png")


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and check every flag's range and their combinations, before anything is loaded."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume:
        explicit = build_parser()
        for action in explicit._actions:
            action.default = argparse.SUPPRESS
        given = set(vars(explicit.parse_args(argv))) - set(KEEP_ON_RESUME)
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in sorted(given))
            parser.error(f"--resume continues a run with its own settings; {flags} cannot be changed "
                         "(start a new run with --out instead)")
    elif args.out and not args.overwrite:
        existing = [name for name in RUN_FILES if (Path(args.out) / name).exists()]
        if existing:
            parser.error(f"--out {args.out} already holds a run ({', '.join(existing)}): continue it with "
                         f"--resume {args.out}, choose another --out, or pass --overwrite to replace it")
    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.amp != "off" and device.type != "cuda":
        parser.error("--amp needs a CUDA device")
    if args.stop_after_epoch is not None and not args.resume and args.stop_after_epoch > args.epochs:
        parser.error(f"--stop-after-epoch {args.stop_after_epoch} is past --epochs {args.epochs}")
    return args


# ------------------------------------------------------------------------------------------------
# Processes and devices
# ------------------------------------------------------------------------------------------------

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
    loader = torch.utils.data.DataLoader(_GatherBatches(split, chunks), batch_size=None, num_workers=workers,
                                         pin_memory=device.type == "cuda")
    for images, labels in loader:
        yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)


def epoch_indices(n: int, epoch: int, args, rank: int, world: int) -> torch.Tensor:
    """This process's shard of a seeded shuffle: the same for a given (seed, epoch), resumed or not."""
    sampler = torch.utils.data.DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True,
                                                  seed=args.seed)
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


def train_epoch(model, data, epoch, args, opt, sched, scaler, rank, world, device, bar):
    model.train()
    torch.manual_seed(args.seed * 100_003 + epoch * 1009 + rank)  # dropout: reseeded per epoch
    gen = torch.Generator(device=device).manual_seed(args.seed * 100_003 + epoch * 1009 + rank)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    stats = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    # The first step whose loss was not finite (-1: none yet), tracked on the device.
    first_bad = torch.full((), -1, dtype=torch.int64, device=device)
    lrs = []
    idx = epoch_indices(len(data.train.labels), epoch, args, rank, world)
    step = -1
    for step, (images, labels) in enumerate(batches(data.train, idx, args.batch_size, device, args.workers)):
        x = augment(normalize(images, data.mean, data.std), gen)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), labels)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        lrs.append(sched.get_last_lr()[0])
        sched.step()
        with torch.no_grad():
            loss = loss.detach()
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
            stats += torch.stack([loss.double() * len(labels), (logits.argmax(1) == labels).sum().double(),
                                  torch.tensor(len(labels), dtype=torch.float64, device=device)])
        bar.update(1)
        if step % CHECK_EVERY == 0:
            _stop_if_diverged(first_bad, epoch, lrs)
            if not bar.disable:
                s = stats.tolist()
                bar.set_postfix(loss=f"{s[0] / s[2]:.3f}", acc=f"{100 * s[1] / s[2]:.1f}%", lr=f"{lrs[-1]:.2e}")
    _stop_if_diverged(first_bad, epoch, lrs)
    s = all_reduce_sum(stats).tolist()
    return s[0] / s[2], s[1] / s[2]


def _stop_if_diverged(first_bad: torch.Tensor, epoch: int, lrs: list) -> None:
    """Raise TrainingDiverged if any process has seen a non-finite loss (every process checks at the
    same steps, so under DDP they stop together)."""
    bad = first_bad.clone()
    if dist.is_initialized():
        flag = (bad >= 0).to(torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and bad.item() < 0:
            bad.fill_(len(lrs) - 1)  # another process diverged: this one stops at the same point
    step = int(bad.item())
    if step >= 0:
        raise TrainingDiverged(epoch, step + 1, lrs[step])


@torch.no_grad()
def evaluate(model, data, args, rank, world, device, collect_wrong: int = 0):
    """(loss, accuracy) on the test split, reduced over processes; optionally the first wrong ones."""
    model.eval()
    n = len(data.test.labels)
    idx = torch.arange(rank, n, world)
    stats = torch.zeros(3, dtype=torch.float64, device=device)
    wrong = []
    for images, labels in batches(data.test, idx, 1000, device, args.workers):
        logits = model(normalize(images, data.mean, data.std)).float()
        pred = logits.argmax(1)
        stats += torch.stack([F.cross_entropy(logits, labels, reduction="sum").double(),
                              (pred == labels).sum().double(),
                              torch.tensor(len(labels), dtype=torch.float64, device=device)])
        if len(wrong) < collect_wrong:
            for i in (pred != labels).nonzero().flatten()[: collect_wrong - len(wrong)].tolist():
                wrong.append((images[i].cpu(), int(pred[i]), int(labels[i])))
    s = all_reduce_sum(stats).tolist()
    return s[0] / s[2], s[1] / s[2], wrong


def lr_range_test(net, data, args, device, steps: int = 100, start: float = 1e-6, end: float = 1.0):
    """Exponential LR sweep on a copy of the starting weights; returns (pick, lrs, smoothed losses)."""
    initial = {k: v.clone() for k, v in net.state_dict().items()}
    opt = torch.optim.Adam(net.parameters(), lr=start, weight_decay=args.weight_decay)
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
    if args.lr_find_pick == "min10":
        pick = lrs[i_min] / 10
    else:
        logs = [math.log(lr) for lr in lrs]
        slopes = [(losses[i + 1] - losses[i - 1]) / (logs[i + 1] - logs[i - 1]) for i in range(lo, max(lo + 1, i_min))]
        pick = lrs[lo + min(range(len(slopes)), key=slopes.__getitem__)] if slopes else lrs[i_min] / 10
    return pick, lrs, losses


# ------------------------------------------------------------------------------------------------
# Outputs
# ------------------------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _checksum_file(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def atomic_save(obj, path: Path) -> None:
    """Write to a temporary file beside `path`, then rename: a kill never leaves half a file. Beside it,
    PATH.sha256 records its SHA-256 (read back by `load_verified`). While the new file replaces the old
    one, the record lists both hashes, so a kill at any instant leaves a file that matches its record."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp) if path.suffix == ".pt" else tmp.write_text(obj)
    new = _sha256(tmp)
    record = _checksum_file(path)
    old = record.read_text().split() if record.exists() else []
    _write_replace(record, "\n".join([new, *old[:1]]) + "\n")
    os.replace(tmp, path)
    _write_replace(record, new + "\n")


def _write_replace(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_verified(path: Path, what: str):
    """torch.load a file written by atomic_save after checking it against its recorded SHA-256. Any
    failure ends the run with a message that names the file and what to do."""
    if not path.exists():
        raise SystemExit(f"error: {what}: {path} does not exist")
    record = _checksum_file(path)
    if record.exists():
        expected = record.read_text().split()
        if _sha256(path) not in expected:
            raise SystemExit(
                f"error: {what}: {path} is damaged: its SHA-256 differs from the one recorded in {record.name} "
                "when it was written (a truncated copy, or changed bytes). Restore the file from a copy, or start "
                "a new run with --out; final.pt beside it holds the best weights so far, if it verifies.")
    else:
        print(f"warning: {path} has no {record.name} (written by an older version?): its contents cannot be "
              "verified", file=sys.stderr)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise SystemExit(f"error: {what}: {path} could not be read ({type(exc).__name__}: {exc}). Restore it "
                         "from a copy, or start a new run with --out.") from None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(history, path: Path) -> None:
    plt = _pyplot()
    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(ep, [h["train_loss"] for h in history], "o-", label="train")
    a.plot(ep, [h["test_loss"] for h in history], "o-", label="test")
    a.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    b.plot(ep, [100 * h["train_acc"] for h in history], "o-", label="train")
    b.plot(ep, [100 * h["test_acc"] for h in history], "o-", label="test")
    b.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_misclassified(wrong, classes, path: Path) -> None:
    plt = _pyplot()
    cols = 8
    rows = max(1, math.ceil(len(wrong) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (img, pred, true) in zip(axes.flat, wrong):
        ax.imshow(img.permute(1, 2, 0).numpy())
        ax.set_title(f"{classes[pred]}\n(true: {classes[true]})", fontsize=7, color="crimson")
    fig.suptitle("misclassified test images: prediction (true class)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_lr_find(lrs, losses, pick, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(lrs, losses)
    ax.axvline(pick, color="crimson", linestyle="--", label=f"max lr = {pick:.2e}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="smoothed loss", title="LR range test")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------

class RunState:
    """What an interrupted run needs to say how to continue: where it writes, the last saved epoch."""

    def __init__(self):
        self.out: Optional[Path] = None
        self.saved_epoch: Optional[int] = None
        self.main_process = True


def main(argv=None) -> list[dict]:
    """Train; returns the history (one dict per epoch). Ends with SystemExit and a one-line message
    on bad arguments, damaged checkpoints, a diverging loss or Ctrl-C."""
    state = RunState()
    try:
        return _train(parse_args(argv), state)
    except KeyboardInterrupt:
        if not state.main_process:
            raise SystemExit(130)
        if state.out is None:
            print("\ninterrupted before training started; nothing was written", file=sys.stderr)
        elif state.saved_epoch is None:
            print(f"\ninterrupted before the first epoch ended; nothing was saved in {state.out}", file=sys.stderr)
        else:
            print(f"\ninterrupted; {state.out / 'checkpoint.pt'} holds epoch {state.saved_epoch}: continue with "
                  f"python train.py --resume {state.out}", file=sys.stderr)
        raise SystemExit(130)


def _load_checkpoint(args) -> tuple[argparse.Namespace, dict]:
    """The run to resume: its checkpoint (verified) and its settings, with the flags --resume may change."""
    checkpoint = load_verified(Path(args.resume) / "checkpoint.pt", "--resume")
    saved = checkpoint["args"]
    resumed = argparse.Namespace(**{**saved, **{k: getattr(args, k) for k in KEEP_ON_RESUME}})
    resumed.out = str(Path(args.resume))
    return resumed, checkpoint


def _train(args, state: RunState) -> list[dict]:
    from tqdm import tqdm

    checkpoint = None
    if args.resume:
        args, checkpoint = _load_checkpoint(args)
    rank, world, device = setup_distributed(args)
    main_process = state.main_process = rank == 0
    if checkpoint is not None and checkpoint.get("world_size", world) != world:
        raise SystemExit(
            f"error: --resume: this run was started with {checkpoint['world_size']} process(es) and is resumed with "
            f"{world}; the data shards and the learning-rate schedule depend on that number. Resume it with "
            f"{checkpoint['world_size']} process(es)"
            + (f" (torchrun --nproc_per_node={checkpoint['world_size']} train.py --resume {args.out})"
               if checkpoint["world_size"] > 1 else f" (python train.py --resume {args.out})"))
    say = (lambda *a: tqdm.write(" ".join(map(str, a)))) if main_process else (lambda *a: None)
    out = Path(args.out or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))
    try:
        data = (load_synthetic(args.train_size, args.test_size) if args.dataset == "synthetic" else
                load_cifar10(args.data_dir, not args.no_download, args.train_size, args.test_size))
    except DataUnavailable as exc:
        raise SystemExit(f"error: {exc}") from None
    for name, split, asked in (("train", data.train, args.train_size), ("test", data.test, args.test_size)):
        if asked is not None and asked > len(split.labels):
            raise SystemExit(f"error: --{name}-size {asked}: the {args.dataset} {name} split has only "
                             f"{len(split.labels):,} images")
    if main_process:  # only once there is something to train on
        if getattr(args, "overwrite", False) and checkpoint is None:
            for name in RUN_FILES:
                for path in (out / name, _checksum_file(out / name)):
                    path.unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
    state.out = out
    on_device = device.type == "cuda" and (data.train.images.numel() + data.test.images.numel()) < DATA_ON_DEVICE_LIMIT
    if on_device:
        data.train = Split(data.train.images.to(device), data.train.labels.to(device))
        data.test = Split(data.test.images.to(device), data.test.labels.to(device))

    torch.manual_seed(args.seed)
    net = UltimusNet(batchnorm=args.batchnorm, dropout=args.dropout, backend=args.backend).to(device)
    say(f"UltimusNet: {sum(p.numel() for p in net.parameters()):,} parameters, backend {args.backend} "
        f"(blocks run on '{_resolved_backend(net, device)}'), device {device}, {world} process(es); "
        f"{args.dataset}: {len(data.train.labels):,} train / {len(data.test.labels):,} test images"
        + (", held on the GPU" if on_device else ""))

    if args.lr_find and checkpoint is None:
        pick, lrs, losses = lr_range_test(net, data, args, device)
        if dist.is_initialized():  # every process trains with rank 0's pick
            t = torch.tensor([pick], dtype=torch.float64, device=device)
            dist.broadcast(t, 0)
            pick = t.item()
        args.max_lr = pick
        if main_process:
            plot_lr_find(lrs, losses, pick, out / "lr_find.png")
        say(f"LR range test ({args.lr_find_pick}): max lr {pick:.3e}  (plot: {out / 'lr_find.png'})")
    max_lr = DEFAULT_MAX_LR if args.max_lr is None else args.max_lr
    args.max_lr = max_lr

    model = torch.nn.parallel.DistributedDataParallel(net) if world > 1 else net
    model = torch.compile(model) if args.compile else model
    opt = torch.optim.Adam(net.parameters(), lr=max_lr / 25, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(math.ceil(len(data.train.labels) / world) / args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, epochs=args.epochs, steps_per_epoch=steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    history, best_acc, start_epoch = [], -1.0, 1
    if checkpoint is not None:
        if checkpoint["scheduler"]["total_steps"] != sched.total_steps:
            raise SystemExit(f"error: --resume: the checkpoint's schedule has {checkpoint['scheduler']['total_steps']} "
                             f"steps, this process would run {sched.total_steps}: resume with the run's number of "
                             "processes and the same data set")
        net.load_state_dict(checkpoint["model"])
        opt.load_state_dict(checkpoint["optimizer"])
        sched.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        history, best_acc, start_epoch = checkpoint["history"], checkpoint["best_acc"], checkpoint["epoch"] + 1
        state.saved_epoch = checkpoint["epoch"]
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if device.type == "cuda" and checkpoint["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])
        say(f"resumed {out} after epoch {checkpoint['epoch']}")
    say(f"Adam + OneCycleLR: max lr {max_lr:.3e}, {args.epochs} epochs x {steps_per_epoch} steps, "
        f"batch {args.batch_size} per process, amp {args.amp}; writing to {out}")

    for epoch in range(start_epoch, args.epochs + 1):
        if args.stop_after_epoch is not None and epoch > args.stop_after_epoch:
            say(f"stopping after epoch {args.stop_after_epoch} (--stop-after-epoch); continue with --resume {out}")
            break
        t0 = time.perf_counter()
        lr = sched.get_last_lr()[0]
        with tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{args.epochs}", leave=False, file=sys.stderr,
                  disable=not main_process or args.no_progress) as bar:
            try:
                train_loss, train_acc = train_epoch(model, data, epoch, args, opt, sched, scaler, rank, world,
                                                    device, bar)
            except TrainingDiverged as exc:
                kept = (f"{out / 'checkpoint.pt'} still holds epoch {state.saved_epoch}"
                        if state.saved_epoch is not None else "nothing was saved")
                raise SystemExit(
                    f"error: {exc}; training stopped and {kept}. Try a lower --max-lr (this run: {max_lr:.3e})"
                    + (", or --amp bf16 / off instead of fp16" if args.amp == "fp16" else "")
                    + ", and start a new run with --out.") from None
        test_loss, test_acc, _ = evaluate(model, data, args, rank, world, device)
        seconds = time.perf_counter() - t0
        history.append(dict(epoch=epoch, lr=lr, train_loss=train_loss, train_acc=train_acc, test_loss=test_loss,
                            test_acc=test_acc, seconds=seconds))
        say(f"epoch {epoch:>3}/{args.epochs}  lr {lr:.2e}  train loss {train_loss:.4f} acc {100 * train_acc:5.2f}%  "
            f"test loss {test_loss:.4f} acc {100 * test_acc:5.2f}%  {seconds:.1f}s")
        if main_process:
            if test_acc > best_acc:
                best_acc = test_acc
                atomic_save(dict(model=net.state_dict(), epoch=epoch, test_acc=test_acc, args=vars(args)),
                            out / "final.pt")
            atomic_save(json.dumps(history, indent=1) + "\n", out / "history.json")
            plot_curves(history, out / "curves.png")
            atomic_save(dict(model=net.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                             scaler=scaler.state_dict(), epoch=epoch, history=history, best_acc=best_acc,
                             args=vars(args), world_size=world,
                             rng=dict(torch=torch.get_rng_state(),
                                      cuda=torch.cuda.get_rng_state_all() if device.type == "cuda" else None)),
                        out / "checkpoint.pt")
        state.saved_epoch = epoch
    else:
        _, _, wrong = evaluate(model, data, args, rank, world, device, collect_wrong=32)
        if main_process:
            plot_misclassified(wrong, data.classes, out / "misclassified.png")
            say(f"done: best test accuracy {100 * best_acc:.2f}%; outputs in {out}")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return history


def _resolved_backend(net, device) -> str:
    from ultimus_kernels.dispatch import resolve_backend

    block = net.blocks[0]
    return resolve_backend(block.backend, device, block.dim, block.attn_dim)


if __name__ == "__main__":
    main()
