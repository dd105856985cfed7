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
import json
import math
import os
import sys
import time
from datetime import datetime
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from model import UltimusNet
from model.data import DataUnavailable, Split, augment, load_cifar10, load_synthetic, normalize

DEFAULT_MAX_LR = 0.01  # Adam's one-cycle peak for this 26k-parameter net; --lr-find measures it instead
DATA_ON_DEVICE_LIMIT = 2 << 30  # keep the data set in GPU memory when it is smaller than this


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--dataset", choices=["cifar10", "synthetic"], default="cifar10",
                   help="cifar10 (torchvision) or synthetic: an offline, learnable 10-class stand-in (default cifar10)")
    d.add_argument("--data-dir", default="./data", help="where CIFAR-10 is, or is downloaded to (default ./data)")
    d.add_argument("--no-download", action="store_true", help="never download CIFAR-10; stop if it is missing")
    d.add_argument("--train-size", type=int, default=None,
                   help="training images: a seeded subsample of CIFAR-10, or the synthetic set's size (default 50000)")
    d.add_argument("--test-size", type=int, default=None, help="test images, likewise (default 10000)")
    d.add_argument("--workers", type=int, default=2,
                   help="background processes gathering batches when the data stays in host memory (default 2)")
    m = p.add_argument_group("model")
    m.add_argument("--backend", choices=["auto", "reference", "triton", "cpu", "cuda"], default="auto",
                   help="Ultimus block implementation (default auto: the fastest that runs on --device)")
    m.add_argument("--batchnorm", action="store_true", help="BatchNorm after each convolution")
    m.add_argument("--dropout", type=float, default=0.0, help="dropout on the pooled features (default 0)")
    m.add_argument("--compile", action="store_true", help="torch.compile the model")
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=24, help="epochs (default 24)")
    o.add_argument("--batch-size", type=int, default=128, help="batch size per process (default 128)")
    o.add_argument("--max-lr", type=float, default=None,
                   help=f"one-cycle peak learning rate (default {DEFAULT_MAX_LR}, or measured by --lr-find)")
    o.add_argument("--weight-decay", type=float, default=0.0, help="Adam weight decay (default 0)")
    o.add_argument("--lr-find", action="store_true",
                   help="run an LR range test first (exponential sweep, smoothed loss) and use its pick as --max-lr")
    o.add_argument("--lr-find-pick", choices=["min10", "steepest"], default="min10",
                   help="LR range test pick: the loss minimum's LR / 10, or the steepest descent (default min10)")
    o.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off",
                   help="autocast on GPU: bf16, or fp16 with a gradient scaler (default off)")
    r = p.add_argument_group("run")
    r.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default cuda when available)")
    r.add_argument("--seed", type=int, default=0, help="seed: the run is deterministic given it (default 0)")
    r.add_argument("--out", default=None, help="output folder (default runs/<timestamp>)")
    r.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the run whose checkpoint.pt is in DIR (its settings are kept)")
    r.add_argument("--stop-after-epoch", type=int, default=None, metavar="N",
                   help="stop after epoch N as if interrupted (continue later with --resume)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars, only the per-epoch lines")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------
# Processes and devices
# ------------------------------------------------------------------------------------------------

def setup_distributed(args):
    """(rank, world_size, device). Under torchrun: one process per GPU (NCCL) or CPU process (gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if args.device:
        device = torch.device(args.device)
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
    if args.amp != "off" and device.type != "cuda":
        raise SystemExit("--amp needs a CUDA device")
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

def train_epoch(model, data, epoch, args, opt, sched, scaler, rank, world, device, bar):
    model.train()
    torch.manual_seed(args.seed * 100_003 + epoch * 1009 + rank)  # dropout: reseeded per epoch
    gen = torch.Generator(device=device).manual_seed(args.seed * 100_003 + epoch * 1009 + rank)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    stats = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    idx = epoch_indices(len(data.train.labels), epoch, args, rank, world)
    for step, (images, labels) in enumerate(batches(data.train, idx, args.batch_size, device, args.workers)):
        x = augment(normalize(images, data.mean, data.std), gen)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), labels)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        with torch.no_grad():
            stats += torch.stack([loss.detach().double() * len(labels),
                                  (logits.argmax(1) == labels).sum().double(),
                                  torch.tensor(len(labels), dtype=torch.float64, device=device)])
        bar.update(1)
        if step % 20 == 0 and not bar.disable:
            s = stats.tolist()
            bar.set_postfix(loss=f"{s[0] / s[2]:.3f}", acc=f"{100 * s[1] / s[2]:.1f}%", lr=f"{sched.get_last_lr()[0]:.2e}")
    s = all_reduce_sum(stats).tolist()
    return s[0] / s[2], s[1] / s[2]


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

def atomic_save(obj, path: Path) -> None:
    """Write to a temporary file beside `path`, then rename: a kill never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp) if path.suffix == ".pt" else tmp.write_text(obj)
    os.replace(tmp, path)


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

KEEP_ON_RESUME = ("resume", "stop_after_epoch", "device", "workers", "no_progress")


def main(argv=None) -> list[dict]:
    from tqdm import tqdm

    args = parse_args(argv)
    checkpoint = None
    if args.resume:
        path = Path(args.resume) / "checkpoint.pt"
        if not path.exists():
            raise SystemExit(f"--resume: no checkpoint.pt in {args.resume}")
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        saved = checkpoint["args"]
        args = argparse.Namespace(**{**saved, **{k: getattr(args, k) for k in KEEP_ON_RESUME}})
        args.out = str(Path(args.resume))
    rank, world, device = setup_distributed(args)
    main_process = rank == 0
    say = (lambda *a: tqdm.write(" ".join(map(str, a)))) if main_process else (lambda *a: None)
    out = Path(args.out or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))
    try:
        data = (load_synthetic(args.train_size, args.test_size) if args.dataset == "synthetic" else
                load_cifar10(args.data_dir, not args.no_download, args.train_size, args.test_size))
    except DataUnavailable as exc:
        raise SystemExit(f"error: {exc}") from None
    if main_process:  # only once there is something to train on
        out.mkdir(parents=True, exist_ok=True)
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
    max_lr = args.max_lr or DEFAULT_MAX_LR
    args.max_lr = max_lr

    model = torch.nn.parallel.DistributedDataParallel(net) if world > 1 else net
    model = torch.compile(model) if args.compile else model
    opt = torch.optim.Adam(net.parameters(), lr=max_lr / 25, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(math.ceil(len(data.train.labels) / world) / args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, epochs=args.epochs, steps_per_epoch=steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    history, best_acc, start_epoch = [], -1.0, 1
    if checkpoint is not None:
        net.load_state_dict(checkpoint["model"])
        opt.load_state_dict(checkpoint["optimizer"])
        sched.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        history, best_acc, start_epoch = checkpoint["history"], checkpoint["best_acc"], checkpoint["epoch"] + 1
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
            train_loss, train_acc = train_epoch(model, data, epoch, args, opt, sched, scaler, rank, world, device, bar)
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
                             args=vars(args),
                             rng=dict(torch=torch.get_rng_state(),
                                      cuda=torch.cuda.get_rng_state_all() if device.type == "cuda" else None)),
                        out / "checkpoint.pt")
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
