"""LeNet-300-100 and LeNet-5 (the Caffe variant used by the pruning literature), for any channels and size."""

from __future__ import annotations

import torch
from torch import nn


class LeNet300(nn.Module):
    """LeNet-300-100: the flattened image through two ReLU hidden layers; 266,200 weights on 28x28x1."""

    hyperflux_ignore: tuple[str, ...] = ()

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        hidden: tuple[int, int] = (300, 100),
    ) -> None:
        super().__init__()
        if len(hidden) != 2:
            raise ValueError(
                f"LeNet-300-100 has two hidden layers: hidden takes two widths, got {list(hidden)}"
            )
        self.fc1 = nn.Linear(in_channels * image_size * image_size, hidden[0])
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.fc3 = nn.Linear(hidden[1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc3(torch.relu(self.fc2(x)))


class LeNet5(nn.Module):
    """LeNet-5-Caffe: conv 20@5x5, pool, conv 50@5x5, pool, 500 hidden units (430,500 weights on 28x28x1)."""

    hyperflux_ignore: tuple[str, ...] = ()

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 20, kernel_size=5)
        self.conv2 = nn.Conv2d(20, 50, kernel_size=5)
        if image_size < 16:  # two 5x5 convs and two 2x2 pools leave no pixel below 16
            raise ValueError(f"LeNet-5 needs images of at least 16x16, got {image_size}")
        side = ((image_size - 4) // 2 - 4) // 2
        self.fc1 = nn.Linear(50 * side * side, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))
