"""The model registry: known parameter counts, forward shapes, and the tensors the default selection takes."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from hyperflux import models
from hyperflux.selection import select_targets


def default_selection(model: nn.Module) -> list[str]:
    """The tensors the library masks by default (Linear / Conv weights minus the model's `hyperflux_ignore`)."""
    return [target.name for target in select_targets(model)]


def count(model: nn.Module, suffix: str = "") -> int:
    return sum(parameter.numel() for name, parameter in model.named_parameters() if name.endswith(suffix))


def test_names_lists_every_model_of_the_paper() -> None:
    assert models.names() == [
        "lenet300",
        "lenet5",
        "resnet18",
        "resnet50",
        "vgg19",
        "deit_tiny",
        "deit_small",
    ]


def test_unknown_model_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'resnet34'.*lenet300"):
        models.build("resnet34")


def test_lenet300_has_the_known_weights_and_biases() -> None:
    model = models.build("lenet300", num_classes=10, in_channels=1, image_size=28)
    assert count(model, "weight") == 266_200
    assert count(model, "bias") == 410


def test_lenet5_is_the_caffe_variant() -> None:
    model = models.build("lenet5", num_classes=10, in_channels=1, image_size=28)
    assert count(model, "weight") == 430_500
    assert count(model) == 431_080


@pytest.mark.parametrize(
    ("name", "total"),
    [("resnet18", 11_173_962), ("resnet50", 23_520_842), ("vgg19", 20_035_018)],
)
def test_cifar_models_have_the_known_parameter_counts(name: str, total: int) -> None:
    model = models.build(name, num_classes=10, in_channels=3, image_size=32)
    assert count(model) == total


@pytest.mark.parametrize(("name", "total"), [("deit_tiny", 5_717_416), ("deit_small", 22_050_664)])
def test_deit_at_imagenet_size_matches_the_published_count(name: str, total: int) -> None:
    model = models.build(name, num_classes=1000, in_channels=3, image_size=224)
    assert count(model) == total


def test_width_multiplier_shrinks_resnet_and_vgg() -> None:
    narrow = models.build("resnet18", 10, 3, 32, width=0.25)
    assert narrow.conv1.out_channels == 16
    assert narrow.fc.in_features == 128
    assert count(narrow) < count(models.build("resnet18", 10, 3, 32)) / 10
    assert models.build("vgg19", 10, 3, 32, width=0.5).classifier.in_features == 256


FORWARD_CASES = [
    ("lenet300", 10, 1, 28, {}),
    ("lenet300", 10, 1, 8, {}),
    ("lenet5", 10, 1, 28, {}),
    ("lenet5", 10, 3, 32, {}),
    ("resnet18", 10, 1, 28, {"width": 0.25}),
    ("resnet50", 100, 3, 32, {"width": 0.25}),
    ("vgg19", 10, 3, 32, {"width": 0.25}),
    ("deit_tiny", 100, 3, 32, {"patch_size": 4}),
    ("deit_small", 10, 3, 16, {"patch_size": 4, "depth": 2}),
]


@pytest.mark.parametrize(("name", "num_classes", "channels", "size", "kwargs"), FORWARD_CASES)
def test_forward_and_backward_on_the_input_shape(
    name: str, num_classes: int, channels: int, size: int, kwargs: dict
) -> None:
    torch.manual_seed(0)
    model = models.build(name, num_classes, channels, size, **kwargs)
    logits = model(torch.randn(3, channels, size, size))
    assert logits.shape == (3, num_classes)
    assert torch.isfinite(logits).all()
    logits.sum().backward()
    assert all(parameter.grad is not None for parameter in model.parameters())


def test_lenet300_selection_is_its_three_layers() -> None:
    assert default_selection(models.build("lenet300", 10, 1, 28)) == [
        "fc1.weight",
        "fc2.weight",
        "fc3.weight",
    ]


def test_lenet5_selection_is_its_two_convs_and_two_linears() -> None:
    selected = default_selection(models.build("lenet5", 10, 1, 28))
    assert selected == ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"]


@pytest.mark.parametrize(("name", "convs"), [("resnet18", 20), ("resnet50", 53), ("vgg19", 16)])
def test_cnn_selection_is_every_conv_and_the_classifier(name: str, convs: int) -> None:
    model = models.build(name, 10, 3, 32, width=0.25)
    assert model.hyperflux_ignore == ()
    selected = default_selection(model)
    assert len(selected) == convs + 1
    assert sum(isinstance(module, nn.Conv2d) for module in model.modules()) == convs
    assert selected[-1] in ("fc.weight", "classifier.weight")


def test_resnet_shortcut_convs_are_selected() -> None:
    selected = default_selection(models.build("resnet50", 10, 3, 32, width=0.25))
    assert "layer2.0.shortcut.0.weight" in selected
    assert "layer1.0.shortcut.0.weight" in selected  # 64 -> 256 channels needs a projection


def test_deit_selection_is_the_block_linears_without_patch_embedding_and_head() -> None:
    model = models.build("deit_tiny", 10, 3, 32, patch_size=4)
    expected = [
        f"blocks.{block}.{layer}.weight"
        for block in range(12)
        for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    ]
    assert default_selection(model) == expected
    assert isinstance(model.patch_embed.proj, nn.Conv2d)
    for name in ("patch_embed.proj.weight", "patch_embed.proj", "head", "head.weight"):
        assert any(re.fullmatch(pattern, name) for pattern in model.hyperflux_ignore)
    assert not any(re.fullmatch(pattern, "blocks.0.mlp.fc1.weight") for pattern in model.hyperflux_ignore)


def test_deit_attention_and_mlp_are_separate_linears() -> None:
    block = models.build("deit_small", 10, 3, 32, patch_size=4, depth=1).blocks[0]
    assert (block.attn.qkv.in_features, block.attn.qkv.out_features) == (384, 1152)
    assert (block.attn.proj.in_features, block.attn.proj.out_features) == (384, 384)
    assert (block.mlp.fc1.out_features, block.mlp.fc2.in_features) == (1536, 1536)
    assert block.attn.num_heads == 6


def test_drop_path_is_random_in_training_only() -> None:
    torch.manual_seed(0)
    model = models.build("deit_tiny", 10, 3, 16, patch_size=4, depth=4, drop_path_rate=0.5)
    images = torch.randn(8, 3, 16, 16)
    model.train()
    assert not torch.equal(model(images), model(images))
    model.eval()
    assert torch.equal(model(images), model(images))


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("lenet300", {"hidden": (128, 64, 32)}, "hidden takes two widths, got [128, 64, 32]"),
        ("lenet300", {"hidden": (128,)}, "hidden takes two widths, got [128]"),
        ("lenet5", {"image_size": 15}, "LeNet-5 needs images of at least 16x16, got 15"),
        ("vgg19", {"image_size": 8}, "VGG-19 needs images of at least 16x16, got 8"),
    ],
)
def test_a_model_its_arguments_cannot_build_says_why(name: str, options: dict, message: str) -> None:
    arguments = {"num_classes": 10, "in_channels": 3, "image_size": 32} | options
    with pytest.raises(ValueError, match=re.escape(message)):
        models.build(name, **arguments)
    fixed = {"image_size": 16} if "image_size" in options else {"hidden": (8, 4)}
    models.build(name, **(arguments | fixed))  # and the smallest valid form builds


def test_patch_size_must_divide_the_image() -> None:
    with pytest.raises(ValueError, match="multiple of patch size"):
        models.build("deit_tiny", 10, 3, 30, patch_size=4)
