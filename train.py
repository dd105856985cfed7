"""Train UltimusNet on CIFAR-10: Adam with the one-cycle learning-rate policy, 24 epochs by default; or,
with --preset, the system one of the write-ups built (listed at the end; explicit flags override it).

    python train.py                                   # CIFAR-10 in ./data (downloaded if missing)
    python train.py --preset assignment               # the assignment's network and training recipe
    python train.py --dataset synthetic --epochs 2    # offline, no download needed
    python train.py --backend triton --amp bf16       # on a GPU, fused Triton kernels, bf16 autocast
    python train.py --lr-find                         # pick --max-lr with an LR range test first
    python train.py --resume runs/20261123-101500     # continue a killed run to the same result
    torchrun --nproc_per_node=2 train.py ...          # DistributedDataParallel (NCCL on GPUs, gloo on CPU)

Writes to --out (default runs/<timestamp>): history.json, curves.png, misclassified.png,
lr_find.png (with --lr-find), stn.png (with --preset stn), checkpoint.pt (every epoch, atomically) and
final.pt (best weights).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from model.data import DataUnavailable, Split, load_cifar10, load_synthetic, normalize
from model.presets import build_model, get_preset, parameter_count
from training.checkpoints import RUN_FILES, atomic_save, checksum_file, load_verified
from training.cli import DEFAULT_MAX_LR, KEEP_ON_RESUME, parse_args, resolved_defaults
from training.loop import RunContext, TrainingDiverged, evaluate, setup_distributed, train_epoch
from training.lr_find import lr_range_test
from training.optim import describe, make_optimizer, make_schedule
from training.plots import plot_curves, plot_lr_find, plot_misclassified, plot_stn

DATA_ON_DEVICE_LIMIT = 2 << 30  # keep the data set in GPU memory when it is smaller than this


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
        return _train(parse_args(argv, description=__doc__), state)
    except KeyboardInterrupt:
        if not state.main_process:
            raise SystemExit(130)
        if state.out is None:
            print("\ninterrupted before training started; nothing was written", file=sys.stderr)
        elif state.saved_epoch is None:
            print(f"\ninterrupted before the first epoch ended; nothing was saved in {state.out}", file=sys.stderr)
        else:
            print(
                f"\ninterrupted; {state.out / 'checkpoint.pt'} holds epoch {state.saved_epoch}: continue with "
                f"python train.py --resume {state.out}",
                file=sys.stderr,
            )
        raise SystemExit(130)


def _load_checkpoint(args) -> tuple[argparse.Namespace, dict]:
    """The run to resume: its checkpoint (verified) and its settings, with the flags --resume may change."""
    checkpoint = load_verified(Path(args.resume) / "checkpoint.pt", "--resume")
    saved = {**resolved_defaults(), **checkpoint["args"]}  # a run saved before presets: their defaults
    resumed = argparse.Namespace(**{**saved, **{k: getattr(args, k) for k in KEEP_ON_RESUME}})
    resumed.out = str(Path(args.resume))
    return resumed, checkpoint


def _train(args, state: RunState) -> list[dict]:
    from tqdm import tqdm

    checkpoint = None
    if args.resume:
        args, checkpoint = _load_checkpoint(args)
        state.out, state.saved_epoch = Path(args.out), checkpoint["epoch"]  # what a Ctrl-C from here on reports
    rank, world, device = setup_distributed(args)
    state.main_process = rank == 0
    if checkpoint is not None and checkpoint.get("world_size", world) != world:
        started = checkpoint["world_size"]
        raise SystemExit(
            f"error: --resume: this run was started with {started} process(es) and is resumed with {world}; the "
            f"data shards and the learning-rate schedule depend on that number. Resume it with {started} "
            "process(es)"
            + (
                f" (torchrun --nproc_per_node={started} train.py --resume {args.out})"
                if started > 1
                else f" (python train.py --resume {args.out})"
            )
        )
    say = (lambda *a: tqdm.write(" ".join(map(str, a)))) if state.main_process else (lambda *a: None)
    ctx = RunContext(args, _load_data(args), device, rank, world)
    out = state.out = _prepare_out(ctx, fresh=checkpoint is None)
    history, best_acc, start_epoch, steps_per_epoch = _build(ctx, checkpoint, out, say)

    for epoch in range(start_epoch, args.epochs + 1):
        if args.stop_after_epoch is not None and epoch > args.stop_after_epoch:
            say(f"stopping after epoch {args.stop_after_epoch} (--stop-after-epoch); continue with --resume {out}")
            break
        t0 = time.perf_counter()
        lr = ctx.sched.get_last_lr()[0]
        with tqdm(
            total=steps_per_epoch,
            desc=f"epoch {epoch}/{args.epochs}",
            leave=False,
            file=sys.stderr,
            disable=not state.main_process or args.no_progress,
        ) as bar:
            try:
                train_loss, train_acc = train_epoch(ctx, epoch, bar)
            except TrainingDiverged as exc:
                raise _diverged(str(exc), state, args) from None
        test_loss, test_acc, _ = evaluate(ctx)
        # The last step's update can make the weights non-finite while its loss still was: check them
        # (and the test loss) before anything of this epoch is saved.
        if not (math.isfinite(test_loss) and all(bool(p.isfinite().all()) for p in ctx.net.parameters())):
            raise _diverged(f"the weights stopped being finite in epoch {epoch} (test loss {test_loss})", state, args)
        seconds = time.perf_counter() - t0
        history.append(
            dict(
                epoch=epoch,
                lr=lr,
                train_loss=train_loss,
                train_acc=train_acc,
                test_loss=test_loss,
                test_acc=test_acc,
                seconds=seconds,
            )
        )
        say(
            f"epoch {epoch:>3}/{args.epochs}  lr {lr:.2e}  train loss {train_loss:.4f} acc {100 * train_acc:5.2f}%  "
            f"test loss {test_loss:.4f} acc {100 * test_acc:5.2f}%  {seconds:.1f}s"
        )
        if state.main_process:
            if test_acc > best_acc:
                best_acc = test_acc
                atomic_save(
                    dict(model=ctx.net.state_dict(), epoch=epoch, test_acc=test_acc, args=vars(args)), out / "final.pt"
                )
            _save_epoch(ctx, out, epoch, history, best_acc)
        state.saved_epoch = epoch
    else:
        _, _, wrong = evaluate(ctx, collect_wrong=32)
        if state.main_process:
            plot_misclassified(wrong, ctx.data.classes, out / "misclassified.png")
            if hasattr(ctx.net, "transform"):  # a spatial transformer: show what it does to test images
                _plot_transformed(ctx, out / "stn.png")
            say(f"done: best test accuracy {100 * best_acc:.2f}%; outputs in {out}")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return history


def _diverged(reason: str, state: RunState, args) -> SystemExit:
    """The message a diverged run ends with: what happened, what was kept, what to try."""
    kept = (
        f"{state.out / 'checkpoint.pt'} still holds epoch {state.saved_epoch}"
        if state.saved_epoch is not None
        else "nothing was saved"
    )
    return SystemExit(
        f"error: {reason}; training stopped and {kept}. Try a lower --max-lr (this run: {args.max_lr:.3e})"
        + (", or --amp bf16 / off instead of fp16" if args.amp == "fp16" else "")
        + ", and start a new run with --out."
    )


def _load_data(args):
    """The data set the flags ask for, or a SystemExit that says what is missing or too small."""
    try:
        data = (
            load_synthetic(args.train_size, args.test_size)
            if args.dataset == "synthetic"
            else load_cifar10(args.data_dir, not args.no_download, args.train_size, args.test_size)
        )
    except DataUnavailable as exc:
        raise SystemExit(f"error: {exc}") from None
    for name, split, asked in (("train", data.train, args.train_size), ("test", data.test, args.test_size)):
        if asked is not None and asked > len(split.labels):
            raise SystemExit(
                f"error: --{name}-size {asked}: the {args.dataset} {name} split has only {len(split.labels):,} images"
            )
    return data


def _prepare_out(ctx: RunContext, fresh: bool) -> Path:
    """The run folder, made once there is something to train on (an --overwrite run's old files go);
    on a GPU, the data moved into device memory when it fits."""
    args, data, device = ctx.args, ctx.data, ctx.device
    out = Path(args.out or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))
    if ctx.main_process:
        if getattr(args, "overwrite", False) and fresh:
            for name in RUN_FILES:
                for path in (out / name, checksum_file(out / name)):
                    path.unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
    if device.type == "cuda" and (data.train.images.numel() + data.test.images.numel()) < DATA_ON_DEVICE_LIMIT:
        data.train = Split(data.train.images.to(device), data.train.labels.to(device))
        data.test = Split(data.test.images.to(device), data.test.labels.to(device))
    return out


def _build(ctx: RunContext, checkpoint: Optional[dict], out: Path, say):
    """The network, optimiser, schedule and scaler into ctx (from the checkpoint when resuming);
    returns (history, best accuracy, first epoch, steps per epoch)."""
    args, data, device = ctx.args, ctx.data, ctx.device
    torch.manual_seed(args.seed)
    preset = get_preset(args.preset)
    net = ctx.net = build_model(
        args.preset,
        batchnorm=args.batchnorm,
        dropout=args.dropout,
        conv_dropout=args.conv_dropout,
        backend=args.backend,
    ).to(device)
    on_device = data.train.images.device.type == "cuda"
    runs_on = (
        f", backend {args.backend} (blocks run on '{_resolved_backend(net, device)}')"
        if preset.fused
        else f" ({preset.runs_on})"
    )
    say(
        (f"preset {args.preset}: " if args.preset else "")
        + f"{type(net).__name__}: {parameter_count(net):,} parameters{runs_on}, device {device}, "
        f"{ctx.world} process(es); {args.dataset}: {len(data.train.labels):,} train / {len(data.test.labels):,} "
        "test images" + (", held on the GPU" if on_device else "")
    )
    if args.lr_find and checkpoint is None:
        pick, lrs, losses = lr_range_test(ctx, args.lr_find_steps, args.lr_find_start, args.lr_find_end)
        if dist.is_initialized():  # every process trains with rank 0's pick
            t = torch.tensor([pick], dtype=torch.float64, device=device)
            dist.broadcast(t, 0)
            pick = t.item()
        args.max_lr = pick
        if ctx.main_process:
            plot_lr_find(lrs, losses, pick, out / "lr_find.png")
        say(f"LR range test ({args.lr_find_pick}): max lr {pick:.3e}  (plot: {out / 'lr_find.png'})")
    args.max_lr = max_lr = DEFAULT_MAX_LR if args.max_lr is None else args.max_lr

    if getattr(args, "cuda_graph", False) and ctx.world > 1:
        raise SystemExit("error: --cuda-graph does not run under torchrun (one graph per process is not built yet)")
    model = torch.nn.parallel.DistributedDataParallel(net) if ctx.world > 1 else net
    ctx.model = torch.compile(model) if args.compile else model
    ctx.opt = make_optimizer(args, net.parameters(), lr=max_lr / args.div_factor)
    steps_per_epoch = _steps_per_epoch(ctx)
    ctx.sched = make_schedule(args, ctx.opt, max_lr, steps_per_epoch)
    ctx.scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    history, best_acc, start_epoch = [], -1.0, 1
    if checkpoint is not None:
        # OneCycleLR keeps its length; a constant schedule's run keeps it beside (total_steps).
        saved_steps = checkpoint["scheduler"].get("total_steps", checkpoint.get("total_steps"))
        if saved_steps is not None and saved_steps != args.epochs * steps_per_epoch:
            raise SystemExit(
                f"error: --resume: the checkpoint's schedule has {saved_steps} "
                f"steps, this process would run {args.epochs * steps_per_epoch}: resume with the run's number of "
                "processes and the same data set"
            )
        net.load_state_dict(checkpoint["model"])
        ctx.opt.load_state_dict(checkpoint["optimizer"])
        ctx.sched.load_state_dict(checkpoint["scheduler"])
        ctx.scaler.load_state_dict(checkpoint["scaler"])
        history, best_acc, start_epoch = checkpoint["history"], checkpoint["best_acc"], checkpoint["epoch"] + 1
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if device.type == "cuda" and checkpoint["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])
        say(f"resumed {out} after epoch {checkpoint['epoch']}")
    say(
        f"{describe(args)}: {'max lr' if args.schedule == 'onecycle' else 'lr'} {max_lr:.3e}, {args.epochs} epochs "
        f"x {steps_per_epoch} steps, batch {args.batch_size} per process, amp {args.amp}"
        + (f", augment {args.augment}" if args.preset else "")
        + f"; writing to {out}"
    )
    return history, best_acc, start_epoch, steps_per_epoch


def _steps_per_epoch(ctx: RunContext) -> int:
    return math.ceil(math.ceil(len(ctx.data.train.labels) / ctx.world) / ctx.args.batch_size)


def _save_epoch(ctx: RunContext, out: Path, epoch: int, history: list, best_acc: float) -> None:
    """history.json, curves.png and checkpoint.pt after an epoch (each file written atomically)."""
    atomic_save(json.dumps(history, indent=1) + "\n", out / "history.json")
    plot_curves(history, out / "curves.png")
    cuda = ctx.device.type == "cuda"
    atomic_save(
        dict(
            model=ctx.net.state_dict(),
            optimizer=ctx.opt.state_dict(),
            scheduler=ctx.sched.state_dict(),
            scaler=ctx.scaler.state_dict(),
            epoch=epoch,
            history=history,
            best_acc=best_acc,
            args=vars(ctx.args),
            world_size=ctx.world,
            total_steps=ctx.args.epochs * _steps_per_epoch(ctx),
            rng=dict(torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state_all() if cuda else None),
        ),
        out / "checkpoint.pt",
    )


@torch.no_grad()
def _plot_transformed(ctx: RunContext, path: Path, count: int = 32) -> None:
    """stn.png: the first `count` test images beside what the spatial transformer makes of them."""
    data, net = ctx.data, ctx.net
    images = data.test.images[:count].to(ctx.device)
    net.eval()
    transformed = net.transform(normalize(images, data.mean, data.std)).float()
    mean = torch.tensor(data.mean, device=ctx.device).view(1, 3, 1, 1)
    std = torch.tensor(data.std, device=ctx.device).view(1, 3, 1, 1)
    plot_stn(images.float().cpu() / 255, (transformed * std + mean).clamp(0, 1).cpu(), path)


def _resolved_backend(net, device) -> str:
    from ultimus_kernels.dispatch import resolve_backend

    block = net.blocks[0]
    return resolve_backend(block.backend, device, block.dim, block.attn_dim)


if __name__ == "__main__":
    main()
