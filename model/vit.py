"""A small Vision Transformer for 32 x 32 images, built from the classes of ViT-pytorch
(https://github.com/jeonsworld/ViT-pytorch, models/modeling.py) as one write-up explains them:

  Embeddings  patch embedding (a Conv2d with kernel = stride = patch size), a class token prepended,
              learned position embeddings added, dropout
  Attention   query, key, value and out Linears over `heads` heads; here through
              F.scaled_dot_product_attention (ViT-pytorch computes softmax(q k^T / sqrt(head_dim)) v itself)
  Mlp         fc1 -> GELU -> dropout -> fc2 -> dropout
  Block       pre-LayerNorm and two residuals: x = x + Attention(LN(x)); x = x + Mlp(LN(x))
  Encoder     `layers` Blocks, then a final LayerNorm
  VisionTransformer  Embeddings -> Encoder -> Linear head on the class token

ViT-B/16's shape (patch 16, width 768, 12 layers, 12 heads, MLP 3072) is meant for 224 x 224 images. Sized
for CIFAR-10 here (ViTConfig's defaults): patch 4 (an 8 x 8 grid: 64 patches and the class token), width 128,
6 layers, 4 heads of 32, MLP 512 (4 x the width, as ViT-B), dropout 0.1, attention dropout 0 (ViT-pytorch's
rates); 1.2M parameters. Class token and position embeddings start at zero, as in ViT-pytorch; the MLP
starts as there too (Xavier-uniform weights, biases normal with std 1e-6).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class ViTConfig:
    image_size: int = 32
    patch_size: int = 4
    hidden_size: int = 128
    num_layers: int = 6
    num_heads: int = 4
    mlp_dim: int = 512
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.0
    num_classes: int = 10

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class Embeddings(nn.Module):
    """(B, 3, H, W) -> (B, 1 + n_patches, hidden): patch embeddings after a class token, plus position."""

    summary_as_one_layer = True  # its own parameters (class token, positions) belong to no leaf

    def __init__(self, config: ViTConfig):
        super().__init__()
        if config.image_size % config.patch_size:
            raise ValueError(f"patch size {config.patch_size} does not divide image size {config.image_size}")
        self.patch_embeddings = nn.Conv2d(
            3, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.position_embeddings = nn.Parameter(torch.zeros(1, config.n_patches + 1, config.hidden_size))
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, images: Tensor) -> Tensor:
        x = self.patch_embeddings(images).flatten(2).transpose(1, 2)  # (B, n_patches, hidden)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.dropout(x + self.position_embeddings)


class Attention(nn.Module):
    """Multi-head self-attention, (B, T, hidden) -> (B, T, hidden)."""

    summary_as_one_layer = True

    def __init__(self, config: ViTConfig):
        super().__init__()
        if config.hidden_size % config.num_heads:
            raise ValueError(f"{config.num_heads} heads do not divide width {config.hidden_size}")
        self.num_heads = config.num_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.out = nn.Linear(config.hidden_size, config.hidden_size)
        self.attention_dropout_rate = config.attention_dropout_rate
        self.proj_dropout = nn.Dropout(config.dropout_rate)

    def _heads(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        return x.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2)  # (B, heads, T, head_dim)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))
        context = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attention_dropout_rate if self.training else 0.0
        )  # softmax(q k^T / sqrt(head_dim)) v, fused where PyTorch has a kernel for it
        return self.proj_dropout(self.out(context.transpose(1, 2).flatten(2)))


class Mlp(nn.Module):
    summary_as_one_layer = True

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.mlp_dim)
        self.fc2 = nn.Linear(config.mlp_dim, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout_rate)
        for fc in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(fc.weight)
            nn.init.normal_(fc.bias, std=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.fc2(self.dropout(F.gelu(self.fc1(x)))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block with two residuals."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.attn = Attention(config)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.ffn = Mlp(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.attention_norm(x))
        return x + self.ffn(self.ffn_norm(x))


class Encoder(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.layer = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.encoder_norm = nn.LayerNorm(config.hidden_size, eps=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.layer:
            x = block(x)
        return self.encoder_norm(x)


class VisionTransformer(nn.Module):
    """(B, 3, 32, 32) -> (B, num_classes) logits, from the class token's final state."""

    def __init__(self, config: ViTConfig = ViTConfig()):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)
        self.head = nn.Linear(config.hidden_size, config.num_classes)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.encoder(self.embeddings(images))[:, 0])
