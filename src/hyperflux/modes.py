"""Running a model for inference without changing the train/eval flag of any of its modules."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """`model.eval()` for the block, then each module's own flag back: `model.train(flag)` would give every
    module the top's flag, and wake a BatchNorm that its user had frozen with `.eval()`."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training
