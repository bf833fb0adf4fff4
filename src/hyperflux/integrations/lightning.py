"""`HyperfluxCallback`: prune a LightningModule while `lightning.Trainer.fit` trains it (`pip install
hyperflux-pruning[lightning]`).

The callback masks the module in `setup` (before `configure_optimizers` and the DDP wrap), moves the logits
from the host's optimisers to their own Adam in `on_fit_start`, steps that Adam in `on_before_optimizer_step`
(after AMP's unscale of the host's gradients, once per step under accumulation), closes a period every epoch
or every `every_n_steps` optimiser steps, and logs `hyperflux/density`, `/sparsity`, `/pressure` and
`/period` once per period (`pl_module.log_dict` at an epoch's end; the loggers directly at a step's). Under
the DDP strategy use `strategy="ddp_find_unused_parameters_true"`: the freeze turns the logits' gradients off,
which a plain DDP wrapper would wait for.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from hyperflux.integrations._driver import DrivenCallback


class HyperfluxCallback(DrivenCallback, pl.Callback):
    """Hyperflux for a Lightning run: `Trainer(callbacks=[HyperfluxCallback(0.9, pruning_epochs=10)])`.

    Arguments as `DrivenCallback`'s. After `fit`, `callback.hf` is the sparsifier: `callback.hf.squash()`
    bakes the masks in.
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # every stage: validate/test/predict with a ckpt_path load a checkpoint of a masked module
        self.driver.build(
            pl_module,
            another="this HyperfluxCallback masks the module it was first set up with; give another module a "
            "new HyperfluxCallback (and a new Trainer)",
        )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.driver.take_over(trainer.optimizers)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if optimizer is not trainer.optimizers[0]:
            return  # several host optimisers step once each; the masks step once per training step
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.driver.step_masks(None if scaler is None else scaler.get_scale())

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # a run resumed from a checkpoint of an epoch's last batch goes on in the next epoch without the
        # start-of-epoch hook, and without the end of the epoch whose period it closes
        for _ in range(self.driver.periods_missing(trainer.current_epoch)):
            self._close(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.driver.every_n_steps is not None and self.driver.due(trainer.global_step):
            self._close(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.driver.every_n_steps is None:
            self._close(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.driver.warn_if_unfinished("Lightning's fit")

    def state_dict(self) -> dict[str, Any]:
        """Saved by Lightning in its checkpoints, so `fit(ckpt_path=...)` resumes the schedule too."""
        return self.driver.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.driver.load_state_dict(state_dict)

    def _close(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = self.driver.close_period()
        if metrics is None:
            return
        if self.driver.every_n_steps is None:
            pl_module.log_dict(metrics)  # from an epoch-end hook: once, at the epoch
            return
        # logged from a batch hook, Lightning would log the values again at every logging step until the epoch
        # ends: to the loggers once, at the step that closed the period, and for monitors and the progress bar
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        trainer.callback_metrics.update({key: torch.tensor(value) for key, value in metrics.items()})
