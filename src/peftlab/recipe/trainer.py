"""The training recipe: a run config in, a run directory out.

    run = train(config)            # config: peftlab.config.RunConfig (validated)

What happens, in order:
  1. the run directory is checked (a different run there is refused; --resume needs a checkpoint)
  2. the task's rows are loaded and split (seeded), the model loads, the method attaches
     (a classifier's new head is trained in full through the method's `also_train`)
  3. transformers.Trainer runs the loop: batches, gradient accumulation and clipping, the
     learning-rate schedule, progress bars, logging (metrics.jsonl and TensorBoard), evaluation,
     and several processes under torchrun/accelerate (gloo on CPU)
  4. peftlab's part of each step: the optimizer is built from `peftlab.param_groups`, the
     loss adds `peftlab.regularization(model)`, `peftlab.step(model, step)` runs after every
     optimizer step, and a NaN/inf loss stops the run naming the step
  5. checkpoints are peftlab's own (safetensors + JSON, atomic; see checkpoint.py)
  6. the run ends with validation and test metrics, the adapter (peftlab format) and
     summary.json

Only the main process (rank 0) writes files.

Run directory:
    config.yaml       the resolved config (all defaults filled in)
    task.json         the task kind and label names (what eval/merge need besides the config)
    adapter/          adapter_config.json + adapter_model.safetensors (peftlab.save)
    metrics.jsonl     one JSON object per logged step and per evaluation
    tensorboard/      the same metrics for TensorBoard
    checkpoints/      checkpoint-<step>/ (the newest `train.keep_checkpoints`)
    summary.json      task metrics, trainable/total parameters, peak RSS, wall time, steps/s
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import platform
import resource
import shutil
import subprocess
import sys
import time
from typing import Any

import numpy as np
import torch
import yaml

from . import adaptation, checkpoint, data, models, config as configuration
from ..core import attach, trainable_parameters
from ..errors import PeftlabError
from ..registry import config as method_config

ADAPTER_NAME = "default"


class TrainingDiverged(PeftlabError):
    """The loss became NaN or infinite."""


# ---- the run directory -------------------------------------------------------------------------


def default_output(run: configuration.RunConfig) -> pathlib.Path:
    model = run.model if run.model in models.NAMES else pathlib.Path(run.model).name
    task = run.task if run.task != "file" else pathlib.Path(run.data.path).stem
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return pathlib.Path("runs") / f"{model}-{task}-{run.method['name']}-{stamp}"


def _comparable(values: dict[str, Any]) -> dict[str, Any]:
    """A config without what may differ between two invocations of the same run."""
    values = json.loads(json.dumps(values))
    values.pop("output", None)
    values.get("train", {}).pop("progress", None)
    return values


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(a) | set(b))
    out = []
    for k in keys:
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out += _differences(a[k], b[k], f"{prefix}{k}.")
        elif a.get(k) != b.get(k):
            out.append(f"{prefix}{k}")
    return out


def check_output(run_dir: pathlib.Path, run: configuration.RunConfig, resume: bool,
                 overwrite: bool) -> pathlib.Path | None:
    """Refuse to clobber another run; with resume, the checkpoint to continue from."""
    saved_path = run_dir / "config.yaml"
    holds_run = saved_path.is_file()
    if resume:
        if not holds_run:
            raise PeftlabError(f"--resume: {run_dir} holds no run (no config.yaml): start it without --resume")
        saved = yaml.safe_load(saved_path.read_text(encoding="utf-8"))
        changed = _differences(_comparable(saved), _comparable(run.to_dict()))
        if changed:
            raise PeftlabError(f"--resume: this config differs from the run in {run_dir} at {', '.join(changed)}; "
                               f"resume with the run's own config: peftlab train --resume {run_dir}")
        latest = checkpoint.latest(run_dir / "checkpoints")
        if latest is None:
            raise PeftlabError(f"--resume: {run_dir} has no checkpoint yet (the first is saved at step "
                               f"{run.train.save_every}): start it again with --overwrite")
        return latest
    if run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        if holds_run:
            saved = yaml.safe_load(saved_path.read_text(encoding="utf-8"))
            changed = _differences(_comparable(saved), _comparable(run.to_dict()))
            what = f"a different run (config differs at {', '.join(changed)})" if changed else "this run already"
        else:
            what = "other files"
        raise PeftlabError(f"output directory {run_dir} holds {what}: choose another output, "
                           "continue it with --resume, or replace it with --overwrite")
    return None


def _clear(run_dir: pathlib.Path) -> None:
    if run_dir.exists():
        trash = run_dir.with_name(f".trash-{run_dir.name}-{os.getpid()}")
        os.rename(run_dir, trash)
        shutil.rmtree(trash, ignore_errors=True)


def read_run(run_dir: str | pathlib.Path) -> tuple[configuration.RunConfig, dict[str, Any]]:
    """The config and task record of a finished (or checkpointed) run directory."""
    run_dir = pathlib.Path(run_dir)
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "task.json").is_file():
        raise PeftlabError(f"{run_dir} is not a peftlab run directory (no config.yaml/task.json): "
                           "pass the directory `peftlab train` printed")
    run = configuration.validate(yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")))
    return run, json.loads((run_dir / "task.json").read_text(encoding="utf-8"))


# ---- data and model ----------------------------------------------------------------------------


def load_task(run: configuration.RunConfig) -> data.TaskData:
    if run.task == "file":
        d = run.data
        columns = ({"text": d.text_column, "label": d.label_column} if d.kind == "classification"
                   else {"prompt": d.prompt_column, "response": d.response_column})
        task = data.from_file(d.path, d.kind, columns)
    else:
        task = data.TASKS[run.task]()
    if run.data.limit is not None:  # a seeded sample, so a limit does not pick only the file's start
        keep = np.sort(np.random.default_rng(run.seed).permutation(len(task.rows))[: run.data.limit])
        task.rows = [task.rows[i] for i in keep]
    return task


def encode(rows: list[dict], kind: str, tokenizer, max_length: int) -> list[dict]:
    if kind == "classification":
        return data.encode_classification(rows, tokenizer, max_length)
    return data.encode_sft(rows, tokenizer, max_length)


def calibration_batches(run: configuration.RunConfig, rows: list[dict], kind: str, tokenizer) -> list[dict]:
    """The first `train.calibration_batches` batches of a seeded shuffle of the training rows."""
    size = run.train.batch_size
    collate = data.PadCollator(tokenizer.pad_token_id)
    order = np.random.default_rng(run.seed).permutation(len(rows))
    count = min(run.train.calibration_batches, math.ceil(len(rows) / size))
    return [collate(encode([rows[i] for i in order[b * size:(b + 1) * size]], kind, tokenizer, run.data.max_length))
            for b in range(count)]


def fill_run_fields(run: configuration.RunConfig, train_examples: int) -> None:
    """Give the method the run's step count and learning rate where it asks for them and the config is silent.

    The filled values are saved with the run (config.yaml), so a resumed run and the `peft`
    peer see the same numbers.
    """
    run.method = configuration.with_run_fields(run.method, configuration.run_field_values(run, train_examples))


def build_model(run: configuration.RunConfig, task: data.TaskData, train_rows: list[dict],
                adapter_state: dict | None = None):
    """(model, tokenizer, method config) with the method attached.

    `adapter_state` (on resume) fills the adapters with saved values instead of initialising
    them, so data-driven initialisations do not run again.
    """
    model, tokenizer = models.load(run.model, run.kind, task.label_names)
    fields = {k: v for k, v in run.method.items() if k != "name"}
    if run.kind == "classification":  # the new head trains in full and is saved with the adapter
        head = models.head_name(model)
        fields["also_train"] = list(dict.fromkeys([*fields.get("also_train", []), head]))
    method = method_config(run.method["name"], **fields)
    calibration = None
    if method.needs_calibration and adapter_state is None:
        calibration = calibration_batches(run, train_rows, task.kind, tokenizer)
    attach(model, method, ADAPTER_NAME, calibration=calibration, state_dict=adapter_state)
    return model, tokenizer, method


@dataclasses.dataclass
class Hooks:
    """Extension points for programs built on the recipe (peftlab.bench); the CLI uses none.

    adapt(model, run, calibration) -> adaptation.Adaptation
        makes the loaded model trainable instead of attaching the configured peftlab method
        (the bench's `peft` peer runs); `calibration()` returns the calibration batches
    splits    the splits evaluated at the end (selection runs leave the test split alone)
    trained(model, tokenizer) -> dict
        extra metrics on the trained model, stored in the summary under "extra"
    """

    adapt: Any = None
    splits: tuple[str, ...] = ("validation", "test")
    trained: Any = None


def make_trainable(run: configuration.RunConfig, task: data.TaskData, train_rows: list[dict],
                   adapter_state: dict | None, hooks: Hooks) -> tuple[adaptation.Adaptation, Any]:
    """(adaptation, tokenizer): the configured method, a baseline, or the caller's own adaptation."""
    if hooks.adapt is None and run.method["name"] not in adaptation.BASELINES:
        model, tokenizer, method = build_model(run, task, train_rows, adapter_state)
        return adaptation.of_peftlab(model, method), tokenizer
    model, tokenizer = models.load(run.model, run.kind, task.label_names)
    if hooks.adapt is not None:
        return hooks.adapt(model, run, lambda: calibration_batches(run, train_rows, task.kind, tokenizer)), tokenizer
    head = models.head_name(model) if run.kind == "classification" else None
    return adaptation.baseline(run.method["name"], model, head), tokenizer


# ---- the Trainer, with peftlab's step hook, loss and checkpoints ------------------------------


def _transformers_trainer():
    """(PeftlabTrainer, StepHook, MetricsFile): classes built on transformers', defined here so that
    importing peftlab does not import transformers' Trainer (seconds) until a run needs it."""
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_callback import ExportableState

    class StepHook(TrainerCallback):
        """peftlab.step after every optimizer step: rank allocation, layer sampling, ...

        It runs in on_optimizer_step, before the Trainer's zero_grad (on_step_end comes after it),
        because sensitivity-based methods (AdaLoRA) read this step's gradients. The step passed is
        the number of optimizer steps done, this one included (what on_step_end would see).
        """

        def on_optimizer_step(self, args, state, control, **kwargs):
            self.after_step(state.global_step + 1)

    class MetricsFile(TrainerCallback):
        """Each log line (train loss, lr, evaluation metrics) as one JSON object."""

        def __init__(self, path: pathlib.Path):
            self.path = path

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                record = {"step": state.global_step, "epoch": state.epoch, **logs, "time": time.time()}
                with self.path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")

    class PeftlabTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                          num_items_in_batch=num_items_in_batch)
            if not model.training:
                return result
            loss = result[0] if return_outputs else result
            extra = self.regularization()
            if extra is not None:  # once per optimizer step, spread over the accumulated batches
                loss = loss + extra / self.current_gradient_accumulation_steps
            self._stop_if_not_finite(loss)
            return (loss, result[1]) if return_outputs else loss

        def _stop_if_not_finite(self, loss: torch.Tensor) -> None:
            bad = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0])
            if self.args.world_size > 1:  # every process stops together, or the others wait forever
                torch.distributed.all_reduce(bad)
            if bad.item() > 0:
                latest = checkpoint.latest(pathlib.Path(self.args.output_dir))
                kept = f"the last good checkpoint is {latest}" if latest else "no checkpoint was saved before it"
                raise TrainingDiverged(
                    f"the training loss became {loss.item()} at step {self.state.global_step + 1}; {kept}. "
                    "Lower optimizer.lr (or set train.max_grad_norm), then start again or --resume")

        # Checkpoints in safetensors + JSON, written atomically (checkpoint.py says why).
        def _save_checkpoint(self, model, trial):
            from accelerate.utils import gather_object

            self.store_flos()  # a collective in several processes: every rank takes part
            rng = gather_object([checkpoint.rng_state()])
            if self.args.should_save:
                for callback in [*self.callback_handler.callbacks, self.control]:
                    if isinstance(callback, ExportableState):
                        self.state.stateful_callbacks[type(callback).__name__] = callback.state()
                progress = json.dumps(dataclasses.asdict(self.state), indent=2, sort_keys=True)
                checkpoint.save(pathlib.Path(self.args.output_dir), self.state.global_step, self.model,
                                self.optimizer, self.lr_scheduler, rng, progress, keep=self.keep_checkpoints)
            self.accelerator.wait_for_everyone()

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            checkpoint.load_trainable(self.model, pathlib.Path(resume_from_checkpoint))

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

    return PeftlabTrainer, StepHook, MetricsFile


def task_loss(kind: str, loss_config: dict[str, Any]):
    """The Trainer's compute_loss_func: the configured loss over labelled positions.

    It sums over the examples (or answer tokens) and divides by their count over the whole
    optimizer step, all accumulated batches and processes together (`num_items_in_batch`), so
    2 processes x batch b compute the same loss and gradients as 1 process x batch 2b.
    """
    fn = configuration.loss_function(loss_config["name"])
    kwargs = {k: v for k, v in loss_config.items() if k != "name"}

    def compute(outputs, labels, num_items_in_batch=None):
        logits = outputs["logits"]
        if kind == "sft":  # token t predicts token t+1
            logits, labels = logits[:, :-1], labels[:, 1:]
        logits = logits.reshape(-1, logits.shape[-1]).float()
        labels = labels.reshape(-1).to(logits.device)
        per_item = fn(logits, labels, reduction="none", ignore_index=data.IGNORE_INDEX, **kwargs)
        count = num_items_in_batch if num_items_in_batch is not None else (labels != data.IGNORE_INDEX).sum()
        return per_item.sum() / count

    return compute


def classification_metrics(prediction) -> dict[str, float]:
    """The Trainer's compute_metrics: from logits and labels."""
    return label_metrics(np.asarray(prediction.predictions).argmax(-1), np.asarray(prediction.label_ids))


def label_metrics(predicted: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy and macro F1 (the mean over the classes present of each class's F1)."""
    f1s = []
    for c in np.unique(labels):
        tp = np.sum((predicted == c) & (labels == c))
        denominator = np.sum(predicted == c) + np.sum(labels == c)
        f1s.append(2 * tp / denominator if denominator else 0.0)
    return {"accuracy": float((predicted == labels).mean()), "macro_f1": float(np.mean(f1s))}


def training_arguments(run: configuration.RunConfig, checkpoints: pathlib.Path, has_eval: bool):
    from transformers import TrainingArguments

    t = run.train
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return TrainingArguments(
        output_dir=str(checkpoints),
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size,
        num_train_epochs=t.epochs,
        max_steps=t.steps if t.steps is not None else -1,
        gradient_accumulation_steps=t.grad_accum,
        max_grad_norm=t.max_grad_norm if t.max_grad_norm is not None else 0.0,
        learning_rate=run.optimizer["lr"],
        lr_scheduler_type=run.schedule.name,
        warmup_steps=run.schedule.warmup_ratio,
        logging_strategy="steps",
        logging_steps=t.log_every,
        logging_first_step=True,
        eval_strategy="steps" if has_eval and t.eval_every else "no",
        eval_steps=t.eval_every,
        save_strategy="steps",
        save_steps=t.save_every,
        seed=run.seed,
        report_to="none",
        disable_tqdm=not t.progress,
        remove_unused_columns=False,
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
        ddp_backend="gloo" if distributed and not torch.cuda.is_available() else None,
        include_num_input_tokens_seen="no",
    )


# ---- the recipe ------------------------------------------------------------------------------


def run_versions() -> dict[str, str]:
    """The versions a run's summary records: packages, python, machine, and the source commit."""
    import transformers

    from .. import __version__

    found = {"peftlab": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
             "python": platform.python_version(), "machine": platform.machine(), "cpus": str(os.cpu_count())}
    commit = source_commit()
    return {**found, "peftlab_commit": commit} if commit else found


SOURCE_ROOT = pathlib.Path(__file__).resolve().parents[3]  # the checkout holding src/peftlab, if any


@functools.lru_cache(maxsize=4)
def source_commit(root: pathlib.Path = SOURCE_ROOT) -> str | None:
    """The git commit of the peftlab source that ran ("-dirty": its src/ had local changes), or None
    outside a git checkout. A version number alone does not say which code produced a result."""
    if not (root / ".git").exists():
        return None
    git = ["git", "-C", str(root)]
    try:
        head = subprocess.run([*git, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=10)
        changes = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no", "--", "src"],
                                 capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("-dirty" if changes.stdout.strip() else "")


def _peak_rss_mb() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return usage / (1 << 20) if sys.platform == "darwin" else usage / 1024


def _tensorboard_callback(folder: pathlib.Path):
    from transformers.integrations import TensorBoardCallback

    try:
        callback = TensorBoardCallback()
    except RuntimeError:  # tensorboard is not installed
        print("tensorboard is not installed: metrics go to metrics.jsonl only (pip install tensorboard)")
        return None
    callback.logging_dir = str(folder)  # also after training ends, when evaluation logs reopen a writer
    return callback


def process_state():
    """accelerate's view of the processes; joins the process group under torchrun / accelerate launch.

    Without cpu=True, accelerate on a machine without a GPU does not see torchrun's processes.
    """
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def _shared_output(run: configuration.RunConfig) -> pathlib.Path:
    """The run directory; under several processes, rank 0's choice for everyone."""
    from accelerate.utils import broadcast_object_list

    chosen = [str(run.output or default_output(run))]
    if process_state().num_processes > 1:
        broadcast_object_list(chosen, from_process=0)
    return pathlib.Path(chosen[0])


def train(run: configuration.RunConfig, *, resume: bool = False, overwrite: bool = False,
          echo=print, hooks: Hooks | None = None) -> dict[str, Any]:
    """Run a (validated) config; returns the summary that summary.json also holds."""
    from safetensors.torch import load_file
    from transformers import set_seed

    started = time.time()
    state = process_state()
    hooks = hooks or Hooks()

    # 1. the run directory (a bad data file fails before it is touched)
    run_dir, task, (train_rows, val_rows, test_rows), latest = _prepare_run_dir(run, state, resume, overwrite)

    # 2. data, model, method
    set_seed(run.seed)
    adapter_state = load_file(latest / "trainable.safetensors") if latest else None
    adapted, tokenizer = make_trainable(run, task, train_rows, adapter_state, hooks)
    train_set, val_set, test_set = (encode(rows, task.kind, tokenizer, run.data.max_length) if rows else None
                                    for rows in (train_rows, val_rows, test_rows))

    # 3, 4, 5. the Trainer with peftlab's optimizer, loss, step hook and checkpoints
    trainer = _make_trainer(run, task, adapted, tokenizer, train_set, val_set, run_dir, latest, state)
    training_started, training_cpu_started = time.time(), time.process_time()
    output = trainer.train(resume_from_checkpoint=str(latest) if latest else None)
    training_time = time.time() - training_started
    training_cpu_time = time.process_time() - training_cpu_started  # all threads: steadier than wall time when busy

    # 6. final metrics, the adapter and the summary
    metrics = _final_metrics(trainer, {"validation": val_set, "test": test_set}, hooks.splits)
    model = adapted.model
    trainable = sum(p.numel() for p in trainable_parameters(model).values())
    total = sum(p.numel() for p in model.parameters())
    steps_done = output.global_step - (checkpoint.step_of(latest) if latest else 0)
    summary = {
        "run": str(run_dir), "model": run.model, "task": run.task, "method": run.method["name"],
        "metrics": metrics, "trainable_parameters": trainable, "total_parameters": total,
        "trainable_share": trainable / total, "steps": output.global_step,
        "train_time_s": training_time, "train_cpu_time_s": training_cpu_time,
        "steps_per_second": steps_done / training_time if training_time else None,
        "wall_time_s": time.time() - started, "peak_rss_mb": _peak_rss_mb(), "processes": state.num_processes,
        "resumed_from": str(latest) if latest else None, "versions": run_versions(),
    }
    if hooks.trained is not None:
        summary["extra"] = hooks.trained(model, tokenizer)
    if state.is_main_process:
        adapter_dir = run_dir / "adapter"
        _clear(adapter_dir)
        adapted.save(adapter_dir)
        checkpoint.write_json(run_dir / "summary.json", summary)
        _report(summary, task.kind, echo)
    state.wait_for_everyone()
    return summary


def _prepare_run_dir(run: configuration.RunConfig, state, resume: bool, overwrite: bool):
    """(run directory, task, (train, validation, test) rows, latest checkpoint or None).

    The task loads and splits first, so a bad data file fails before the directory is touched;
    then the directory is checked (another run there is refused) and gets config.yaml and task.json.
    """
    run_dir = _shared_output(run)
    run.output = str(run_dir)
    task = load_task(run)
    rows = data.split(task.rows, tuple(run.data.split), run.seed)
    fill_run_fields(run, len(rows[0]))
    latest = check_output(run_dir, run, resume, overwrite)
    state.wait_for_everyone()
    if state.is_main_process:
        if overwrite and not resume:
            _clear(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(run.to_yaml(), encoding="utf-8")
        checkpoint.write_json(run_dir / "task.json", {"kind": task.kind, "label_names": task.label_names,
                                                      "sizes": [len(r) for r in rows]})
    state.wait_for_everyone()
    return run_dir, task, rows, latest


def _make_trainer(run: configuration.RunConfig, task, adapted, tokenizer, train_set, val_set,
                  run_dir: pathlib.Path, latest: pathlib.Path | None, state):
    """The transformers Trainer, with the method's parameter groups, regulariser and step hook."""
    optimizer_kwargs = {k: v for k, v in run.optimizer.items() if k not in ("name", "lr")}
    optimizer = configuration.optimizer_class(run.optimizer["name"])(
        adapted.param_groups(run.optimizer["lr"]), lr=run.optimizer["lr"], **optimizer_kwargs)
    PeftlabTrainer, StepHook, MetricsFile = _transformers_trainer()
    metrics_path = run_dir / "metrics.jsonl"
    if state.is_main_process and latest is not None:
        _truncate_metrics(metrics_path, checkpoint.step_of(latest))
    callbacks = [MetricsFile(metrics_path)]
    if adapted.after_step is not None:
        hook = StepHook()
        hook.after_step = adapted.after_step
        callbacks.append(hook)
    if state.is_main_process:
        board = _tensorboard_callback(run_dir / "tensorboard")
        if board is not None:
            callbacks.append(board)
    trainer = PeftlabTrainer(
        model=adapted.model,
        args=training_arguments(run, run_dir / "checkpoints", val_set is not None),
        train_dataset=train_set,
        eval_dataset=val_set,
        data_collator=data.PadCollator(tokenizer.pad_token_id),
        optimizers=(optimizer, None),
        compute_loss_func=task_loss(task.kind, run.loss),
        compute_metrics=classification_metrics if task.kind == "classification" else None,
        callbacks=callbacks,
    )
    trainer.keep_checkpoints = run.train.keep_checkpoints
    trainer.regularization = adapted.regularization
    if task.kind == "sft":  # only the loss: gathering every token's logits would cost gigabytes
        trainer.args.prediction_loss_only = True
    return trainer


def _final_metrics(trainer, datasets: dict[str, Any], splits: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """{split: {metric: value}} for the splits asked for that have data."""
    metrics: dict[str, Any] = {}
    for split_name, dataset in datasets.items():
        if dataset and split_name in splits:
            result = trainer.evaluate(dataset, metric_key_prefix=split_name)
            metrics[split_name] = {k[len(split_name) + 1:]: v for k, v in result.items()
                                   if k.startswith(split_name + "_") and not k.endswith(("_runtime", "_per_second"))}
    return metrics


def _truncate_metrics(path: pathlib.Path, step: int) -> None:
    """On resume, forget lines logged after the checkpoint: they are about to be redone."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def _report(summary: dict[str, Any], kind: str, echo) -> None:
    test = summary["metrics"].get("test", {})
    if kind == "classification" and "accuracy" in test:
        echo(f"held-out test accuracy: {test['accuracy']:.4f} (macro F1 {test['macro_f1']:.4f})")
    elif "loss" in test:
        echo(f"held-out test answer loss: {test['loss']:.4f} (perplexity {math.exp(min(test['loss'], 50)):.2f})")
    echo(f"trainable parameters: {summary['trainable_parameters']:,} of {summary['total_parameters']:,} "
         f"({100 * summary['trainable_share']:.2f}%); {summary['steps']} steps in {summary['train_time_s']:.0f} s")
    echo(f"run saved to {summary['run']}")
