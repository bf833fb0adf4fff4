"""VGG-19-BN for CIFAR: 16 3x3 convs with BatchNorm, four max-pools, global average pool, one linear layer."""

from __future__ import annotations

import torch
from torch import nn

VGG19_STAGES = ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512))


class VGG19BN(nn.Module):
    """The network-slimming CIFAR VGG-19 (20.0M parameters for 10 classes); `width` scales every conv."""

    hyperflux_ignore: tuple[str, ...] = ()

    def __init__(
        self, num_classes: int = 10, in_channels: int = 3, image_size: int = 32, width: float = 1.0
    ) -> None:
        super().__init__()
        if image_size < 16:  # four 2x2 max-pools
            raise ValueError(f"VGG-19 needs images of at least 16x16, got {image_size}")
        layers: list[nn.Module] = []
        channels = in_channels
        for stage, widths in enumerate(VGG19_STAGES):
            if stage > 0:
                layers.append(nn.MaxPool2d(2))
            for base in widths:
                planes = max(1, round(base * width))
                layers += [
                    nn.Conv2d(channels, planes, 3, padding=1, bias=False),
                    nn.BatchNorm2d(planes),
                    nn.ReLU(),
                ]
                channels = planes
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))
