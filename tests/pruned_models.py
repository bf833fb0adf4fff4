"""Small models and data the tests share: randomly pruned models (export, inference, ONNX), a layer used twice,
attention over a context, scikit-learn's digits split in two, and a probe of the CPU's denormal flag."""

import torch
from sklearn.datasets import load_digits
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


class Attending(nn.Module):
    """Self-attention with its input projections packed, or one per input when the key's size differs."""

    def __init__(self, kdim: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(8, 2, kdim=kdim, vdim=kdim, batch_first=True)
        self.context = nn.Linear(8, kdim or 8)

    def forward(self, x):
        context = self.context(x)
        return self.attn(x, context, context)[0]


def digits_split(
    device: str = "cpu",
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """scikit-learn's 8x8 digits, shuffled with a fixed seed: 1,400 training and 397 test samples."""
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16
    y = torch.tensor(data.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[order].to(device), y[order].to(device)
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])


def denormals_survive() -> bool:
    """Whether a product of denormals keeps them, computed large enough that every intra-op thread takes part
    (torch.set_flush_denormal would have set the calling thread only)."""
    tiny = torch.full((1 << 20,), 1e-39)  # below float32's smallest normal, 1.18e-38
    return bool((tiny * 1.0).count_nonzero() == tiny.numel())
