"""The paper's models behind one registry: `build(name, num_classes, in_channels, image_size, **kwargs)`.

All are plain torch.nn modules. Each class carries `hyperflux_ignore`, regular expressions (re.fullmatch) for
tensor or module names that the sparsifier's default selection (the weight of every Linear and Conv) skips.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from hyperflux.models.lenet import LeNet5, LeNet300
from hyperflux.models.resnet import ResNet, resnet18, resnet50
from hyperflux.models.vgg import VGG19BN
from hyperflux.models.vit import VisionTransformer, deit_small, deit_tiny

REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "lenet300": LeNet300,
    "lenet5": LeNet5,
    "resnet18": resnet18,
    "resnet50": resnet50,
    "vgg19": VGG19BN,
    "deit_tiny": deit_tiny,
    "deit_small": deit_small,
}


def names() -> list[str]:
    """Every name `build` accepts."""
    return list(REGISTRY)


def build(
    name: str, num_classes: int = 10, in_channels: int = 3, image_size: int = 32, **kwargs
) -> nn.Module:
    """Model `name` for images of `in_channels` x `image_size` x `image_size` and `num_classes` outputs.

    `kwargs` go to the model: `hidden` (lenet300), `width` (resnet18, resnet50, vgg19), `patch_size`, `depth`,
    `drop_path_rate`, `mlp_ratio` (deit_*).
    """
    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(REGISTRY)}")
    return REGISTRY[name](num_classes=num_classes, in_channels=in_channels, image_size=image_size, **kwargs)


__all__ = ["VGG19BN", "LeNet5", "LeNet300", "ResNet", "VisionTransformer", "build", "names"]
