"""Data for training UltimusNet: CIFAR-10 (through torchvision) or an offline synthetic stand-in,
held as uint8 tensors, with batched augmentation that runs on whatever device holds the batch.

Keeping the data as one tensor (150 MB for CIFAR-10) lets a GPU run hold the whole set in device
memory and augment there, so an epoch is bounded by the model and not by Python data loading.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SYNTHETIC_CLASSES = tuple(f"pattern {c}" for c in range(10))


@dataclass
class Split:
    images: Tensor  # (N, 3, 32, 32) uint8
    labels: Tensor  # (N,) int64


@dataclass
class Dataset:
    train: Split
    test: Split
    classes: tuple
    mean: tuple
    std: tuple


class DataUnavailable(RuntimeError):
    """CIFAR-10 is not on disk and could not be downloaded."""


def _subsample(split: Split, size: int | None, seed: int) -> Split:
    if size is None or size >= len(split.labels):
        return split
    keep = torch.randperm(len(split.labels), generator=torch.Generator().manual_seed(seed))[:size]
    return Split(split.images[keep], split.labels[keep])


def load_cifar10(
    data_dir: str | Path, download: bool, train_size: int | None = None, test_size: int | None = None
) -> Dataset:
    """CIFAR-10 through torchvision.datasets.CIFAR10 (the standard loader and on-disk layout)."""
    import torchvision

    splits = {}
    for name, train in (("train", True), ("test", False)):
        try:
            ds = torchvision.datasets.CIFAR10(root=str(data_dir), train=train, download=download)
        except Exception as exc:  # offline, missing or corrupted files
            where = Path(data_dir).resolve() / "cifar-10-batches-py"
            raise DataUnavailable(
                f"CIFAR-10 was not found in {where}"
                + (" and could not be downloaded" if download else " (--no-download was given)")
                + f": {exc}\nTo proceed: put the extracted 'cifar-10-batches-py' folder under --data-dir "
                "(or point --data-dir at its parent), allow the download, or train offline on "
                "--dataset synthetic."
            ) from exc
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # (N, 32, 32, 3) -> NCHW
        splits[name] = Split(images, torch.tensor(ds.targets, dtype=torch.int64))
    return Dataset(
        _subsample(splits["train"], train_size, 0),
        _subsample(splits["test"], test_size, 1),
        CIFAR10_CLASSES,
        CIFAR10_MEAN,
        CIFAR10_STD,
    )


def _synthetic_split(n: int, seed: int) -> Split:
    """Ten classes, each a family of images: an oriented colour grating of the class's own
    frequency, direction and palette, at a random phase, under a random blob and pixel noise.
    Learnable (a small CNN beats chance by far within an epoch or two) but not a constant per class."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    cls = torch.arange(10, dtype=torch.float32)
    angle = cls * math.pi / 10  # class direction
    freq = 0.25 + 0.06 * (cls % 5)  # class spatial frequency (radians / pixel)
    palette = torch.stack([0.5 + 0.4 * torch.cos(2 * math.pi * cls / 10 + o) for o in (0.0, 2.1, 4.2)], 1)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    a, f = angle[labels], freq[labels]  # (n,), (n,)
    # Colour is only a hint: mixed with a random colour per image.
    col = 0.5 * palette[labels] + 0.5 * torch.rand(n, 3, generator=g)  # (n, 3)
    jitter = 0.2 * torch.randn(n, generator=g)  # per-image direction noise
    proj = torch.cos(a + jitter)[:, None, None] * xx + torch.sin(a + jitter)[:, None, None] * yy
    phase = 2 * math.pi * torch.rand(n, 1, 1, generator=g)
    wave = 0.5 + 0.5 * torch.sin(f[:, None, None] * proj + phase)  # (n, 32, 32) in [0, 1]
    img = col[:, :, None, None] * (0.35 + 0.65 * wave[:, None])  # (n, 3, 32, 32)
    # A random soft blob of random colour, and noise: distractors the net must learn to ignore.
    cy, cx = torch.rand(2, n, 1, 1, generator=g) * 32
    blob = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 5.0**2))
    img = img * (1 - 0.6 * blob[:, None]) + 0.6 * blob[:, None] * torch.rand(n, 3, 1, 1, generator=g)
    img = img * (0.7 + 0.6 * torch.rand(n, 1, 1, 1, generator=g)) + 0.25 * torch.randn(img.shape, generator=g)
    return Split((img.clamp(0, 1) * 255).round().to(torch.uint8), labels)


def load_synthetic(train_size: int | None = None, test_size: int | None = None) -> Dataset:
    """The offline stand-in for CIFAR-10: same shapes, dtype and normalisation path."""
    train = _synthetic_split(50_000 if train_size is None else train_size, seed=2024)
    test = _synthetic_split(10_000 if test_size is None else test_size, seed=2025)
    scaled = train.images[:5000].float() / 255
    mean = tuple(scaled.mean((0, 2, 3)).tolist())
    std = tuple(scaled.std((0, 2, 3)).tolist())
    return Dataset(train, test, SYNTHETIC_CLASSES, mean, std)


# ------------------------------------------------------------------------------------------------
# Batched preprocessing, on the batch's device
# ------------------------------------------------------------------------------------------------


def normalize(images: Tensor, mean, std) -> Tensor:
    """uint8 (B, 3, 32, 32) -> float32, scaled to [0, 1] and standardised per channel."""
    m, s = _channel_stats(images.device, tuple(mean), tuple(std))
    return (images.float() / 255 - m) / s


@functools.lru_cache(maxsize=16)
def _channel_stats(device: torch.device, mean: tuple, std: tuple) -> tuple[Tensor, Tensor]:
    """The per-channel mean and std as (1, 3, 1, 1) tensors on `device`, made once: a copy from the host
    per batch is a synchronising transfer on a GPU, and cannot be captured in a CUDA graph."""
    return (
        torch.tensor(mean, device=device).view(1, 3, 1, 1),
        torch.tensor(std, device=device).view(1, 3, 1, 1),
    )


# train.py --augment: each name's `augment` arguments (None: the batch is used as it is).
AUGMENTATIONS = {
    "crop-flip-cutout8": dict(pad=4, cutout=8),  # the project's recipe (the default)
    "crop-flip-cutout16": dict(pad=4, cutout=16),  # coarse dropout of half the image's side (the no-bias preset)
    "crop-flip": dict(pad=4, cutout=0),
    "none": None,
}


def augmentation(name: str) -> Callable[[Tensor, torch.Generator], Tensor]:
    """The training-batch transform AUGMENTATIONS[name] names: (normalised batch, generator) -> batch."""
    params = AUGMENTATIONS[name]
    return (lambda x, gen: x) if params is None else functools.partial(augment, **params)


def augment(x: Tensor, gen: torch.Generator, pad: int = 4, cutout: int = 8) -> Tensor:
    """Random crop with zero padding (zero is the mean after normalisation), horizontal flip, and
    cutout of one cutout x cutout square with probability 1/2 (none when cutout is 0): the CIFAR-10
    recipe, for a batch."""
    B, C, H, W = x.shape
    dev = x.device
    rand = lambda *shape: torch.rand(*shape, generator=gen, device=dev)  # noqa: E731
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    oy = (rand(B) * (2 * pad + 1)).long()
    ox = (rand(B) * (2 * pad + 1)).long()
    rows = (oy[:, None] + torch.arange(H, device=dev))[:, None, :, None]  # (B, 1, H, 1)
    cols = (ox[:, None] + torch.arange(W, device=dev))[:, None, None, :]  # (B, 1, 1, W)
    x = padded[
        torch.arange(B, device=dev)[:, None, None, None], torch.arange(C, device=dev)[None, :, None, None], rows, cols
    ]
    flip = rand(B) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    cy, cx = (rand(B) * H).long(), (rand(B) * W).long()
    use = rand(B) < 0.5
    yy = torch.arange(H, device=dev)[None, :, None]
    xx = torch.arange(W, device=dev)[None, None, :]
    half = cutout // 2
    dy, dx = yy - cy[:, None, None], xx - cx[:, None, None]
    # Offsets -half .. cutout - half - 1 around the centre: exactly cutout x cutout (odd sizes too).
    inside = (dy >= -half) & (dy < cutout - half) & (dx >= -half) & (dx < cutout - half)
    hole = inside & use[:, None, None]
    return x.masked_fill(hole[:, None], 0.0)
