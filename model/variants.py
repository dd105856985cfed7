"""Two readings of the Ultimus block that differ from the assignment's math, as two write-ups built them,
in plain PyTorch (the fused kernels in ultimus_kernels compute only the assignment's outer-product block,
so these never run on them, whatever `--backend` says).

ElementwiseUltimusNet: per sample, am = softmax(q * k / sqrt(d)) over the d features (elementwise, not an
    outer product), z = v * am, y = Out(z) + x. Same layers and parameter count as UltimusNet (25,882).
BatchAttentionNet: attention across the samples of the batch: scores = softmax(q k^T / sqrt(d)) over the
    batch (B x B), z = scores v; one block with shared weights applied four times, x = x + block(x);
    no ReLU after the third convolution. A sample's output depends on the other samples in its batch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .net import conv_features


class _QKVOut(nn.Module):
    """The Linears every variant block has, named as in UltimusBlock (so the state_dict keys match):
    q, k, v (dim -> attn_dim) and out (attn_dim -> dim)."""

    summary_as_one_layer = True  # model/summary.py reports it as one layer, as it does UltimusBlock

    def __init__(self, dim: int = 48, attn_dim: int = 8):
        super().__init__()
        self.dim, self.attn_dim = dim, attn_dim
        self.q = nn.Linear(dim, attn_dim)
        self.k = nn.Linear(dim, attn_dim)
        self.v = nn.Linear(dim, attn_dim)
        self.out = nn.Linear(attn_dim, dim)


class ElementwiseUltimusBlock(_QKVOut):
    """(B, dim) -> (B, dim): q, k, v = Linear(x); am = softmax(q * k / sqrt(attn_dim)) over the attn_dim
    features; z = v * am; y = Out(z) + x. Submodules q, k, v, out as in UltimusBlock, so the state_dict
    keys are the same."""

    def forward(self, x: Tensor) -> Tensor:
        am = torch.softmax(self.q(x) * self.k(x) / math.sqrt(self.attn_dim), dim=-1)
        return self.out(self.v(x) * am) + x

    def extra_repr(self) -> str:
        return f"dim={self.dim}, attn_dim={self.attn_dim}, elementwise softmax, residual"


class BatchAttentionBlock(_QKVOut):
    """(B, dim) -> (B, dim), attention across the batch: q, k, v = Linear(x) (each (B, attn_dim));
    scores = softmax(q k^T / sqrt(attn_dim)) over the batch's samples (B x B); y = Out(scores v).
    No skip connection inside (BatchAttentionNet adds it)."""

    def forward(self, x: Tensor) -> Tensor:
        scores = torch.softmax(self.q(x) @ self.k(x).T / math.sqrt(self.attn_dim), dim=-1)  # (B, B)
        return self.out(scores @ self.v(x))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, attn_dim={self.attn_dim}, softmax over the batch"


class _ConvTrunkNet(nn.Module):
    """The conv trunk, pooling and head every Ultimus-style net here shares; subclasses add the blocks."""

    def __init__(self, dim, batchnorm, dropout, conv_dropout, last_relu=True):
        super().__init__()
        self.features = conv_features(dim, batchnorm=batchnorm, dropout=conv_dropout, last_relu=last_relu)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def pooled(self, images: Tensor) -> Tensor:
        return self.dropout(self.flatten(self.pool(self.features(images))))


class ElementwiseUltimusNet(_ConvTrunkNet):
    """UltimusNet's layers (same state_dict keys, 25,882 parameters) with ElementwiseUltimusBlocks."""

    def __init__(
        self,
        num_classes: int = 10,
        blocks: int = 4,
        dim: int = 48,
        attn_dim: int = 8,
        batchnorm: bool = False,
        dropout: float = 0.0,
        conv_dropout: float = 0.0,
    ):
        super().__init__(dim, batchnorm, dropout, conv_dropout)
        self.blocks = nn.Sequential(*(ElementwiseUltimusBlock(dim, attn_dim) for _ in range(blocks)))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.blocks(self.pooled(images)))


class BatchAttentionNet(_ConvTrunkNet):
    """Conv trunk without a ReLU after its last convolution, then one BatchAttentionBlock applied `repeats`
    times with the skip connection in the network (x = x + block(x)), then the head."""

    def __init__(
        self,
        num_classes: int = 10,
        repeats: int = 4,
        dim: int = 48,
        attn_dim: int = 8,
        batchnorm: bool = False,
        dropout: float = 0.0,
        conv_dropout: float = 0.0,
    ):
        super().__init__(dim, batchnorm, dropout, conv_dropout, last_relu=False)
        self.repeats = repeats
        self.block = BatchAttentionBlock(dim, attn_dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        x = self.pooled(images)
        for _ in range(self.repeats):
            x = x + self.block(x)
        return self.head(x)
