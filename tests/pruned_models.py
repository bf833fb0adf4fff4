"""Small models the tests share: randomly pruned ones (export, inference, ONNX) and a layer used twice."""

import torch
from torch import nn


@torch.no_grad()
def random_prune(model: nn.Module, sparsity: float, seed: int = 0) -> nn.Module:
    """Zero a `sparsity` fraction of every Linear and Conv2d weight, seeded; the model in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Conv2d):
            module.weight.mul_(torch.rand(module.weight.shape, generator=generator) >= sparsity)
    return model.eval()


class LinearTwice(nn.Module):
    """One bias-free Linear applied twice per forward: a weight with two uses in one graph."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.fc = nn.Linear(features, features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.fc(x))
