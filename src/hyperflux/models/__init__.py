"""The paper's models behind one registry: `build(name, num_classes, in_channels, image_size, **kwargs)`.

All are plain torch.nn modules. Each class carries `hyperflux_ignore`, regular expressions (re.fullmatch) for
tensor or module names that the sparsifier's default selection (the weight of every Linear and Conv) skips.
A name of the form `package.module:Factory` builds the user's own model instead (see `factory`).
"""

from __future__ import annotations

import importlib
import inspect
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


def factory(name: str) -> Callable[..., nn.Module]:
    """What builds model `name`: a registry entry, or for `package.module:Factory` (a class or function of an
    importable module: installed, or on PYTHONPATH) that attribute."""
    if name in REGISTRY:
        return REGISTRY[name]
    module_name, colon, attribute = name.partition(":")
    if not colon or not module_name or not attribute:
        raise ValueError(
            f"unknown model {name!r}; known: {', '.join(REGISTRY)}, or package.module:Factory for your own"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(
            f"model {name!r}: cannot import {module_name} ({error}); is it installed, or its folder on "
            "PYTHONPATH?"
        ) from None
    built = getattr(module, attribute, None)
    if not callable(built):
        raise ValueError(f"model {name!r}: {module_name} has no class or function {attribute}")
    return built


def build(
    name: str, num_classes: int = 10, in_channels: int = 3, image_size: int = 32, **kwargs
) -> nn.Module:
    """Model `name` for images of `in_channels` x `image_size` x `image_size` and `num_classes` outputs.

    `kwargs` go to the model: `hidden` (lenet300), `width` (resnet18, resnet50, vgg19), `patch_size`, `depth`,
    `drop_path_rate`, `mlp_ratio` (deit_*). A factory of one's own gets those of `num_classes`, `in_channels`
    and `image_size` it takes, and `kwargs`.
    """
    built = factory(name)
    given = {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size}
    if name not in REGISTRY:
        parameters = inspect.signature(built).parameters
        takes_all = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
        given = {k: v for k, v in given.items() if takes_all or k in parameters}
    model = built(**given, **kwargs)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {name!r} returned a {type(model).__name__} object, not a torch.nn.Module")
    return model


__all__ = ["VGG19BN", "LeNet5", "LeNet300", "ResNet", "VisionTransformer", "build", "factory", "names"]
