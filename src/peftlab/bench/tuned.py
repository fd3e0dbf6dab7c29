"""A bench's learning rate chosen by Optuna's TPE instead of the grid: `select: {tuner: optuna, trials: N}`.

For each (method, task) the trials are selection runs like the grid's (the suite's first seed,
validation only, one record each: bench/results/<suite>/<method>--<task>--s<seed>--lr<rate>--select.json):

1. the first trials are the method's grid rates (its first `trials` of them), so a suite that
   selected on the grid before reuses those records as trials (same rate, same config hash);
2. then Optuna's TPE suggests log-uniform rates in `range` (default [min(grid)/4, max(grid)*4]),
   one at a time, until `trials` have run. Different (method, task) pairs run side by side.

The next suggestion is a pure function of the finished trials: a fresh in-memory study is built
from the records every time (each trial added with its rate and score, a failed run as failed),
its sampler seeded from (method, task, number of finished trials), and asked once. So an
interrupted bench resumes with the same trials, and `--dry-run` names the next one. Suggested
rates are rounded to 3 significant digits (4 when 3 repeat a rate tried already) to keep the job
names readable. The chosen rate is the best trial, ties broken as the grid breaks them
(runner.best_rate).

The runner calls `walk` with a `score(lr) -> (has a record, (score, loss) or None)` of its own;
this module reads no records and runs nothing.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import math
from typing import TYPE_CHECKING, Any, Callable

from ..errors import PeftlabError

if TYPE_CHECKING:
    from .suite import Suite

Value = tuple[float, float]  # (validation score, validation loss) of a finished selection run
Score = Callable[[float], tuple[bool, Value | None]]  # lr -> (has a record, its value; None: failed)
ASKS = 20  # suggestions tried before the search counts as converged (each rounds onto a rate tried)


@dataclasses.dataclass(frozen=True)
class Trial:
    lr: float
    value: Value | None  # None: the run failed or has no finite score (told to the study as failed)


def check_installed(specs: list[dict[str, Any]]) -> None:
    """Before anything runs: a suite with tuner optuna needs optuna."""
    if any(spec["tuner"] == "optuna" for spec in specs) and importlib.util.find_spec("optuna") is None:
        raise PeftlabError("select.tuner optuna needs optuna: `pip install 'peftlab[ray]'` (or optuna), "
                           "or use tuner: grid")


def search_range(spec: dict[str, Any], grid: list[float]) -> tuple[float, float]:
    """The suite's `range`, else a factor of 4 past each end of the method's grid."""
    if "range" in spec:
        low, high = spec["range"]
        return float(low), float(high)
    return min(grid) / 4, max(grid) * 4


def walk(spec: dict[str, Any], grid: list[float], first: list[float], pair: tuple[str, str],
         score: Score) -> tuple[dict[float, Value], list[float], float | None]:
    """((score, loss) by rate, the suggested rates in trial order, the next rate to run or None: done).

    `first`: the enqueued grid rates (the plan's selection runs); `pair`: (method, task).
    """
    bounds, trials = search_range(spec, grid), []
    for lr in first:
        known, value = score(lr)
        if not known:  # a dry run, before the grid's runs: the next trial is one of them
            return _scores(trials), [], lr
        trials.append(Trial(lr, _finite(value)))
    while len(trials) < spec["trials"]:
        lr = suggest(spec["mode"], bounds, pair, tuple(trials), len(first))
        if lr is None:
            break
        known, value = score(lr)
        if not known:
            return _scores(trials), _suggested(trials, first), lr
        trials.append(Trial(lr, _finite(value)))
    return _scores(trials), _suggested(trials, first), None


def _finite(value: Value | None) -> Value | None:
    return value if value is not None and math.isfinite(value[0]) else None


def _scores(trials: list[Trial]) -> dict[float, Value]:
    return {t.lr: t.value for t in trials if t.value is not None}


def _suggested(trials: list[Trial], first: list[float]) -> list[float]:
    return [t.lr for t in trials[len(first):]]


def trial_seed(pair: tuple[str, str], finished: int) -> int:
    """The sampler's seed for the next trial: stable across processes (unlike hash() of a str)."""
    digest = hashlib.sha256(f"{pair[0]}|{pair[1]}|{finished}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


@functools.lru_cache(maxsize=4096)  # a pure function: a bench asks it again each time a final run checks
def suggest(mode: str, bounds: tuple[float, float], pair: tuple[str, str], trials: tuple[Trial, ...],
            startup: int) -> float | None:
    """TPE's next rate after `trials`, readable and not tried yet; None when every ask repeats one."""
    study, distribution = _study(mode, bounds, pair, trials, startup)
    taken = {t.lr for t in trials}
    for _ in range(ASKS):  # a repeat asks again; constant liar steers TPE off the pending asks
        lr = readable(study.ask({"lr": distribution}).params["lr"], bounds, taken)
        if lr is not None:
            return lr
    return None


def _study(mode: str, bounds: tuple[float, float], pair: tuple[str, str], trials: tuple[Trial, ...],
           startup: int):
    """A fresh in-memory study holding `trials`; the grid's rates stand for TPE's random start-up trials."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no line per study and trial in the bench's log
    sampler = optuna.samplers.TPESampler(seed=trial_seed(pair, len(trials)), n_startup_trials=startup)
    study = optuna.create_study(direction="maximize" if mode == "max" else "minimize", sampler=sampler)
    distribution = optuna.distributions.FloatDistribution(bounds[0], bounds[1], log=True)
    for trial in trials:
        failed = trial.value is None
        study.add_trial(optuna.trial.create_trial(
            params={"lr": trial.lr}, distributions={"lr": distribution}, value=None if failed else trial.value[0],
            state=optuna.trial.TrialState.FAIL if failed else optuna.trial.TrialState.COMPLETE))
    return study, distribution


def readable(lr: float, bounds: tuple[float, float], taken: set[float]) -> float | None:
    """lr at 3 significant digits (4 when 3 leave the range or repeat a rate in `taken`); None: both do."""
    for digits in (3, 4):
        rounded = float(f"{lr:.{digits}g}")
        if bounds[0] <= rounded <= bounds[1] and rounded not in taken:
            return rounded
    return None


# ---- the report's words ----------------------------------------------------------------------------


def describe(spec: dict[str, Any], lr_extend: int) -> str:
    """One task's selection in words, e.g. "Optuna TPE, 8 trials (the grid's rates first)"."""
    how = f"on `{spec['metric']}` ({spec['mode']})"
    if spec["tuner"] == "optuna":
        bounds = (f"in [{spec['range'][0]:g}, {spec['range'][1]:g}]" if "range" in spec
                  else "in [min(grid)/4, max(grid)*4]")
        return (f"Optuna TPE, {spec['trials']} trials (the grid's rates first, then log-uniform {bounds}; "
                f"TPE's rates marked * below) {how}")
    extended = f" (+ up to {lr_extend} rates past an end)" if lr_extend else ""
    return f"the lr grid{extended} {how}"


def selection_notes(suite: Suite) -> list[str]:
    """A line naming each task's selection, when a task has its own or a tuner replaces the grid."""
    specs = {task: suite.selection(task) for task in suite.tasks}
    if not suite.task_select and all(spec["tuner"] == "grid" for spec in specs.values()):
        return []  # the paragraph above says it already
    return ["Learning-rate selection per task: " + "; ".join(
        f"{task}: {describe(spec, suite.lr_extend)}" for task, spec in specs.items()) + "."]
