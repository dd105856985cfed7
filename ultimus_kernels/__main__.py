"""`python -m ultimus_kernels`: which backends run on this machine, and why the others do not."""

import argparse

import torch

from . import __version__
from .dispatch import AUTO_ORDER, backend_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.parse_args()
    print(f"ultimus-kernels {__version__}  torch {torch.__version__}  CUDA available: {torch.cuda.is_available()}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        print(f"\non {dev} (auto tries {', '.join(AUTO_ORDER[dev])}):")
        for name, why in backend_report(dev).items():
            print(f"  {name:<10} {'ok' if why is None else 'unavailable: ' + why}")


if __name__ == "__main__":
    main()
