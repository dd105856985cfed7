"""`python -m model`: print the per-layer summary of UltimusNet, or (--preset NAME, --all) of the presets'
models (model/presets.py)."""

import argparse

from ultimus_kernels import BACKENDS

from . import UltimusNet, summary
from .presets import PRESETS, build_model, parameter_count


def main() -> None:
    p = argparse.ArgumentParser(description="Print UltimusNet's layers, output shapes and parameter counts.")
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--preset", choices=list(PRESETS), help="print this preset's model instead (its own layers and options)"
    )
    which.add_argument("--all", action="store_true", help="print every preset's model, one after the other")
    p.add_argument("--blocks", type=int, default=4, help="number of Ultimus blocks (default 4)")
    p.add_argument("--batchnorm", action="store_true", help="add BatchNorm after each convolution")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout on the pooled features (default 0)")
    p.add_argument(
        "--backend",
        default="reference",
        choices=("auto",) + BACKENDS,
        help="Ultimus backend used for the summary pass (default reference)",
    )
    a = p.parse_args()
    if a.blocks < 0:
        p.error(f"--blocks must be >= 0, got {a.blocks}")
    if not 0 <= a.dropout < 1:
        p.error(f"--dropout must be in [0, 1), got {a.dropout}")
    if a.preset or a.all:
        changed = [
            flag
            for flag, value in (("--blocks", a.blocks != 4), ("--batchnorm", a.batchnorm), ("--dropout", a.dropout))
            if value
        ]
        if changed:
            p.error(
                f"{', '.join(changed)}: change the default UltimusNet only; a preset's model is printed as it trains"
            )
        for i, name in enumerate(PRESETS if a.all else [a.preset]):
            net = build_model(name, backend=a.backend)  # the models without Ultimus blocks ignore it
            print(("\n" if i else "") + f"preset {name}: {type(net).__name__}, {parameter_count(net):,} parameters")
            print(f"  {PRESETS[name].summary}\n")
            print(summary(net))
        return
    print(summary(UltimusNet(blocks=a.blocks, batchnorm=a.batchnorm, dropout=a.dropout, backend=a.backend)))


if __name__ == "__main__":
    main()
