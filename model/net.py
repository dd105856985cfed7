"""UltimusNet: the small CIFAR-10 "Ultimus transformer".

image (3, 32, 32) -> conv 3->16->32->48 (3x3, pad 1, ReLU) -> global average pool -> X (B, 48)
-> `blocks` UltimusBlocks (48 -> 8 -> 48) -> Linear(48, num_classes) -> logits

The keyword-only options (at today's values by default) are what the presets in model/presets.py
change: dropout after each convolution, bias-free and unpadded convolutions, bias-free blocks and head.
"""

from __future__ import annotations

from torch import Tensor, nn

from ultimus_kernels import UltimusStack

CONV_CHANNELS = (16, 32)  # the last conv goes to `dim`


def conv_features(
    dim: int = 48,
    *,
    batchnorm: bool = False,
    dropout: float = 0.0,
    bias: bool = True,
    padding: int = 1,
    last_relu: bool = True,
) -> nn.Sequential:
    """The convolutional trunk: 3 -> 16 -> 32 -> `dim` channels, 3x3 convolutions, each followed by
    [BatchNorm] ReLU [Dropout] (no ReLU after the last one when `last_relu` is False). With the defaults
    its layers are conv, ReLU, conv, ReLU, conv, ReLU: the state_dict keys every UltimusNet checkpoint has."""
    layers: list[nn.Module] = []
    channels = (*CONV_CHANNELS, dim)
    c_in = 3
    for i, c_out in enumerate(channels):
        layers.append(nn.Conv2d(c_in, c_out, kernel_size=3, padding=padding, bias=bias))
        if batchnorm:
            layers.append(nn.BatchNorm2d(c_out))
        if last_relu or i < len(channels) - 1:
            layers.append(nn.ReLU(inplace=True))
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        c_in = c_out
    return nn.Sequential(*layers)


class UltimusNet(nn.Module):
    def __init__(
        self,
        num_classes: int = 10,
        blocks: int = 4,
        dim: int = 48,
        attn_dim: int = 8,
        batchnorm: bool = False,
        dropout: float = 0.0,
        residual: bool = True,
        backend: str = "auto",
        *,
        conv_dropout: float = 0.0,
        conv_bias: bool = True,
        conv_padding: int = 1,
        block_bias: bool = True,
        head_bias: bool = True,
    ):
        super().__init__()
        self.features = conv_features(
            dim, batchnorm=batchnorm, dropout=conv_dropout, bias=conv_bias, padding=conv_padding
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # One fused launch forward and one backward for all the blocks (an nn.Sequential of UltimusBlocks).
        self.blocks = UltimusStack(blocks, dim, attn_dim, residual=residual, bias=block_bias, backend=backend)
        self.head = nn.Linear(dim, num_classes, bias=head_bias)

    @property
    def backend(self) -> str:
        return self.blocks.backend

    @backend.setter
    def backend(self, name: str) -> None:
        self.blocks.backend = name

    def forward(self, images: Tensor) -> Tensor:
        x = self.dropout(self.flatten(self.pool(self.features(images))))
        return self.head(self.blocks(x))
