"""`HyperfluxTrainerCallback`: prune a model while a Hugging Face `transformers.Trainer` trains it (`pip install
hyperflux-pruning[hf]`).

The callback masks the model in `on_init_end` (the end of `Trainer.__init__`: before the optimiser exists and
before accelerate wraps the model, so DDP all-reduces the logits too), gives the logits their own Adam in
`on_train_begin` and steps it in `on_pre_optimizer_step` (once per real step under gradient accumulation; the
host's step then finds no gradient on the logits and leaves them alone), closes a period every epoch or every
`every_n_steps` steps, and adds `hyperflux/density`, `/sparsity`, `/pressure` and `/period` to the Trainer's
logs (a log is requested at each period's end). transformers clips the logits' gradients with the weights' when
`max_grad_norm` > 0 (its default is 1.0), which the callback warns about. Each checkpoint folder gets
`hyperflux.pt` (schedule, mask optimiser, period clock), read back when the Trainer resumes from a checkpoint
under `output_dir`. fp16 with a loss scaler is not supported (the scaler is out of a callback's reach); bf16 is.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from hyperflux.integrations._driver import DrivenCallback

STATE_FILE = "hyperflux.pt"  # the callback's state, beside the Trainer's in each checkpoint folder
ANOTHER_MODEL = (
    "the Trainer trains another model than the one HyperfluxTrainerCallback masked when the Trainer was built "
    "(model_init builds a new one in train()); give the Trainer model= instead"
)


class HyperfluxTrainerCallback(DrivenCallback, TrainerCallback):
    """Hyperflux for a transformers run: `Trainer(..., callbacks=[HyperfluxTrainerCallback(0.9, 10)])`.

    Pass it to the Trainer's constructor, not `add_callback` afterwards: the masks must exist before the
    model is wrapped for distributed training. Arguments as `DrivenCallback`'s; `resume_from` is the checkpoint
    folder a `train(resume_from_checkpoint=PATH)` outside `output_dir` resumes from, whose path the Trainer
    does not hand its callbacks.
    """

    def __init__(self, *args: Any, resume_from: str | Path | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.resume_from = None if resume_from is None else Path(resume_from)
        self.pending: dict[str, float] = {}
        self.closed_at: int | None = None  # the optimiser step at which an epoch's period last closed

    def on_init_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        self.driver.build(model, ANOTHER_MODEL)

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        **kwargs: Any,
    ) -> None:
        if args.load_best_model_at_end:
            warnings.warn(
                "load_best_model_at_end=True: the Trainer ends on its best checkpoint, which may be from "
                "before the masks reached the target sparsity; check callback.hf's sparsity, or leave it off",
                stacklevel=2,
            )
        # a no-op unless the callback was added after the Trainer was built
        self.driver.build(model, ANOTHER_MODEL)
        if state.global_step > 0:  # resumed: the checkpoint the Trainer restored holds the schedule
            self._load(args, state)
        # the logits stay in the host optimiser's groups, so that the optimiser state a checkpoint saves always
        # loads into the optimiser a resumed Trainer builds (from every parameter, logits included)
        self.driver.take_over([optimizer], hide=False)
        if args.fp16:
            warnings.warn(
                "fp16=True: the mask logits' step is out of the loss scaler's reach: an overflowed step is "
                "skipped for them too, but where their gradients reach it still scaled, the flux outweighs the "
                "pressure by the loss scale; use bf16=True",
                stacklevel=2,
            )
        if args.max_grad_norm and args.max_grad_norm > 0:
            warnings.warn(
                f"max_grad_norm={args.max_grad_norm}: transformers clips the mask logits' gradients (the flux) "
                "together with the weights', but not the pressure; set max_grad_norm=0 to keep their balance "
                "exact while clipping is active",
                stacklevel=2,
            )

    def on_epoch_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        for _ in range(self.driver.periods_missing(int(state.epoch + 1e-6))):
            self._close(control)

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # leaves the logits' gradients None: the host's step then skips them
        self.driver.step_masks(check_finite=args.fp16)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.driver.every_n_steps is not None:
            if self.driver.due(state.global_step):
                self._close(control)
        elif float(state.epoch).is_integer() and self.closed_at != state.global_step:
            # the epoch's last step (the Trainer sets epoch + batches done / batches in it): the period closes
            # here, not at the epoch's end, so that a log or checkpoint the Trainer makes at this step has it;
            # once, should the Trainer hold this callback twice
            self._close(control)
            self.closed_at = state.global_step

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.driver.every_n_steps is None and self.closed_at != state.global_step:  # an epoch cut short
            self._close(control)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if state.is_world_process_zero:
            self.driver.warn_if_unfinished("the Trainer's training")

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if state.is_world_process_zero:
            torch.save(self.driver.state_dict(), self._checkpoint(args, state) / STATE_FILE)

    def _checkpoint(self, args: TrainingArguments, state: TrainerState) -> Path:
        return Path(args.output_dir) / f"checkpoint-{state.global_step}"

    def _load(self, args: TrainingArguments, state: TrainerState) -> None:
        folders = [self._checkpoint(args, state)]
        if isinstance(args.resume_from_checkpoint, str):
            folders.insert(0, Path(args.resume_from_checkpoint))
        if self.resume_from is not None:
            folders.insert(0, self.resume_from)
        found = next((folder / STATE_FILE for folder in folders if (folder / STATE_FILE).is_file()), None)
        if found is None:
            warnings.warn(
                f"resuming at step {state.global_step} without {STATE_FILE} (looked in "
                f"{', '.join(map(str, folders))}): the hyperflux schedule starts over; for a checkpoint outside "
                "output_dir, pass its folder as HyperfluxTrainerCallback(..., resume_from=...)",
                stacklevel=2,
            )
            return
        self.driver.load_state_dict(torch.load(found, weights_only=False))

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if logs is None or not self.pending:
            return
        logs.update(self.pending)
        # the Trainer copied `logs` into its history before calling back: keep the history complete too
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(self.pending)
        self.pending = {}

    def _close(self, control: TrainerControl) -> None:
        metrics = self.driver.close_period()
        if metrics is not None:
            self.pending = metrics
            control.should_log = True
