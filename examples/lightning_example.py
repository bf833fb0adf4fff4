"""Prune an MLP on scikit-learn's digits to 90% sparsity inside PyTorch Lightning (CPU, seconds).

pip install hyperflux-pruning[lightning]
python examples/lightning_example.py
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hyperflux.integrations.lightning import HyperfluxCallback


class DigitsMLP(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)
        )

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, on_epoch=True, on_step=False)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def main() -> None:
    torch.set_num_threads(1)
    pl.seed_everything(0)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16
    y = torch.tensor(digits.target)
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    # 57 batches per epoch: a mask lr 10x the default lets the masks follow the pressure in so few steps
    callback = HyperfluxCallback(0.9, pruning_epochs=20, regrowth_epochs=10, mask_lr=1e-2)
    trainer = pl.Trainer(
        max_epochs=30, accelerator="cpu", callbacks=[callback], enable_checkpointing=False, logger=False
    )
    model = DigitsMLP()
    trainer.fit(model, loader)
    print(callback.hf.summary())
    callback.hf.squash()  # plain model, zeros baked in
    with torch.no_grad():
        accuracy = (model.net(x).argmax(1) == y).float().mean()
    print(f"train accuracy of the squashed model: {100 * accuracy:.2f}%")


if __name__ == "__main__":
    main()
