"""The Lightning and transformers callbacks on a tiny CPU model: masks pruned to the target, logits moved out
of the host's optimiser, density and pressure in the host trainer's logs. Skipped when the extra is missing."""

from __future__ import annotations

import csv
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

HYPERFLUX_KEYS = {"hyperflux/density", "hyperflux/sparsity", "hyperflux/pressure", "hyperflux/period"}


def toy_data(count: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(count, 16, generator=generator)
    return x, x[:, :4].argmax(1)


def mask_steps(callback) -> set[int]:
    """The step counts in the callback's mask optimiser state (one per logit tensor)."""
    return {int(state["step"]) for state in callback.driver.optimizer.state_dict()["state"].values()}


def never_stepped_by_the_host(optimizer: torch.optim.Optimizer, hf) -> bool:
    """The host optimiser keeps state for the weights it stepped and for none of the mask logits."""
    state = getattr(optimizer, "optimizer", optimizer).state
    stepped = {id(p) for p in state}
    return bool(stepped) and not stepped & {id(p) for p in hf.mask_parameters()}


def host_params(optimizer: torch.optim.Optimizer) -> set[int]:
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


def lightning_module(configure_optimizers):
    """The toy classifier as a LightningModule whose optimisers `configure_optimizers(module)` builds."""
    import lightning.pytorch as pl

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", F.cross_entropy(self.net(x), y))

        def configure_optimizers(self):
            return configure_optimizers(self)

    return Tiny()


def lightning_trainer(callbacks, **options):
    """A quiet one-CPU Lightning Trainer with these callbacks; `options` add to its arguments."""
    import lightning.pytorch as pl

    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **options,
    )


def adamw_with_steps(module):
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2, weight_decay=0.1)
    return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, 2)]


@pytest.mark.skipif(
    importlib.util.find_spec("lightning") is None, reason="lightning not installed (extra `lightning`)"
)
def test_lightning_callback_prunes_and_logs(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    from hyperflux.integrations.lightning import HyperfluxCallback

    torch.manual_seed(0)
    module = lightning_module(adamw_with_steps)
    callback = HyperfluxCallback(0.8, pruning_epochs=4, regrowth_epochs=1, mask_lr=0.05)
    trainer = lightning_trainer(
        [callback], max_epochs=5, logger=CSVLogger(tmp_path), enable_checkpointing=False, log_every_n_steps=1
    )
    loader = torch.utils.data.DataLoader(TensorDataset(*toy_data()), batch_size=16)
    trainer.fit(module, loader)

    hf = callback.hf
    assert hf.period == 5 and hf.frozen
    assert hf.sparsity() == pytest.approx(0.8, abs=1 / hf.total)
    assert not host_params(trainer.optimizers[0]) & {id(p) for p in hf.mask_parameters()}
    assert set(trainer.logged_metrics) >= HYPERFLUX_KEYS
    # a second fit with the same callback (staged training) builds new host optimisers: taken over again
    again = lightning_trainer([callback], max_epochs=1, logger=False, enable_checkpointing=False)
    again.fit(module, loader)
    assert again.optimizers[0] is not trainer.optimizers[0]
    assert not host_params(again.optimizers[0]) & {id(p) for p in hf.mask_parameters()}
    with open(trainer.logger.experiment.metrics_file_path) as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("hyperflux/density")]
    assert len(rows) == 5
    assert float(rows[0]["hyperflux/density"]) > float(rows[-1]["hyperflux/density"])
    # the masks learned before the freeze-time trim (without mask steps the density stays 1.0 until then)
    assert float(rows[2]["hyperflux/density"]) < 0.5
    assert mask_steps(callback) == {4 * len(loader)}  # one mask step per batch until the freeze


@pytest.mark.skipif(
    importlib.util.find_spec("lightning") is None, reason="lightning not installed (extra `lightning`)"
)
def test_lightning_logs_each_period_of_every_n_steps_once_at_its_step(tmp_path):
    """From a batch hook Lightning logged the values again at every logging step until the epoch ended."""
    from lightning.pytorch.loggers import CSVLogger

    from hyperflux.integrations.lightning import HyperfluxCallback

    torch.manual_seed(0)
    callback = HyperfluxCallback(0.8, pruning_epochs=4, regrowth_epochs=2, every_n_steps=5, mask_lr=0.05)
    trainer = lightning_trainer(
        [callback], max_epochs=2, logger=CSVLogger(tmp_path), enable_checkpointing=False, log_every_n_steps=1
    )
    loader = torch.utils.data.DataLoader(TensorDataset(*toy_data()), batch_size=16)  # 16 steps an epoch
    trainer.fit(lightning_module(adamw_with_steps), loader)
    with open(trainer.logger.experiment.metrics_file_path) as handle:
        rows = [
            (int(r["step"]), float(r["hyperflux/period"]))
            for r in csv.DictReader(handle)
            if r.get("hyperflux/period")
        ]
    assert rows == [(5 * k, float(k)) for k in range(1, 7)]
    assert trainer.callback_metrics["hyperflux/period"] == 6.0  # for monitors and the progress bar


@pytest.mark.skipif(
    importlib.util.find_spec("lightning") is None, reason="lightning not installed (extra `lightning`)"
)
def test_lightning_resume_from_a_checkpoint_continues_the_schedule(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from hyperflux.integrations.lightning import HyperfluxCallback

    def fit(max_epochs: int, folder, ckpt_path=None) -> HyperfluxCallback:
        torch.manual_seed(0)
        module = lightning_module(lambda m: torch.optim.Adam(m.parameters(), lr=1e-2))
        callback = HyperfluxCallback(0.8, pruning_epochs=4, regrowth_epochs=2, mask_lr=0.05)
        trainer = lightning_trainer(
            [callback, ModelCheckpoint(dirpath=folder, save_last=True)],
            max_epochs=max_epochs,
            logger=False,
            default_root_dir=folder,
        )
        loader = torch.utils.data.DataLoader(TensorDataset(*toy_data()), batch_size=16)
        trainer.fit(module, loader, ckpt_path=ckpt_path)
        return callback

    whole = fit(6, tmp_path / "whole").hf
    # a fresh module with the callback validates from the masked checkpoint, without fitting first
    fresh = HyperfluxCallback(0.8, pruning_epochs=4, regrowth_epochs=2, mask_lr=0.05)
    loader = torch.utils.data.DataLoader(TensorDataset(*toy_data()), batch_size=16)
    validator = lightning_trainer([fresh], logger=False, default_root_dir=tmp_path / "whole")
    validator.validate(lightning_module(lambda m: None), loader, ckpt_path=tmp_path / "whole" / "last.ckpt")
    for a, b in zip(fresh.hf.gates, whole.gates, strict=True):
        assert torch.equal(a.mask(), b.mask())
    with pytest.raises(ValueError, match="give another module a new HyperfluxCallback"):
        validator.validate(lightning_module(lambda m: None), loader)  # the callback masks its first module
    first = fit(3, tmp_path / "parts")
    assert first.hf.period == 3 and not first.hf.frozen
    resumed = fit(6, tmp_path / "parts", ckpt_path=tmp_path / "parts" / "last.ckpt").hf
    assert resumed.period == 6 and resumed.frozen
    assert resumed.scheduler.state_dict() == whole.scheduler.state_dict()
    for a, b in zip(resumed.gates, whole.gates, strict=True):
        assert torch.equal(a.mask(), b.mask())
        torch.testing.assert_close(a.logits, b.logits)


@pytest.mark.skipif(
    importlib.util.find_spec("lightning") is None, reason="lightning not installed (extra `lightning`)"
)
def test_lightning_resume_from_a_step_checkpoint_at_an_epochs_end_closes_that_epochs_period(tmp_path):
    """A checkpoint of an epoch's last batch is saved before the epoch's end closes its period, and the
    resumed run goes on in the next epoch: the period is closed then, before its first batch."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from hyperflux.integrations.lightning import HyperfluxCallback

    def fit(max_epochs: int, folder, ckpt_path=None) -> HyperfluxCallback:
        torch.manual_seed(0)
        module = lightning_module(lambda m: torch.optim.SGD(m.parameters(), lr=0.1))
        callback = HyperfluxCallback(0.8, pruning_epochs=4, mask_lr=0.05)
        checkpoints = ModelCheckpoint(
            dirpath=folder, save_top_k=-1, every_n_train_steps=16, filename="{step}"
        )
        trainer = lightning_trainer([callback, checkpoints], max_epochs=max_epochs, logger=False)
        loader = torch.utils.data.DataLoader(TensorDataset(*toy_data()), batch_size=16)  # 16 steps an epoch
        trainer.fit(module, loader, ckpt_path=ckpt_path)
        return callback

    whole = fit(4, tmp_path / "whole").hf
    fit(2, tmp_path / "parts")
    resumed = fit(4, tmp_path / "resumed", ckpt_path=tmp_path / "parts" / "step=32.ckpt").hf
    assert resumed.period == whole.period == 4
    assert resumed.scheduler.state_dict() == whole.scheduler.state_dict()
    for (name, a), b in zip(
        resumed.model.state_dict().items(), whole.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


class DictSet(Dataset):
    def __init__(self) -> None:
        self.x, self.y = toy_data()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[index], "labels": self.y[index]}


class TinyClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.net(x)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def training_arguments(folder, **settings):
    """A transformers run of the toy classifier on the CPU, quiet, seeded; `settings` add to or override."""
    from transformers import TrainingArguments

    common = {
        "per_device_train_batch_size": 16,
        "learning_rate": 1e-2,
        "use_cpu": True,
        "report_to": [],
        "logging_steps": 1000,
        "disable_tqdm": True,
        "seed": 0,
    }
    return TrainingArguments(output_dir=str(folder), **(common | settings))


@pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None or importlib.util.find_spec("accelerate") is None,
    reason="transformers or accelerate not installed (extra `hf`)",
)
def test_transformers_callback_prunes_and_logs(tmp_path):
    from transformers import Trainer

    from hyperflux.integrations.transformers import HyperfluxTrainerCallback

    torch.manual_seed(0)
    callback = HyperfluxTrainerCallback(
        0.8, pruning_epochs=4, regrowth_epochs=1, every_n_steps=16, mask_lr=0.05
    )
    args = training_arguments(tmp_path, num_train_epochs=5, weight_decay=0.1, save_strategy="no")
    trainer = Trainer(model=TinyClassifier(), args=args, train_dataset=DictSet(), callbacks=[callback])
    masks_before = {k: v.clone() for k, v in callback.hf.masks().items()}
    trainer.train()

    hf = callback.hf
    assert hf.period == 5 and hf.frozen
    assert hf.sparsity() == pytest.approx(0.8, abs=1 / hf.total)
    assert any(not torch.equal(masks_before[k], m) for k, m in hf.masks().items())
    assert never_stepped_by_the_host(trainer.optimizer, hf)
    logged = [entry for entry in trainer.state.log_history if "hyperflux/density" in entry]
    assert len(logged) == 5 and set(logged[0]) >= HYPERFLUX_KEYS
    assert logged[0]["hyperflux/density"] > logged[-1]["hyperflux/density"]
    assert logged[2]["hyperflux/density"] < 0.5  # the masks learned before the freeze-time trim
    assert mask_steps(callback) == {4 * 16}  # one mask step per optimiser step until the freeze


@pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None or importlib.util.find_spec("accelerate") is None,
    reason="transformers or accelerate not installed (extra `hf`)",
)
def test_transformers_logs_each_epochs_period_at_that_epochs_last_step(tmp_path):
    """With `logging_steps` dividing the epoch, the Trainer logs the epoch's last step before its epoch end:
    the period closes at that step, so the log there carries it (before, the next log did)."""
    from transformers import Trainer

    from hyperflux.integrations.transformers import HyperfluxTrainerCallback

    torch.manual_seed(0)
    callback = HyperfluxTrainerCallback(0.8, pruning_epochs=3, mask_lr=0.05)
    args = training_arguments(tmp_path, num_train_epochs=3, logging_steps=8, save_strategy="no")
    trainer = Trainer(model=TinyClassifier(), args=args, train_dataset=DictSet(), callbacks=[callback])
    trainer.train()

    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logged] == [8 * k for k in range(1, 7)]  # 16 steps an epoch
    periods = {entry["step"]: entry.get("hyperflux/period") for entry in logged}
    assert periods == {8: None, 16: 1.0, 24: None, 32: 2.0, 40: None, 48: 3.0}
    assert callback.hf.period == 3 and callback.hf.frozen
    assert callback.hf.sparsity() == pytest.approx(0.8, abs=1 / callback.hf.total)

    # an epoch that max_steps cuts short closes its period at its end, once
    cut = HyperfluxTrainerCallback(0.8, pruning_epochs=3, mask_lr=0.05)
    args = training_arguments(tmp_path / "cut", max_steps=20, logging_steps=8, save_strategy="no")
    Trainer(model=TinyClassifier(), args=args, train_dataset=DictSet(), callbacks=[cut]).train()
    assert cut.hf.period == 2


@pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None or importlib.util.find_spec("accelerate") is None,
    reason="transformers or accelerate not installed (extra `hf`)",
)
def test_transformers_resume_from_a_checkpoint_continues_the_schedule(tmp_path):
    from transformers import Trainer

    from hyperflux.integrations.transformers import STATE_FILE, HyperfluxTrainerCallback

    def train(folder, epochs: int, resume: bool = False) -> HyperfluxTrainerCallback:
        torch.manual_seed(0)
        callback = HyperfluxTrainerCallback(0.8, pruning_epochs=4, regrowth_epochs=2, mask_lr=0.05)
        args = training_arguments(
            folder,
            num_train_epochs=epochs,
            lr_scheduler_type="constant",  # the same schedule however many epochs a call asks for
            save_strategy="epoch",
        )
        trainer = Trainer(model=TinyClassifier(), args=args, train_dataset=DictSet(), callbacks=[callback])
        trainer.train(resume_from_checkpoint=resume or None)
        return callback

    whole = train(tmp_path / "whole", 6).hf
    first = train(tmp_path / "parts", 3)
    assert first.hf.period == 3 and (tmp_path / "parts" / "checkpoint-48" / STATE_FILE).is_file()
    resumed = train(tmp_path / "parts", 6, resume=True)  # the Trainer's own optimiser state loads too
    hf = resumed.hf
    assert hf.period == 6 and hf.frozen
    assert hf.scheduler.state_dict() == whole.scheduler.state_dict()
    for a, b in zip(hf.gates, whole.gates, strict=True):
        assert torch.equal(a.mask(), b.mask())
        torch.testing.assert_close(a.logits, b.logits)
    assert never_stepped_by_the_host(resumed.driver.host_optimizers[0], hf)
    # from a checkpoint outside output_dir, whose path the Trainer does not hand its callbacks
    elsewhere = str(tmp_path / "parts" / "checkpoint-48")
    torch.manual_seed(0)
    callback = HyperfluxTrainerCallback(
        0.8, pruning_epochs=4, regrowth_epochs=2, mask_lr=0.05, resume_from=elsewhere
    )
    args = training_arguments(
        tmp_path / "other", num_train_epochs=6, lr_scheduler_type="constant", save_strategy="no"
    )
    trainer = Trainer(model=TinyClassifier(), args=args, train_dataset=DictSet(), callbacks=[callback])
    trainer.train(resume_from_checkpoint=elsewhere)
    assert callback.hf.scheduler.state_dict() == whole.scheduler.state_dict()


@pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None or importlib.util.find_spec("accelerate") is None,
    reason="transformers or accelerate not installed (extra `hf`)",
)
def test_transformers_resume_from_a_step_checkpoint_at_an_epochs_end_closes_that_epochs_period(tmp_path):
    """The Trainer saves a step checkpoint before the epoch's end closes its period, then skips that end
    when it resumes: the next epoch's start closes it."""
    from transformers import Trainer

    from hyperflux.integrations.transformers import HyperfluxTrainerCallback

    def train(folder, epochs: int, resume=None) -> HyperfluxTrainerCallback:
        torch.manual_seed(0)
        callback = HyperfluxTrainerCallback(0.8, pruning_epochs=4, mask_lr=0.05)
        args = training_arguments(
            folder,
            num_train_epochs=epochs,
            lr_scheduler_type="constant",
            save_strategy="steps",
            save_steps=16,
            max_grad_norm=0,
        )
        trainer = Trainer(model=TinyClassifier(), args=args, train_dataset=DictSet(), callbacks=[callback])
        trainer.train(resume_from_checkpoint=resume)
        return callback

    whole = train(tmp_path / "whole", 4).hf
    train(tmp_path / "parts", 2)
    resumed = train(tmp_path / "parts", 4, resume=True).hf  # from checkpoint-32, the latest
    assert resumed.period == whole.period == 4
    assert resumed.scheduler.state_dict() == whole.scheduler.state_dict()
    for (name, a), b in zip(
        resumed.model.state_dict().items(), whole.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


@pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None or importlib.util.find_spec("accelerate") is None,
    reason="transformers or accelerate not installed (extra `hf`)",
)
def test_transformers_resume_from_a_best_model_checkpoint(tmp_path):
    # save_strategy="best" decides to save after the step's callbacks ran: the saved optimiser state must load
    from transformers import Trainer

    from hyperflux.integrations.transformers import HyperfluxTrainerCallback

    def train(epochs: int, resume: bool = False) -> HyperfluxTrainerCallback:
        torch.manual_seed(0)
        callback = HyperfluxTrainerCallback(0.8, pruning_epochs=2, regrowth_epochs=1, mask_lr=0.05)
        args = training_arguments(
            tmp_path,
            num_train_epochs=epochs,
            eval_strategy="epoch",
            save_strategy="best",
            metric_for_best_model="loss",
        )
        data = DictSet()
        trainer = Trainer(
            model=TinyClassifier(), args=args, train_dataset=data, eval_dataset=data, callbacks=[callback]
        )
        trainer.train(resume_from_checkpoint=resume or None)
        return callback

    train(2)
    assert train(3, resume=True).hf.period == 3


@pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None or importlib.util.find_spec("accelerate") is None,
    reason="transformers or accelerate not installed (extra `hf`)",
)
def test_transformers_refuses_a_model_init_and_warns_of_loading_the_best_model(tmp_path):
    from transformers import Trainer

    from hyperflux.integrations.transformers import HyperfluxTrainerCallback

    callback = HyperfluxTrainerCallback(0.8, pruning_epochs=1)
    args = training_arguments(tmp_path, num_train_epochs=1, save_strategy="no")
    trainer = Trainer(model_init=TinyClassifier, args=args, train_dataset=DictSet(), callbacks=[callback])
    with pytest.raises(ValueError, match="model_init builds a new one in train"):
        trainer.train()
    callback = HyperfluxTrainerCallback(0.8, pruning_epochs=1)
    best = training_arguments(
        tmp_path,
        num_train_epochs=1,
        eval_strategy="epoch",
        save_strategy="epoch",
        load_best_model_at_end=True,
    )
    data = DictSet()
    trainer = Trainer(
        model=TinyClassifier(), args=best, train_dataset=data, eval_dataset=data, callbacks=[callback]
    )
    with pytest.warns(
        UserWarning, match="load_best_model_at_end=True: the Trainer ends on its best checkpoint"
    ):
        trainer.train()


def test_only_a_restored_schedule_catches_up_with_the_hosts_epochs():
    """A schedule that started over (its host resumed from a checkpoint without it) counts from where it
    started; one restored from the host's checkpoint closes the epochs the host finished after saving it."""
    from hyperflux.integrations._driver import MaskDriver

    def driver() -> MaskDriver:
        made = MaskDriver(0.8, 4, 0, None, (0.9, 0.999), {})
        made.build(nn.Linear(8, 8))
        made.take_over([])
        return made

    fresh = driver()
    assert fresh.periods_missing(3) == 0
    restored = driver()
    restored.load_state_dict(fresh.state_dict())
    assert restored.periods_missing(3) == 3 and restored.periods_missing(9) == 4


def test_a_mask_step_with_gradients_that_are_not_finite_is_skipped():
    """An overflowed fp16 step leaves infinite gradients, which the host's scaler skips; the masks' Adam
    stepped on them turned every logit it reached NaN."""
    from hyperflux.integrations._driver import MaskDriver

    made = MaskDriver(0.8, 4, 0, None, (0.9, 0.999), {})
    made.build(nn.Sequential(nn.Linear(400, 400), nn.Linear(400, 2)))
    made.take_over([])
    logits = list(made.hf.mask_parameters())
    before = [m.detach().clone() for m in logits]
    logits[0].grad = torch.zeros_like(logits[0])
    logits[1].grad = torch.full_like(logits[1], float("inf"))
    made.step_masks(check_finite=True)
    assert all(torch.equal(m, b) for m, b in zip(logits, before, strict=True))
    assert all(m.grad is None for m in logits) and not made.optimizer.state
    for m in logits:  # logits cast to float16 (Lightning's "16-true"): the L2 norm of 160,000 300s overflows
        m.data = m.data.half()
        m.grad = torch.full_like(m, 300.0)
    made.step_masks(check_finite=True)
    assert all(
        (m.float() < b).all() for m, b in zip(logits, before, strict=True)
    )  # every value finite: stepped


@pytest.mark.skipif(
    importlib.util.find_spec("lightning") is None, reason="lightning not installed (extra `lightning`)"
)
def test_lightning_warns_when_fit_ends_before_the_masks_froze():
    from hyperflux.integrations.lightning import HyperfluxCallback

    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(TensorDataset(*toy_data(64)), batch_size=16)
    callback = HyperfluxCallback(0.8, pruning_epochs=3, regrowth_epochs=1, mask_lr=0.05)
    trainer = lightning_trainer([callback], max_epochs=2, logger=False, enable_checkpointing=False)
    with pytest.warns(UserWarning, match=r"Lightning's fit ended after 2 of the 3 periods .* not frozen"):
        trainer.fit(lightning_module(adamw_with_steps), loader)


@pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None or importlib.util.find_spec("accelerate") is None,
    reason="transformers or accelerate not installed (extra `hf`)",
)
def test_transformers_warns_of_a_short_run_and_closes_each_epoch_once_with_the_callback_twice(tmp_path):
    from transformers import Trainer

    from hyperflux.integrations.transformers import HyperfluxTrainerCallback

    torch.manual_seed(0)
    callback = HyperfluxTrainerCallback(0.8, pruning_epochs=3, regrowth_epochs=1, mask_lr=0.05)
    args = training_arguments(tmp_path, num_train_epochs=2, save_strategy="no", max_grad_norm=0)
    trainer = Trainer(
        model=TinyClassifier(), args=args, train_dataset=DictSet(), callbacks=[callback, callback]
    )
    with pytest.warns(UserWarning, match=r"the Trainer's training ended after 2 of the 3 periods"):
        trainer.train()
    assert callback.hf.period == 2  # one period per epoch, however many times the Trainer holds it
