"""`python -m model`: print the per-layer summary of UltimusNet."""

import argparse

from ultimus_kernels import BACKENDS

from . import UltimusNet, summary


def main() -> None:
    p = argparse.ArgumentParser(description="Print UltimusNet's layers, output shapes and parameter counts.")
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
    print(summary(UltimusNet(blocks=a.blocks, batchnorm=a.batchnorm, dropout=a.dropout, backend=a.backend)))


if __name__ == "__main__":
    main()
