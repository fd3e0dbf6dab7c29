"""The training recipe: a run config in, a run directory out.

    summary = train(run)            # run: peftlab.recipe.config.RunConfig (validated)

What happens, in order (each step takes its own sections of the config):
  1. the task's rows are loaded and split (data: task, data section, seed), the method takes
     its run fields (steps, rate), and the run directory decides how the run starts
     (rundir: a different run there is refused; --resume needs a checkpoint; --overwrite
     moves the old run aside until the new one has its first checkpoint)
  2. the model loads and becomes trainable (adaptation: the method attaches; a classifier's
     new head is trained in full through the method's `also_train`)
  3. the rows are encoded and transformers.Trainer runs the loop with peftlab's optimizer,
     loss, step hook and checkpoints (loop: train, schedule, optimizer, loss sections)
  4. the run ends with validation and test metrics, the adapter (peftlab format) and
     summary.json

Only the main process (rank 0) writes files. A run that fails before its first checkpoint
(Ctrl-C included) leaves nothing: its files go and the run an --overwrite replaced comes back;
a later failure keeps the checkpoints. The exception carries a note saying which (the CLI
prints it at the end of the error line). docs/runs.md describes the folder.

Run directory:
    config.yaml       the resolved config (all defaults filled in)
    task.json         the task kind, label names and split sizes (what eval/merge need besides the config);
                      with `noise:`, which training labels were changed
    adapter/          adapter_config.json + adapter_model.safetensors (peftlab.save)
    metrics.jsonl     one JSON object per logged step and per evaluation
    tensorboard/      the same metrics for TensorBoard
    checkpoints/      checkpoint-<step>/ (the newest `train.keep_checkpoints`)
    summary.json      task metrics, trainable/total parameters, peak RSS, wall time, steps/s, the
                      seconds building the adaptation took (init_time_s: attach with any data-driven
                      initialisation, not in train_time_s) and the in-training validations
                      (validation_curve, with train.eval_every)
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
import subprocess
import sys
import time
from typing import Any

import torch

from . import adaptation, checkpoint, data, models, rundir
from .config import RunConfig, run_field_values, with_run_fields
from ..core import trainable_parameters
from ..io import files


@dataclasses.dataclass
class Hooks:
    """Extension points for programs built on the recipe (peftlab.bench); the CLI uses none.

    adapt(model, run, calibration) -> adaptation.Adaptation
        makes the loaded model trainable instead of attaching the configured peftlab method
        (the bench's `peft` peer runs); `calibration()` returns the calibration batches
    splits    the splits evaluated at the end (selection runs leave the test split alone)
    trained(model, tokenizer) -> dict
        extra metrics on the trained model, stored in the summary under "extra"
    callbacks  transformers TrainerCallbacks added to the loop (`peftlab tune` reports each
               validation to its scheduler through one)
    """

    adapt: Any = None
    splits: tuple[str, ...] = ("validation", "test")
    trained: Any = None
    callbacks: tuple = ()


def train(run: RunConfig, *, resume: bool = False, overwrite: bool = False,
          echo=print, hooks: Hooks | None = None) -> dict[str, Any]:
    """Run a (validated) config; returns the summary that summary.json also holds."""
    from safetensors.torch import load_file
    from transformers import set_seed

    from . import loop

    started = time.time()
    state = process_state()
    hooks = hooks or Hooks()

    # 1. the task, then the run directory (a bad data file fails before it is touched)
    run_dir, task, (train_rows, val_rows, test_rows), start, claim = _prepare(run, state, resume, overwrite)
    with rundir.undone_on_failure(claim):
        # 2. the model, made trainable
        set_seed(run.seed)
        adapter_state = load_file(start.checkpoint / "trainable.safetensors") if start.checkpoint else None
        adapted, tokenizer, init_time = make_trainable(run, task, train_rows, adapter_state, hooks)

        # 3. the loop
        train_set, val_set, test_set = (data.encode(rows, task.kind, tokenizer, run.data.max_length)
                                        if rows else None for rows in (train_rows, val_rows, test_rows))
        train_set = data.with_example_ids(train_set)  # for losses with per-example state (ALDR-KL)
        if state.is_main_process and start.checkpoint is not None:
            rundir.forget_metrics_after(run_dir, checkpoint.step_of(start.checkpoint))
        trainer = loop.make_trainer(run, task.kind, adapted, tokenizer, train_set, val_set, run_dir,
                                    state.is_main_process)
        if claim is not None:  # the first checkpoint ends the window in which a failure undoes the start
            trainer.add_callback(loop.AfterSave(claim.keep))
        for callback in hooks.callbacks:
            trainer.add_callback(callback)
        training_started, training_cpu_started = time.time(), time.process_time()
        with loop.writers_closed_on_failure(trainer):
            output = trainer.train(resume_from_checkpoint=str(start.checkpoint) if start.checkpoint else None)
        timing = {"train_time_s": time.time() - training_started,
                  # all threads: steadier than wall time when the machine is busy
                  "train_cpu_time_s": time.process_time() - training_cpu_started,
                  "init_time_s": init_time, "training_started": training_started}

        # 4. final metrics, the adapter and the summary
        metrics = _final_metrics(trainer, {"validation": val_set, "test": test_set}, hooks.splits)
        summary = _summary(run, run_dir, metrics, adapted.model, output.global_step, start.checkpoint, timing,
                           started, state.num_processes)
        if hooks.trained is not None:
            summary["extra"] = hooks.trained(adapted.model, tokenizer)
        if state.is_main_process:
            adapter_dir = run_dir / "adapter"
            rundir.clear(adapter_dir)
            adapted.save(adapter_dir)
            files.write_json(run_dir / "summary.json", summary, sort_keys=True)
            claim.keep()  # a run too short for a checkpoint has now ended: the old run goes
            _report(summary, task.kind, echo)
    state.wait_for_everyone()
    return summary


# ---- 1. the task and the run directory ---------------------------------------------------------


def _prepare(run: RunConfig, state, resume: bool, overwrite: bool):
    """(run directory, task, (train, validation, test) rows, rundir.Start, rundir.Claim or None).

    The task loads and splits first, so a bad data file fails before the directory is touched;
    then the directory is checked (another run there is refused) and gets config.yaml and task.json.
    The Claim (None in the other processes) is what a failure before the first checkpoint undoes.
    """
    run_dir = _shared_output(run)
    run.output = str(run_dir)
    task = data.load(run.task, run.data, run.seed)
    rows = data.split(task.rows, tuple(run.data.split), run.seed)
    noisy_train, noise = data.label_noise(rows[0], run.noise, len(task.label_names), run.seed)  # training only
    rows = (noisy_train, *rows[1:])
    fill_run_fields(run, len(rows[0]))
    start = rundir.decide_start(run_dir, run, resume, overwrite)
    state.wait_for_everyone()
    claim = None
    if state.is_main_process:
        claim = rundir.Claim.of(run_dir, start)
        rundir.begin(claim, run, {"kind": task.kind, "label_names": task.label_names,
                                  "sizes": [len(r) for r in rows], **({"noise": noise} if noise else {})})
    state.wait_for_everyone()
    return run_dir, task, rows, start, claim


def process_state():
    """accelerate's view of the processes; joins the process group under torchrun / accelerate launch.

    Without cpu=True, accelerate on a machine without a GPU does not see torchrun's processes.
    """
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def _shared_output(run: RunConfig) -> pathlib.Path:
    """The run directory; under several processes, rank 0's choice for everyone."""
    from accelerate.utils import broadcast_object_list

    chosen = [str(run.output or rundir.default_output(run))]
    if process_state().num_processes > 1:
        broadcast_object_list(chosen, from_process=0)
    return pathlib.Path(chosen[0])


def fill_run_fields(run: RunConfig, train_examples: int) -> None:
    """Give the method the run's step count and learning rate where it asks for them and the config is silent.

    The filled values are saved with the run (config.yaml), so a resumed run and the `peft`
    peer see the same numbers.
    """
    run.method = with_run_fields(run.method, run_field_values(run, train_examples))


# ---- 2. the model, made trainable --------------------------------------------------------------


def make_trainable(run: RunConfig, task: data.TaskData, train_rows: list[dict], adapter_state: dict | None,
                   hooks: Hooks) -> tuple[adaptation.Adaptation, Any, float]:
    """(adaptation, tokenizer, init seconds): the configured method, a baseline, or the caller's own
    adaptation, and the wall seconds building it took (attach with its calibration batches and any
    data-driven initialisation: EVA, CorDA, LoRA-GA, PiSSA; loading the model not included)."""
    loftq = None
    if adaptation.is_loftq(run.method) and hooks.adapt is None:  # the loader attaches it (_loftq_config)
        loftq = functools.partial(_loftq_config, run.method, task.kind)
    model, tokenizer = models.load(run.model, task.kind, task.label_names, loftq=loftq)
    calibrate = functools.partial(data.calibration_batches, train_rows, task.kind, tokenizer,
                                  batch_size=run.train.batch_size, count=run.train.calibration_batches,
                                  max_length=run.data.max_length, seed=run.seed)
    started = time.time()
    head = models.head_name(model) if task.kind == "classification" else None
    if hooks.adapt is not None:
        adapted = hooks.adapt(model, run, calibrate)
    elif run.method["name"] in adaptation.BASELINES:
        adapted = adaptation.baseline(run.method["name"], model, head)
    else:
        adapted = adaptation.of_method(model, run.method, head, calibrate, adapter_state)
    return adapted, tokenizer, time.time() - started


def _loftq_config(method: dict[str, Any], kind: str, skeleton: torch.nn.Module):
    """LoRA `init: loftq` for models.load, which fits and attaches it as it quantizes each layer (LoftQ
    needs each full-precision weight, read once): the run's config, with a classifier's head trained."""
    return adaptation.method_config(method, models.head_name(skeleton) if kind == "classification" else None)


# ---- 4. the end of a run -----------------------------------------------------------------------


def _final_metrics(trainer, datasets: dict[str, Any], splits: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """{split: {metric: value}} for the splits asked for that have data."""
    metrics: dict[str, Any] = {}
    for split_name, dataset in datasets.items():
        if dataset and split_name in splits:
            result = trainer.evaluate(dataset, metric_key_prefix=split_name)
            metrics[split_name] = {k[len(split_name) + 1:]: v for k, v in result.items()
                                   if k.startswith(split_name + "_") and not k.endswith(("_runtime", "_per_second"))}
    return metrics


def _summary(run: RunConfig, run_dir: pathlib.Path, metrics: dict, model: torch.nn.Module, steps: int,
             resumed_from: pathlib.Path | None, timing: dict[str, float], started: float,
             processes: int) -> dict[str, Any]:
    """What summary.json holds: the task metrics, the model's size, the run's cost and versions."""
    trainable = sum(p.numel() for p in trainable_parameters(model).values())
    total = sum(p.numel() for p in model.parameters())
    steps_done = steps - (checkpoint.step_of(resumed_from) if resumed_from else 0)
    training_time = timing["train_time_s"]
    return {
        "run": str(run_dir), "model": run.model, "task": run.task, "method": run.method["name"],
        "metrics": metrics, "trainable_parameters": trainable, "total_parameters": total,
        "trainable_share": trainable / total, "steps": steps,
        "train_time_s": training_time, "train_cpu_time_s": timing["train_cpu_time_s"],
        "init_time_s": timing["init_time_s"],
        "validation_curve": validation_curve(run_dir, timing["training_started"]),
        "steps_per_second": steps_done / training_time if training_time else None,
        "wall_time_s": time.time() - started, "peak_rss_mb": _peak_rss_mb(), "processes": processes,
        "resumed_from": str(resumed_from) if resumed_from else None, "versions": run_versions(),
    }


def validation_curve(run_dir: pathlib.Path, training_started: float) -> list[dict[str, Any]]:
    """[{step, wall_s, <metric>: value}] of each validation during training (train.eval_every), read
    from metrics.jsonl, where the Trainer logs them as eval_<metric>; wall_s counts from the start of
    this process's training (None for an evaluation an earlier, resumed attempt logged)."""
    path = run_dir / rundir.METRICS_FILE
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    curve = []
    for logged in (json.loads(line) for line in lines if line.strip()):
        values = {key[len("eval_"):]: value for key, value in logged.items() if key.startswith("eval_")
                  and not key.endswith(("_runtime", "_per_second"))}
        if values:
            wall = logged["time"] - training_started
            curve.append({"step": logged["step"], "wall_s": wall if wall >= 0 else None, **values})
    return curve


def _report(summary: dict[str, Any], kind: str, echo) -> None:
    test = summary["metrics"].get("test", {})
    if kind == "classification" and "accuracy" in test:
        echo(f"held-out test accuracy: {test['accuracy']:.4f} (macro F1 {test['macro_f1']:.4f})")
    elif "loss" in test:
        echo(f"held-out test answer loss: {test['loss']:.4f} (perplexity {math.exp(min(test['loss'], 50)):.2f})")
    echo(f"trainable parameters: {summary['trainable_parameters']:,} of {summary['total_parameters']:,} "
         f"({100 * summary['trainable_share']:.2f}%); {summary['steps']} steps in {summary['train_time_s']:.0f} s")
    echo(f"run saved to {summary['run']}")


def _peak_rss_mb() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return usage / (1 << 20) if sys.platform == "darwin" else usage / 1024


# ---- provenance --------------------------------------------------------------------------------


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
