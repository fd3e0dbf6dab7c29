"""The training loop: transformers' Trainer with peftlab's loss, step hook and checkpoints.

    make_trainer(run, kind, adapted, tokenizer, train_set, val_set, run_dir, main_process)

The Trainer runs batches, gradient accumulation and clipping, the learning-rate schedule,
progress bars, logging and evaluation, and several processes under torchrun/accelerate.
peftlab's part of each step:

  - the optimizer is built from the adaptation's parameter groups
  - the loss is the configured one over labelled positions, plus the adaptation's regulariser
  - the adaptation's `after_step` runs after every optimizer step (StepHook)
  - a two-pass optimizer (SAM) gets its second forward and backward at the perturbed weights
  - a NaN/inf loss, or a logged loss over train.max_loss_ratio times the first, stops the run
    naming the step and the last good checkpoint (TrainingDiverged)
  - checkpoints are peftlab's own (safetensors + JSON, atomic; see checkpoint.py) and carry the
    logging window, so a resumed run logs the losses the uninterrupted one would have

This module imports transformers' Trainer (seconds): trainer.py imports it only when a run starts.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import pathlib
import time
from typing import Any

import torch
from accelerate.optimizer import AcceleratedOptimizer
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ExportableState

from . import checkpoint, data, rundir
from .adaptation import Adaptation
from .config import RunConfig, Schedule, Train, loss_function, optimizer_class
from .metrics import classification_metrics
from ..errors import PeftlabError
from ..optim import SAM, OptimizerConfig


class TrainingDiverged(PeftlabError):
    """The loss became NaN or infinite, or grew past train.max_loss_ratio times its first logged value."""


class StepHook(TrainerCallback):
    """The adaptation's after_step after every optimizer step: rank allocation, layer sampling, ...

    It runs in on_optimizer_step, before the Trainer's zero_grad (on_step_end comes after it),
    because sensitivity-based methods (AdaLoRA) read this step's gradients. The step passed is
    the number of optimizer steps done, this one included (what on_step_end would see).
    """

    def __init__(self, after_step):
        self.after_step = after_step

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.after_step(state.global_step + 1, optimizer)


class MetricsFile(TrainerCallback):
    """Each log line (train loss, lr, evaluation metrics) as one JSON object."""

    def __init__(self, path: pathlib.Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            record = {"step": state.global_step, "epoch": state.epoch, **logs, "time": time.time()}
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


class AfterSave(TrainerCallback):
    """Calls `saved()` once each checkpoint is complete (trainer.py: the first one ends the window in
    which a failed start is undone, rundir.Claim.keep)."""

    def __init__(self, saved):
        self.saved = saved

    def on_save(self, args, state, control, **kwargs):
        self.saved()


class RestoreLoggingWindow(TrainerCallback):
    """Puts a resumed run's logging window back: on_train_begin is the first moment after the
    Trainer has reset it (see PeftlabTrainer.logging_window)."""

    def __init__(self, trainer: PeftlabTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.restore_logging_window()


class PeftlabTrainer(Trainer):
    """The Trainer with the regulariser in the loss, the divergence stops, and peftlab's checkpoint files."""

    def __init__(self, *args, regularization, keep_checkpoints: int, max_loss_ratio: float | None = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.regularization = regularization
        self.keep_checkpoints = keep_checkpoints
        self.max_loss_ratio = max_loss_ratio or None  # None or 0: the growth check is off
        self.first_logged_loss: float | None = None
        self.resumed_window: dict[str, Any] | None = None  # read with the checkpoint, restored at on_train_begin
        self.loss_total_from_step: int | None = None  # the step _total_loss_scalar counts from, once restored
        self.add_callback(RestoreLoggingWindow(self))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = self._model_and_task_loss(model, inputs, return_outputs, num_items_in_batch)
        if not model.training:
            return result
        loss = result[0] if return_outputs else result
        extra = self.regularization()
        if extra is not None:  # once per optimizer step, spread over the accumulated batches
            loss = loss + extra / self.current_gradient_accumulation_steps
        self._stop_if_not_finite(loss)
        return (loss, result[1]) if return_outputs else loss

    def _model_and_task_loss(self, model, inputs, return_outputs, num_items_in_batch):
        """The Trainer's forward and task loss; the batch's example ids (training batches carry them)
        go to the loss only, as the model takes no such input."""
        if data.EXAMPLE_IDS not in inputs:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        inputs = dict(inputs)
        plain_loss = self.compute_loss_func
        self.compute_loss_func = functools.partial(plain_loss, example_ids=inputs.pop(data.EXAMPLE_IDS))
        try:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        finally:
            self.compute_loss_func = plain_loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        """One batch's forward and backward; with SAM (a two-pass optimizer) a second pass at the
        perturbed weights W + e, whose gradient the optimizer step then uses (optim/sam.py). The
        loss logged is the first pass's, at W."""
        optimizer = self.optimizer.optimizer if isinstance(self.optimizer, AcceleratedOptimizer) else self.optimizer
        if not isinstance(optimizer, SAM):
            return super().training_step(model, inputs, num_items_in_batch)
        loss = super().training_step(model, dict(inputs), num_items_in_batch)  # a copy: compute_loss pops labels
        optimizer.perturb()
        super().training_step(model, dict(inputs), num_items_in_batch)
        return loss

    def _stop_if_not_finite(self, loss: torch.Tensor) -> None:
        bad = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0])
        if self.args.world_size > 1:  # every process stops together, or the others wait forever
            torch.distributed.all_reduce(bad)
        if bad.item() > 0:
            raise TrainingDiverged(self._diverged(f"became {loss.item()} at step {self.state.global_step + 1}"))

    def _stop_if_loss_grew(self, loss: float) -> None:
        """The loss guard, on each logged training loss (the same value on every process)."""
        if self.first_logged_loss is None:
            self.first_logged_loss = loss
        elif self.max_loss_ratio and self.first_logged_loss > 0 and loss > self.max_loss_ratio * self.first_logged_loss:
            raise TrainingDiverged(self._diverged(
                f"reached {loss:.6g} at step {self.state.global_step}, over {self.max_loss_ratio:g}x its first logged "
                f"value {self.first_logged_loss:.6g} (train.max_loss_ratio; null turns this check off)"))

    def _diverged(self, what: str) -> str:
        """The one line for a diverged run: the step, the loss, the likely cause, and what is kept."""
        found = checkpoint.sorted_checkpoints(pathlib.Path(self.args.output_dir))
        latest = checkpoint.newest_intact(found)
        # what happens to it (kept, or the new run removed) rundir.undone_on_failure adds to the line
        kept = f"the last good checkpoint is {latest}" if latest else "no checkpoint was saved before it"
        return (f"the training loss {what}; {kept}. Lower optimizer.lr (now {self.args.learning_rate:g}, the likely "
                "cause) or set train.max_grad_norm, then start again with --overwrite")

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "train_loss" in logs and self.loss_total_from_step is not None:
            # the Trainer divides its logged total by this call's steps; a restored total counts from earlier
            logs["train_loss"] = self._total_loss_scalar / max(self.state.global_step - self.loss_total_from_step, 1)
        super().log(logs, start_time)
        if "loss" in logs:  # a training log line (evaluations log eval_loss, test_loss, ...)
            self._stop_if_loss_grew(logs["loss"])

    # The logging window. Each log line holds the mean training loss since the previous one: the
    # Trainer sums every step's loss in _tr_loss (per process) and remembers the step of the last
    # line and the total logged so far, and train() resets all three. A run resumed from a
    # checkpoint between two log lines would log the mean of fewer steps, so the window is saved
    # with every checkpoint and put back on resume, with the first logged loss of the loss guard.
    def logging_window(self, loss_sums: list[float]) -> dict[str, Any]:
        counted_from = self.loss_total_from_step if self.loss_total_from_step is not None else self._initial_global_step
        return {"loss_sum_per_process": loss_sums, "last_logged_step": self._globalstep_last_logged,
                "logged_loss_total": self._total_loss_scalar, "logged_loss_total_from_step": counted_from,
                "first_logged_loss": self.first_logged_loss}

    def restore_logging_window(self) -> None:
        window = self.resumed_window
        if window is None:  # a fresh run, or a checkpoint written before windows were saved
            return
        sums = window["loss_sum_per_process"]  # another process count: each takes the mean, which is logged
        mine = sums[self.args.process_index] if len(sums) == self.args.world_size else sum(sums) / len(sums)
        self._tr_loss.fill_(mine)
        self._globalstep_last_logged = window["last_logged_step"]
        self._total_loss_scalar = window["logged_loss_total"]
        self.loss_total_from_step = window["logged_loss_total_from_step"]
        self.first_logged_loss = window["first_logged_loss"]

    # Checkpoints in safetensors + JSON, written atomically (checkpoint.py says why).
    def _save_checkpoint(self, model, trial):
        from accelerate.utils import gather_object

        self.store_flos()  # a collective in several processes: every rank takes part
        gathered = gather_object([(checkpoint.rng_state(), self._tr_loss.item())])
        if self.args.should_save:
            for callback in [*self.callback_handler.callbacks, self.control]:
                if isinstance(callback, ExportableState):
                    self.state.stateful_callbacks[type(callback).__name__] = callback.state()
            progress = json.dumps(dataclasses.asdict(self.state), indent=2, sort_keys=True)
            checkpoint.save(pathlib.Path(self.args.output_dir), self.state.global_step, self.model,
                            self.optimizer, self.lr_scheduler, [rng for rng, _ in gathered], progress,
                            self.logging_window([loss_sum for _, loss_sum in gathered]), keep=self.keep_checkpoints)
        self.accelerator.wait_for_everyone()

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        checkpoint.load_trainable(self.model, pathlib.Path(resume_from_checkpoint))
        self.resumed_window = checkpoint.load_window(pathlib.Path(resume_from_checkpoint))

    def _load_optimizer_and_scheduler(self, folder):
        if folder is None:
            return
        from safetensors.torch import load_file

        folder = pathlib.Path(folder)
        checkpoint.load_optimizer_state(self.optimizer, load_file(folder / "optimizer.safetensors"),
                                        json.loads((folder / "optimizer.json").read_text(encoding="utf-8")))
        self.lr_scheduler.load_state_dict(json.loads((folder / "scheduler.json").read_text(encoding="utf-8")))

    def _load_rng_state(self, folder):
        if folder is not None:
            checkpoint.load_rng(pathlib.Path(folder), self.args.process_index)


# ---- the pieces the Trainer is given -----------------------------------------------------------


def task_loss(kind: str, loss: dict[str, Any]):
    """The Trainer's compute_loss_func: the configured loss over labelled positions.

    It sums over the examples (or answer tokens) and divides by their count over the whole
    optimizer step, all accumulated batches and processes together (`num_items_in_batch`), so
    2 processes x batch b compute the same loss and gradients as 1 process x batch 2b. The
    batch's extra fields (`example_ids` of training batches) go to the loss by keyword.
    """
    fn = _loss_callable(loss)

    def compute(outputs, labels, num_items_in_batch=None, **batch):
        logits = outputs["logits"]  # (batch, classes) or (batch, tokens, vocabulary)
        if kind == "sft":  # token t predicts token t+1
            logits, labels = logits[:, :-1], labels[:, 1:]
        logits = logits.reshape(-1, logits.shape[-1]).float()
        labels = labels.reshape(-1).to(logits.device)
        per_item = fn(logits, labels, reduction="none", ignore_index=data.IGNORE_INDEX, **batch)
        count = num_items_in_batch if num_items_in_batch is not None else (labels != data.IGNORE_INDEX).sum()
        return per_item.sum() / count

    return compute


def _loss_callable(loss: dict[str, Any]):
    """(logits, labels, reduction, ignore_index, **batch) -> losses: one of peftlab.losses (one object
    for the run: ALDR-KL keeps its lambdas in it), or a torch.nn.functional loss, which takes no
    batch fields."""
    from ..losses import losses

    target = loss_function(loss["name"])
    fields = {k: v for k, v in loss.items() if k != "name"}
    if loss["name"] in losses():
        return target(**fields)

    def functional(logits, labels, *, reduction, ignore_index, **batch):
        return target(logits, labels, reduction=reduction, ignore_index=ignore_index, **fields)

    return functional


def build_optimizer(optimizer: dict[str, Any], adapted: Adaptation) -> torch.optim.Optimizer:
    """The configured optimizer over the adaptation's parameter groups: a registered one (peftlab.optim)
    from its config, else the torch.optim class. Here the parameters are first known: a projection
    rank larger than a matrix (GaLore, Fira) is refused now, before the first step."""
    fields = {k: v for k, v in optimizer.items() if k != "name"}
    groups = adapted.param_groups(optimizer["lr"])
    target = optimizer_class(optimizer["name"])
    if issubclass(target, OptimizerConfig):
        return target(**fields).build(groups)
    return target(groups, **fields)


def training_arguments(train: Train, schedule: Schedule, lr: float, seed: int, checkpoints: pathlib.Path,
                       has_eval: bool) -> TrainingArguments:
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return TrainingArguments(
        output_dir=str(checkpoints),
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.eval_batch_size,
        num_train_epochs=train.epochs,
        max_steps=train.steps if train.steps is not None else -1,
        gradient_accumulation_steps=train.grad_accum,
        max_grad_norm=train.max_grad_norm if train.max_grad_norm is not None else 0.0,
        learning_rate=lr,
        lr_scheduler_type=schedule.name,
        warmup_steps=schedule.warmup_ratio,
        logging_strategy="steps",
        logging_steps=train.log_every,
        logging_first_step=True,
        eval_strategy="steps" if has_eval and train.eval_every else "no",
        eval_steps=train.eval_every,
        save_strategy="steps",
        save_steps=train.save_every,
        seed=seed,
        report_to="none",
        disable_tqdm=not train.progress,
        remove_unused_columns=False,
        activation_checkpointing=train.gradient_checkpointing,
        # non-reentrant: gradients reach the adapters even though the frozen embeddings' outputs need none
        activation_checkpointing_kwargs={"use_reentrant": False} if train.gradient_checkpointing else None,
        train_sampling_strategy="group_by_length" if train.group_by_length else "random",
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
        ddp_backend="gloo" if distributed and not torch.cuda.is_available() else None,
        include_num_input_tokens_seen="no",
    )


def _tensorboard_callback(folder: pathlib.Path):
    from transformers.integrations import TensorBoardCallback

    try:
        callback = TensorBoardCallback()
    except RuntimeError:  # tensorboard is not installed
        print("tensorboard is not installed: metrics go to metrics.jsonl only (pip install tensorboard)")
        return None
    callback.logging_dir = str(folder)  # also after training ends, when evaluation logs reopen a writer
    return callback


@contextlib.contextmanager
def writers_closed_on_failure(trainer: Trainer):
    """Close the TensorBoard writer when training fails (Ctrl-C included), before the run folder is
    cleaned or an earlier run is put back: its background thread otherwise flushes later and
    re-creates an events file in whatever folder now holds that path."""
    from transformers.integrations import TensorBoardCallback

    try:
        yield
    except BaseException:
        for callback in trainer.callback_handler.callbacks:
            if isinstance(callback, TensorBoardCallback) and callback.tb_writer is not None:
                callback.tb_writer.close()
                callback.tb_writer = None
        raise


def _callbacks(adapted: Adaptation, run_dir: pathlib.Path, main_process: bool) -> list[TrainerCallback]:
    callbacks: list[TrainerCallback] = [MetricsFile(run_dir / rundir.METRICS_FILE)]
    if adapted.after_step is not None:
        callbacks.append(StepHook(adapted.after_step))
    if main_process:
        board = _tensorboard_callback(run_dir / "tensorboard")
        if board is not None:
            callbacks.append(board)
    return callbacks


def make_trainer(run: RunConfig, kind: str, adapted: Adaptation, tokenizer, train_set, val_set,
                 run_dir: pathlib.Path, main_process: bool) -> PeftlabTrainer:
    """The Trainer for a run, with the adaptation's parameter groups, regulariser and step hook."""
    optimizer = build_optimizer(run.optimizer, adapted)
    trainer = PeftlabTrainer(
        model=adapted.model,
        args=training_arguments(run.train, run.schedule, run.optimizer["lr"], run.seed, run_dir / "checkpoints",
                                val_set is not None),
        train_dataset=train_set,
        eval_dataset=val_set,
        data_collator=data.PadCollator(tokenizer.pad_token_id),
        optimizers=(optimizer, None),
        compute_loss_func=task_loss(kind, run.loss),
        compute_metrics=classification_metrics if kind == "classification" else None,
        callbacks=_callbacks(adapted, run_dir, main_process),
        regularization=adapted.regularization,
        keep_checkpoints=run.train.keep_checkpoints,
        max_loss_ratio=run.train.max_loss_ratio,
    )
    if kind == "sft":  # only the loss: gathering every token's logits would cost gigabytes
        trainer.args.prediction_loss_only = True
    return trainer
