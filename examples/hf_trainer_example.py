"""Prune an MLP on scikit-learn's digits to 90% sparsity inside a Hugging Face `Trainer` (CPU, seconds).

pip install hyperflux-pruning[hf]
python examples/hf_trainer_example.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

from hyperflux.integrations.transformers import HyperfluxTrainerCallback


class Digits(Dataset):
    def __init__(self) -> None:
        digits = load_digits()
        self.x = torch.tensor(digits.data, dtype=torch.float32) / 16
        self.y = torch.tensor(digits.target)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[index], "labels": self.y[index]}


class DigitsMLP(nn.Module):
    """The Trainer calls `model(**batch)` and reads `loss` from the output."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)
        )

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.net(x)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def main() -> None:
    torch.set_num_threads(1)
    data = Digits()
    callback = HyperfluxTrainerCallback(0.9, pruning_epochs=20, regrowth_epochs=10, mask_lr=1e-2)
    args = TrainingArguments(
        output_dir="runs/hf-example",
        num_train_epochs=30,
        per_device_train_batch_size=32,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        max_grad_norm=0.0,  # clipping would scale the mask logits' flux but not the pressure (README)
        logging_strategy="epoch",
        disable_tqdm=True,
    )
    model = DigitsMLP()
    Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()
    print(callback.hf.summary())
    callback.hf.squash()
    with torch.no_grad():
        accuracy = (model.net(data.x).argmax(1) == data.y).float().mean()
    print(f"train accuracy of the squashed model: {100 * accuracy:.2f}%")


if __name__ == "__main__":
    main()
