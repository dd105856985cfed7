"""train.py's command line: every flag, its range, and the checks across flags, all before any data is
loaded (zero is a value, never "use the default")."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from ultimus_kernels import BACKENDS

from .checkpoints import RUN_FILES

DEFAULT_MAX_LR = 0.01  # Adam's one-cycle peak for this 26k-parameter net; --lr-find measures it instead


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


def build_parser(description: str = "") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py", description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    d = p.add_argument_group("data")
    d.add_argument(
        "--dataset",
        choices=["cifar10", "synthetic"],
        default="cifar10",
        help="cifar10 (torchvision) or synthetic: an offline, learnable 10-class stand-in (default cifar10)",
    )
    d.add_argument("--data-dir", default="./data", help="where CIFAR-10 is, or is downloaded to (default ./data)")
    d.add_argument("--no-download", action="store_true", help="never download CIFAR-10; stop if it is missing")
    d.add_argument(
        "--train-size",
        type=POSITIVE_INT,
        default=None,
        help="training images: a seeded subsample of CIFAR-10, or the synthetic set's size (default 50000)",
    )
    d.add_argument("--test-size", type=POSITIVE_INT, default=None, help="test images, likewise (default 10000)")
    d.add_argument(
        "--workers",
        type=COUNT,
        default=2,
        help="background processes gathering batches when the data stays in host memory (default 2)",
    )
    m = p.add_argument_group("model")
    m.add_argument(
        "--backend",
        choices=("auto", *BACKENDS),
        default="auto",
        help="Ultimus block implementation (default auto: the fastest that runs on --device)",
    )
    m.add_argument("--batchnorm", action="store_true", help="BatchNorm after each convolution")
    m.add_argument(
        "--dropout", type=PROBABILITY, default=0.0, help="dropout on the pooled features, in [0, 1) (default 0)"
    )
    m.add_argument("--compile", action="store_true", help="torch.compile the model")
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=POSITIVE_INT, default=24, help="epochs (default 24)")
    o.add_argument("--batch-size", type=POSITIVE_INT, default=128, help="batch size per process (default 128)")
    o.add_argument(
        "--max-lr",
        type=POSITIVE,
        default=None,
        help=f"one-cycle peak learning rate, > 0 (default {DEFAULT_MAX_LR}, or measured by --lr-find)",
    )
    o.add_argument("--weight-decay", type=NON_NEGATIVE, default=0.0, help="Adam weight decay, >= 0 (default 0)")
    o.add_argument(
        "--lr-find",
        action="store_true",
        help="run an LR range test first (exponential sweep, smoothed loss) and use its pick as --max-lr",
    )
    o.add_argument(
        "--lr-find-pick",
        choices=["min10", "steepest"],
        default="min10",
        help="LR range test pick: the loss minimum's LR / 10, or the steepest descent (default min10)",
    )
    o.add_argument(
        "--amp",
        choices=["off", "bf16", "fp16"],
        default="off",
        help="autocast on GPU: bf16, or fp16 with a gradient scaler (default off)",
    )
    r = p.add_argument_group("run")
    r.add_argument("--device", type=_device, default=None, help="cpu, cuda or cuda:N (default cuda when available)")
    r.add_argument("--seed", type=SEED, default=0, help="seed: the run is deterministic given it (default 0)")
    r.add_argument(
        "--out",
        default=None,
        help="output folder (default runs/<timestamp>); one that already holds a run is refused "
        "unless --overwrite is given",
    )
    r.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in --out (its checkpoints, history and plots are deleted first)",
    )
    r.add_argument(
        "--resume",
        default=None,
        metavar="DIR",
        help="continue the run whose checkpoint.pt is in DIR (its settings are kept; only --device, "
        "--workers, --no-progress and --stop-after-epoch may be given with it)",
    )
    r.add_argument(
        "--stop-after-epoch",
        type=POSITIVE_INT,
        default=None,
        metavar="N",
        help="stop after epoch N as if interrupted (continue later with --resume)",
    )
    r.add_argument("--no-progress", action="store_true", help="no progress bars, only the per-epoch lines")
    return p


# What `--resume` lets a user change; every other setting is the run's own.
KEEP_ON_RESUME = ("resume", "stop_after_epoch", "device", "workers", "no_progress")


def parse_args(argv=None, description: str = "") -> argparse.Namespace:
    """Parse and check every flag's range and their combinations, before anything is loaded."""
    parser = build_parser(description)
    args = parser.parse_args(argv)
    if args.resume:
        explicit = build_parser()
        for action in explicit._actions:
            action.default = argparse.SUPPRESS
        given = set(vars(explicit.parse_args(argv))) - set(KEEP_ON_RESUME)
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in sorted(given))
            parser.error(
                f"--resume continues a run with its own settings; {flags} cannot be changed "
                "(start a new run with --out instead)"
            )
    elif args.out and not args.overwrite:
        existing = [name for name in RUN_FILES if (Path(args.out) / name).exists()]
        if existing:
            parser.error(
                f"--out {args.out} already holds a run ({', '.join(existing)}): continue it with "
                f"--resume {args.out}, choose another --out, or pass --overwrite to replace it"
            )
    if args.lr_find and args.max_lr is not None:
        parser.error("--lr-find measures the peak learning rate; give it or --max-lr, not both")
    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.amp != "off" and device.type != "cuda":
        parser.error("--amp needs a CUDA device")
    if args.stop_after_epoch is not None and not args.resume and args.stop_after_epoch > args.epochs:
        parser.error(f"--stop-after-epoch {args.stop_after_epoch} is past --epochs {args.epochs}")
    return args
