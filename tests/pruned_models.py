"""Randomly pruned models for the export, inference and ONNX tests."""

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
