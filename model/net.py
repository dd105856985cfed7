"""UltimusNet: the small CIFAR-10 "Ultimus transformer".

image (3, 32, 32) -> conv 3->16->32->48 (3x3, pad 1, ReLU) -> global average pool -> X (B, 48)
-> `blocks` UltimusBlocks (48 -> 8 -> 48) -> Linear(48, num_classes) -> logits
"""

from __future__ import annotations

from torch import Tensor, nn

from ultimus_kernels import UltimusBlock

CONV_CHANNELS = (16, 32)  # the last conv goes to `dim`


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
    ):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c_out in (*CONV_CHANNELS, dim):
            layers.append(nn.Conv2d(c_in, c_out, kernel_size=3, padding=1))
            if batchnorm:
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(nn.ReLU(inplace=True))
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.blocks = nn.Sequential(
            *(UltimusBlock(dim, attn_dim, residual=residual, backend=backend) for _ in range(blocks))
        )
        self.head = nn.Linear(dim, num_classes)

    @property
    def backend(self) -> str:
        return self.blocks[0].backend if len(self.blocks) else "reference"

    @backend.setter
    def backend(self, name: str) -> None:
        for block in self.blocks:
            block.backend = name

    def forward(self, images: Tensor) -> Tensor:
        x = self.dropout(self.flatten(self.pool(self.features(images))))
        return self.head(self.blocks(x))
