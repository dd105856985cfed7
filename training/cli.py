"""train.py's command line: every flag, its range, and the checks across flags, all before any data is
loaded (zero is a value, never "use the default"). --preset NAME fills in the settings a write-up used
(model/presets.py); an explicit flag overrides the preset's value."""

from __future__ import annotations

import argparse
import math
import textwrap
from pathlib import Path

import torch

from model.data import AUGMENTATIONS
from model.presets import MODEL_DEFAULTS, PRESETS, get_preset
from ultimus_kernels import BACKENDS

from .checkpoints import RUN_FILES

DEFAULT_MAX_LR = 0.01  # Adam's one-cycle peak for this 26k-parameter net; --lr-find measures it instead

# The settings a preset may set, at their values for a run without one (the run train.py has always made).
# Their flags parse to None so that an explicit flag can be told from a preset's value; `resolve` fills
# them in, and the resolved values are what a checkpoint keeps (so --resume rebuilds the same run).
DEFAULTS = {
    **{key: value for key, value in MODEL_DEFAULTS.items() if key != "backend"},
    "augment": "crop-flip-cutout8",
    "epochs": 24,
    "batch_size": 128,
    "test_batch_size": 1000,
    "optimizer": "adam",
    "momentum": 0.9,
    "weight_decay": 0.0,
    "max_lr": None,  # DEFAULT_MAX_LR, unless --lr-find measures it
    "schedule": "onecycle",
    "pct_start": 0.3,
    "div_factor": 25.0,
    "final_div_factor": 1e4,
    "anneal": "cos",
    "three_phase": False,
    "lr_find": False,
    "lr_find_pick": "min10",
    "lr_find_start": 1e-6,
    "lr_find_end": 1.0,
    "lr_find_steps": 100,
}
ONE_CYCLE_ONLY = ("pct_start", "div_factor", "final_div_factor", "anneal", "three_phase")
LR_FIND_ONLY = ("lr_find_pick", "lr_find_start", "lr_find_end", "lr_find_steps")


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
FRACTION = _number(float, 0, 1, low_open=True, what="a number in (0, 1)")
AT_LEAST_TWO = _number(int, 2, what="an integer >= 2")


def _presets_epilog() -> str:
    lines = ["presets (--preset NAME; explicit flags override a preset's settings; README.md, Presets, has more):"]
    for name, preset in PRESETS.items():
        text = textwrap.wrap(preset.summary, 96 - 20)
        lines.append(f"  {name:<18}{text[0]}")
        lines += [" " * 20 + line for line in text[1:]]
    return "\n".join(lines)


def _default(key: str) -> str:
    return f"default {DEFAULTS[key]}, or the preset's"


def build_parser(description: str = "") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py",
        description=description,
        epilog=_presets_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--preset",
        choices=list(PRESETS),
        default=None,
        metavar="NAME",
        help="train the system a write-up built: its model and settings (listed below); explicit flags override "
        "the settings. Without it: UltimusNet with the defaults given here",
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
    d.add_argument(
        "--augment",
        choices=list(AUGMENTATIONS),
        default=None,
        help="training-batch augmentation: random crop (pad 4) and flip, with one 8x8 or 16x16 cutout "
        f"(probability 1/2), or without; or none ({_default('augment')})",
    )
    m = p.add_argument_group("model")
    m.add_argument(
        "--backend",
        choices=("auto", *BACKENDS),
        default="auto",
        help="Ultimus block implementation (default auto: the fastest that runs on --device). The elementwise, "
        "batch-attention, stn and vit presets have no such block (they run in plain PyTorch): auto or reference",
    )
    m.add_argument(
        "--batchnorm",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="BatchNorm after each convolution (default off, or the preset's)",
    )
    m.add_argument(
        "--dropout",
        type=PROBABILITY,
        default=None,
        help=f"dropout on the pooled features, in [0, 1) ({_default('dropout')})",
    )
    m.add_argument(
        "--conv-dropout",
        type=PROBABILITY,
        default=None,
        help=f"dropout after each convolution, in [0, 1) ({_default('conv_dropout')})",
    )
    m.add_argument("--compile", action="store_true", help="torch.compile the model")
    m.add_argument(
        "--cuda-graph",
        action="store_true",
        help="on a GPU, replay the whole training step (augmentation, forward, loss, backward, Adam, the "
        "schedule, the running sums) as a CUDA graph after 3 eager warm-up steps; the schedule is computed on "
        "the device and Adam is capturable. An epoch's last, smaller batch runs eagerly. Not with --amp fp16, "
        "--compile, SGD or torchrun (experimental: not yet measured on a GPU)",
    )
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=POSITIVE_INT, default=None, help=f"epochs ({_default('epochs')})")
    o.add_argument(
        "--batch-size", type=POSITIVE_INT, default=None, help=f"batch size per process ({_default('batch_size')})"
    )
    o.add_argument(
        "--test-batch-size",
        type=POSITIVE_INT,
        default=None,
        help="batch size of the evaluation; the results depend on it only for a model that mixes the samples "
        f"of a batch (batch-attention) ({_default('test_batch_size')})",
    )
    o.add_argument(
        "--optimizer", choices=["adam", "sgd"], default=None, help=f"the optimiser ({_default('optimizer')})"
    )
    o.add_argument(
        "--momentum",
        type=PROBABILITY,
        default=None,
        help=f"SGD momentum, in [0, 1), kept constant ({_default('momentum')}); with Adam, one-cycle cycles beta1",
    )
    o.add_argument(
        "--max-lr",
        type=POSITIVE,
        default=None,
        help=f"one-cycle peak learning rate (or the constant one), > 0 (default {DEFAULT_MAX_LR}, measured by "
        "--lr-find, or the preset's; given, it replaces a preset's LR range test)",
    )
    o.add_argument(
        "--weight-decay",
        type=NON_NEGATIVE,
        default=None,
        help=f"optimiser weight decay, >= 0 ({_default('weight_decay')})",
    )
    o.add_argument(
        "--schedule",
        choices=["onecycle", "constant"],
        default=None,
        help=f"learning-rate schedule: OneCycleLR, stepped every batch, or constant ({_default('schedule')})",
    )
    o.add_argument(
        "--pct-start",
        type=FRACTION,
        default=None,
        help=f"one-cycle: fraction of the steps spent raising the lr, in (0, 1) ({_default('pct_start')})",
    )
    o.add_argument(
        "--div-factor",
        type=POSITIVE,
        default=None,
        help=f"one-cycle: starting lr = max lr / this, > 0 ({_default('div_factor')})",
    )
    o.add_argument(
        "--final-div-factor",
        type=POSITIVE,
        default=None,
        help=f"one-cycle: final lr = starting lr / this, > 0 ({_default('final_div_factor')})",
    )
    o.add_argument(
        "--anneal",
        choices=["cos", "linear"],
        default=None,
        help=f"one-cycle: shape of the lr's rise and fall ({_default('anneal')})",
    )
    o.add_argument(
        "--three-phase",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="one-cycle: three phases (up, down to the start, annihilate) instead of two (default off, or the "
        "preset's)",
    )
    o.add_argument(
        "--lr-find",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run an LR range test first (exponential sweep, smoothed loss) and use its pick as --max-lr "
        "(default off, or the preset's)",
    )
    o.add_argument(
        "--lr-find-pick",
        choices=["min10", "steepest", "min"],
        default=None,
        help="LR range test pick: the loss minimum's LR / 10, the steepest descent, or the loss minimum's LR "
        f"({_default('lr_find_pick')})",
    )
    o.add_argument(
        "--lr-find-start",
        type=POSITIVE,
        default=None,
        help=f"LR range test: first learning rate, > 0 ({_default('lr_find_start')})",
    )
    o.add_argument(
        "--lr-find-end",
        type=POSITIVE,
        default=None,
        help=f"LR range test: last learning rate, > --lr-find-start ({_default('lr_find_end')})",
    )
    o.add_argument(
        "--lr-find-steps",
        type=AT_LEAST_TWO,
        default=None,
        help=f"LR range test: steps of the sweep, >= 2 ({_default('lr_find_steps')})",
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
    if not args.resume:  # a resumed run takes its settings from its checkpoint
        resolve(args, parser)
    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if getattr(args, "cuda_graph", False):
        if args.amp == "fp16":
            parser.error("--cuda-graph: --amp fp16's loss scaler reads the gradients on the host every step; use bf16")
        if args.compile:
            parser.error(
                "--cuda-graph and --compile: give one (torch.compile has its own graphs: mode reduce-overhead)"
            )
        if args.optimizer == "sgd":
            parser.error("--cuda-graph replays Adam (capturable); it does not support --optimizer sgd")
        if torch.device(device).type != "cuda":
            parser.error("--cuda-graph needs a CUDA device")
    if args.amp != "off" and device.type != "cuda":
        parser.error("--amp needs a CUDA device")
    if args.stop_after_epoch is not None and not args.resume and args.stop_after_epoch > args.epochs:
        parser.error(f"--stop-after-epoch {args.stop_after_epoch} is past --epochs {args.epochs}")
    return args


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def resolve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Fill in every setting not given explicitly: the preset's value, else DEFAULTS'. Then refuse what
    the result cannot use: model flags the preset's model does not have, a fused --backend for a model
    without the assignment's block, flags of a schedule, optimiser or range test the run does not use."""
    preset = get_preset(args.preset)
    explicit = {key for key in DEFAULTS if getattr(args, key) is not None}
    named = f"preset {preset.name}"
    foreign = [key for key in MODEL_DEFAULTS if key in explicit and key not in preset.model_options]
    if foreign:
        parser.error(f"{', '.join(map(_flag, foreign))}: {named}'s model has no such option")
    if not preset.fused and args.backend not in ("auto", "reference"):
        parser.error(
            f"--backend {args.backend}: the fused backends compute only the assignment's Ultimus block, and "
            f"{named} has none they can run ({preset.runs_on}). Use --backend auto or reference (or leave it out)"
        )
    for key, default in DEFAULTS.items():
        if key not in explicit:
            setattr(args, key, preset.settings.get(key, default))
    # An explicit peak LR replaces a preset's range test; an explicit --lr-find replaces a preset's peak LR.
    if "max_lr" in explicit and "lr_find" not in explicit:
        args.lr_find = False
    if "lr_find" in explicit and args.lr_find:
        args.max_lr = None
    unused = []
    if args.schedule == "constant":
        unused += [key for key in ONE_CYCLE_ONLY if key in explicit]
    if args.optimizer != "sgd" and "momentum" in explicit:
        unused.append("momentum")
    if not args.lr_find:
        unused += [key for key in LR_FIND_ONLY if key in explicit]
    if unused:
        parser.error(
            f"{', '.join(map(_flag, unused))}: not used by this run (--schedule {args.schedule}, --optimizer "
            f"{args.optimizer}, LR range test {'on' if args.lr_find else 'off'})"
        )
    if args.lr_find and args.lr_find_start >= args.lr_find_end:
        parser.error(f"--lr-find-start {args.lr_find_start:g} must be below --lr-find-end {args.lr_find_end:g}")


def resolved_defaults() -> dict:
    """The settings of a run without a preset: what a checkpoint written before presets existed ran with."""
    return {"preset": None, **DEFAULTS}
