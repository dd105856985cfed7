"""The plots a run writes: training curves, misclassified test images, the LR range test, and what a
spatial transformer does to test images."""

from __future__ import annotations

import math
from pathlib import Path


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


def plot_stn(images, transformed, path: Path, cols: int = 8) -> None:
    """Two grids side by side, as in PyTorch's STN tutorial: test images (N, 3, H, W) in [0, 1], and the
    same images after the spatial transformer."""
    from torchvision.utils import make_grid

    plt = _pyplot()
    rows = max(1, math.ceil(len(images) / cols))
    fig, axes = plt.subplots(1, 2, figsize=(12, 6 * rows / cols + 0.6))  # each panel 6 inches wide
    for ax, batch, title in ((axes[0], images, "test images"), (axes[1], transformed, "transformed by the STN")):
        ax.imshow(make_grid(batch, nrow=cols, padding=2, pad_value=1.0).permute(1, 2, 0).numpy())
        ax.set_title(title)
        ax.axis("off")
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
