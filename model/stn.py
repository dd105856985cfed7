"""A Spatial Transformer Network in front of a small CNN, after PyTorch's STN tutorial
(https://pytorch.org/tutorials/intermediate/spatial_transformer_tutorial.html), sized for CIFAR-10.

The tutorial's layers, with 3 input channels and the sizes that 32 x 32 images give:
  localisation: conv 3->8 (7x7) -> maxpool 2 -> ReLU -> conv 8->10 (5x5) -> maxpool 2 -> ReLU  (10 x 4 x 4)
  regressor:    Linear(160, 32) -> ReLU -> Linear(32, 6), initialised to the identity transform
  transform:    theta (2 x 3) -> F.affine_grid -> F.grid_sample (bilinear, zero padding)
  classifier:   conv 3->10 (5x5) -> maxpool 2 -> ReLU -> conv 10->20 (5x5) -> Dropout2d -> maxpool 2 -> ReLU
                -> Linear(500, 50) -> ReLU -> dropout -> Linear(50, 10)
The tutorial ends in log_softmax for nll_loss; this returns the logits, for cross_entropy: the same loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class STNet(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.localization = nn.Sequential(
            nn.Conv2d(3, 8, kernel_size=7),
            nn.MaxPool2d(2, stride=2),
            nn.ReLU(True),
            nn.Conv2d(8, 10, kernel_size=5),
            nn.MaxPool2d(2, stride=2),
            nn.ReLU(True),
        )
        self.fc_loc = nn.Sequential(nn.Linear(10 * 4 * 4, 32), nn.ReLU(True), nn.Linear(32, 3 * 2))
        # The regressor starts at the identity transform: the network first sees the images unchanged.
        with torch.no_grad():
            self.fc_loc[2].weight.zero_()
            self.fc_loc[2].bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]))
        self.conv1 = nn.Conv2d(3, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.conv2_drop = nn.Dropout2d()
        self.fc1 = nn.Linear(20 * 5 * 5, 50)
        self.fc_drop = nn.Dropout()
        self.fc2 = nn.Linear(50, num_classes)

    def theta(self, images: Tensor) -> Tensor:
        """The affine transform (B, 2, 3) the localisation network regresses for each image."""
        return self.fc_loc(self.localization(images).flatten(1)).view(-1, 2, 3)

    def transform(self, images: Tensor) -> Tensor:
        """The images as the classifier sees them: resampled through their regressed affine transform."""
        grid = F.affine_grid(self.theta(images), list(images.shape), align_corners=False)
        return F.grid_sample(images, grid, align_corners=False)

    def forward(self, images: Tensor) -> Tensor:
        x = self.transform(images)
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2))
        x = self.fc_drop(F.relu(self.fc1(x.flatten(1))))
        return self.fc2(x)
