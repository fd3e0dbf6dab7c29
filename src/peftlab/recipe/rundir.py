"""The run directory: where a run goes, whether it may start there, and what it records first.

    default_output(run)                       runs/<model>-<task>-<method>-<time>
    resumed_config(run_dir)                   the saved config of a run to continue (--resume RUN_DIR)
    decide_start(run_dir, run, resume, overwrite) -> Start
                                              the one place --resume and --overwrite are decided
    claim = Claim.of(run_dir, start)          what starting there will do, so that it can be undone
    begin(claim, run, task_record)            config.yaml and task.json (an --overwrite moves the old run aside)
    with undone_on_failure(claim): ...        a failure before claim.keep() (the first checkpoint) undoes it
    read_run(run_dir)                         the config and task record of a run (eval, merge, export)

Another run in the directory is refused unless --overwrite replaces it; --resume continues a
run only with the config it was started with and only from a checkpoint.

A run that fails before its first checkpoint leaves nothing: its files are removed and the run
an --overwrite replaced is put back as it was (docs/runs.md).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import shutil
import time
from typing import Any


from . import checkpoint, models
from .config import RunConfig, default_dict, merge, read_yaml, validate
from .data import FILE_TASK
from ..errors import PeftlabError
from ..io import files

CONFIG_FILE = "config.yaml"  # the resolved config (all defaults filled in)
TASK_FILE = "task.json"  # the task kind, label names and split sizes: what eval/merge need besides the config
METRICS_FILE = "metrics.jsonl"
# Everything a run writes in its directory (docs/runs.md describes each).
RUN_CONTENTS = (CONFIG_FILE, TASK_FILE, METRICS_FILE, "tensorboard", "checkpoints", "adapter", "summary.json")
SET_ASIDE_SUFFIX = ".previous"  # <run>.previous: the run an --overwrite replaces, until the first checkpoint


def set_aside_path(run_dir: pathlib.Path) -> pathlib.Path:
    """Where --overwrite keeps the old run until the new one has a checkpoint: beside it, so one rename moves it."""
    return run_dir.with_name(run_dir.name + SET_ASIDE_SUFFIX)


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
    """The config keys where `run` differs from the run saved in `run_dir`.

    The saved config is read like any config (a damaged file is named) and validated, so a key
    added to the schema after the run was saved compares at its default instead of as a change.
    """
    saved = read_yaml(run_dir / CONFIG_FILE)
    try:
        saved = validate(saved).to_dict()
    except PeftlabError:  # a saved value the schema now refuses: compare it as written
        pass
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
    clear: bool  # replace what the directory holds (--overwrite): begin() moves it aside


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
    aside = set_aside_path(run_dir)
    if overwrite and aside.exists():  # only a killed --overwrite (no chance to put it back) leaves one
        raise PeftlabError(f"{aside} holds the run an earlier --overwrite of {run_dir} moved aside and could not "
                           f"put back (it was killed before its first checkpoint): move it back to {run_dir} "
                           "to keep it, or delete it, then run again")
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


@dataclasses.dataclass
class Claim:
    """What a run does to its directory on starting, so that a failure before its first checkpoint undoes it.

    --overwrite moves the old run aside to <run>.previous (one rename within the parent folder)
    and the new run is written where it will stay, so the Trainer's paths never change. The
    first checkpoint (or the end of a run too short for one) deletes the old run: from then on
    the new run can be continued with --resume. A failure before that removes the new run's
    files and renames the old run back, byte for byte as it was.
    """

    run_dir: pathlib.Path
    created: bool  # the directory did not exist: undo removes it whole
    replaces: bool  # --overwrite of a directory that exists: begin() moves it aside
    set_aside: pathlib.Path | None = None  # the old run, once moved aside, until the first checkpoint
    kept: bool = False  # the run has a checkpoint (or is resumed from one): nothing is undone

    @classmethod
    def of(cls, run_dir: pathlib.Path, start: Start) -> "Claim":
        exists = run_dir.exists()
        return cls(run_dir, created=not exists, replaces=start.clear and exists, kept=start.checkpoint is not None)

    def keep(self) -> None:
        """The run has its first checkpoint (or has ended): the run it replaces goes."""
        if self.kept:
            return
        self.kept = True
        if self.set_aside is not None:
            clear(self.set_aside)
            self.set_aside = None

    def undo(self) -> None:
        """Before the first checkpoint: remove what this run wrote and put the old run back."""
        if self.kept or (self.replaces and self.set_aside is None):  # (the old run was never moved)
            return
        if self.created or self.replaces:
            clear(self.run_dir)
        else:  # the directory was there, empty: only what a run writes is removed, nothing else is touched
            for name in RUN_CONTENTS:
                path = self.run_dir / name
                if path.is_dir():
                    clear(path)
                elif path.exists():
                    path.unlink()
        if self.set_aside is not None:
            os.rename(self.set_aside, self.run_dir)
            self.set_aside = None

    def after_failure(self) -> str:
        """Undo what can be undone; returns what the failure left, for the end of the error line."""
        if self.kept:
            # quietly, and never raising: this runs while another error is on its way to the user
            latest = checkpoint.newest_intact(checkpoint.sorted_checkpoints(self.run_dir / "checkpoints"))
            if latest is None:
                return f"{self.run_dir} holds no checkpoint to continue from: start it again with --overwrite"
            return (f"the newest checkpoint (step {checkpoint.step_of(latest)}) is kept: continue with "
                    f"peftlab train --resume {self.run_dir}")
        aside = self.set_aside
        try:
            self.undo()
        except OSError as err:
            where = f"; the earlier run is in {aside}: move it back to {self.run_dir}" if aside else ""
            return f"removing the new run's files failed ({err}){where}"
        if self.replaces:
            return (f"it ended before its first checkpoint: the new run was removed and the earlier run in "
                    f"{self.run_dir} is back as it was")
        return (f"it ended before its first checkpoint: the new run's files in {self.run_dir} were removed, "
                "so the same command starts it afresh")


@contextlib.contextmanager
def undone_on_failure(claim: Claim | None):
    """On any failure, Ctrl-C included: before the first checkpoint the new run's files go (and an
    --overwrite's old run comes back); after it the checkpoints stay. The exception gets a note
    saying which, for the end of the error line. None (the other processes): nothing to do."""
    try:
        yield
    except BaseException as err:
        if claim is not None:
            err.add_note(claim.after_failure())
        raise


def begin(claim: Claim, run: RunConfig, task_record: dict[str, Any]) -> None:
    """The run's first files, its resolved config and its task record (main process only).

    With --overwrite the old run is moved aside first (the Claim says how it comes back).
    """
    with undone_on_failure(claim):
        if claim.replaces:
            os.rename(claim.run_dir, set_aside_path(claim.run_dir))
            claim.set_aside = set_aside_path(claim.run_dir)
        claim.run_dir.mkdir(parents=True, exist_ok=True)
        files.write_text(claim.run_dir / CONFIG_FILE, run.to_yaml())
        files.write_json(claim.run_dir / TASK_FILE, task_record, sort_keys=True)


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
    config_file, task_file = run_dir / CONFIG_FILE, run_dir / TASK_FILE
    restore = "restore it from a copy, or train the run again"
    try:
        run = validate(read_yaml(config_file))
    except PeftlabError as err:  # a changed or half-copied file: say which one, whatever is wrong in it
        raise PeftlabError(f"{config_file} is damaged ({err}): {restore}") from None
    try:
        task = json.loads(task_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PeftlabError(f"{task_file} is damaged (not valid JSON: {err}): {restore}") from None
    if not isinstance(task, dict) or not {"kind", "label_names"} <= set(task):
        raise PeftlabError(f"{task_file} is damaged (not a task record with kind and label_names): {restore}")
    return run, task
