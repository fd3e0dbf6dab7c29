"""The run directory: where a run goes, whether it may start there, and what it records first.

    default_output(run)                       runs/<model>-<task>-<method>-<time>
    resumed_config(run_dir)                   the saved config of a run to continue (--resume RUN_DIR)
    decide_start(run_dir, run, resume, overwrite) -> Start
                                              the one place --resume and --overwrite are decided
    begin(run_dir, run, task_record, start)   config.yaml and task.json (clearing the old run first)
    read_run(run_dir)                         the config and task record of a run (eval, merge, export)

Another run in the directory is refused unless --overwrite replaces it; --resume continues a
run only with the config it was started with and only from a checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import time
from typing import Any

import yaml

from . import checkpoint, models
from .config import RunConfig, default_dict, merge, read_yaml, validate
from .data import FILE_TASK
from ..errors import PeftlabError
from ..io import files

CONFIG_FILE = "config.yaml"  # the resolved config (all defaults filled in)
TASK_FILE = "task.json"  # the task kind, label names and split sizes: what eval/merge need besides the config
METRICS_FILE = "metrics.jsonl"


def default_output(run: RunConfig) -> pathlib.Path:
    model = run.model if run.model in models.NAMES else pathlib.Path(run.model).name
    task = run.task if run.task != FILE_TASK else pathlib.Path(run.data.path).stem
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


def _changed_keys(run_dir: pathlib.Path, run: RunConfig) -> list[str]:
    """The config keys where `run` differs from the run saved in `run_dir`."""
    saved = yaml.safe_load((run_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    return _differences(_comparable(saved), _comparable(run.to_dict()))


# ---- deciding how a run starts -----------------------------------------------------------------


def resumed_config(run_dir: str | pathlib.Path) -> dict[str, Any]:
    """The config a run was started with, as the base of `peftlab train --resume RUN_DIR`."""
    saved = pathlib.Path(run_dir) / CONFIG_FILE
    if not saved.is_file():
        raise PeftlabError(f"--resume {run_dir}: no run there (no config.yaml); "
                           "give the directory `peftlab train` printed")
    return merge(default_dict(), read_yaml(saved))


@dataclasses.dataclass(frozen=True)
class Start:
    """How a run begins in its directory."""

    checkpoint: pathlib.Path | None  # continue from this checkpoint (--resume); None: from step 0
    clear: bool  # replace what the directory holds first (--overwrite)


def decide_start(run_dir: pathlib.Path, run: RunConfig, resume: bool, overwrite: bool) -> Start:
    """Refuse to clobber another run; with resume, the checkpoint to continue from."""
    holds_run = (run_dir / CONFIG_FILE).is_file()
    if resume:
        if not holds_run:
            raise PeftlabError(f"--resume: {run_dir} holds no run (no config.yaml): start it without --resume")
        changed = _changed_keys(run_dir, run)
        if changed:
            raise PeftlabError(f"--resume: this config differs from the run in {run_dir} at {', '.join(changed)}; "
                               f"resume with the run's own config: peftlab train --resume {run_dir}")
        latest = checkpoint.latest(run_dir / "checkpoints")
        if latest is None:
            raise PeftlabError(f"--resume: {run_dir} has no checkpoint yet (the first is saved at step "
                               f"{run.train.save_every}): start it again with --overwrite")
        return Start(checkpoint=latest, clear=False)
    if run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        if holds_run:
            changed = _changed_keys(run_dir, run)
            what = f"a different run (config differs at {', '.join(changed)})" if changed else "this run already"
        else:
            what = "other files"
        raise PeftlabError(f"output directory {run_dir} holds {what}: choose another output, "
                           "continue it with --resume, or replace it with --overwrite")
    return Start(checkpoint=None, clear=overwrite)


# ---- writing and reading -----------------------------------------------------------------------


def clear(folder: pathlib.Path) -> None:
    """Remove a folder: renamed away first, so no reader sees it half deleted."""
    if folder.exists():
        trash = folder.with_name(f".trash-{folder.name}-{os.getpid()}")
        os.rename(folder, trash)
        shutil.rmtree(trash, ignore_errors=True)


def begin(run_dir: pathlib.Path, run: RunConfig, task_record: dict[str, Any], start: Start) -> None:
    """The run's first files: its resolved config and its task record (main process only)."""
    if start.clear:
        clear(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    files.write_text(run_dir / CONFIG_FILE, run.to_yaml())
    files.write_json(run_dir / TASK_FILE, task_record, sort_keys=True)


def forget_metrics_after(run_dir: pathlib.Path, step: int) -> None:
    """On resume, forget metric lines logged after the checkpoint: they are about to be redone."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line)["step"] <= step]
    files.write_text(path, "".join(line + "\n" for line in kept))


def read_run(run_dir: str | pathlib.Path) -> tuple[RunConfig, dict[str, Any]]:
    """The config and task record of a finished (or checkpointed) run directory."""
    run_dir = pathlib.Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file() or not (run_dir / TASK_FILE).is_file():
        raise PeftlabError(f"{run_dir} is not a peftlab run directory (no config.yaml/task.json): "
                           "pass the directory `peftlab train` printed")
    run = validate(yaml.safe_load((run_dir / CONFIG_FILE).read_text(encoding="utf-8")))
    return run, json.loads((run_dir / TASK_FILE).read_text(encoding="utf-8"))
