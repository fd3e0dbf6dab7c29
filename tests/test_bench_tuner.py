"""The bench's learning rate chosen by Optuna's TPE (`select: {tuner: optuna, trials: N}`), per-task
selection metrics, and the suite keys that configure them.

No training: the runner's in-process executor calls a fake run whose validation accuracy is a smooth
function of the learning rate, peaked at PEAK.
"""
from __future__ import annotations

import importlib.util
import json
import math
import pathlib

import pytest

from peftlab.bench import report, runner, suite as suites, tuned
from peftlab.errors import PeftlabError

PEAK = 3e-3
GRID = [1e-4, 3e-4, 1e-3]  # its best rate, 1e-3, is a factor 3 below the peak


def accuracy_at(lr: float) -> float:
    return 0.9 - 0.05 * math.log10(lr / PEAK) ** 2


def macro_f1_at(lr: float) -> float:  # peaked at the grid's smallest rate, where accuracy is worst
    return 0.8 - 0.05 * math.log10(lr / 1e-4) ** 2


class Interrupted(BaseException):
    """Escapes the in-process executor (it records an Exception as a failed run), as Ctrl-C would."""


class Fake:
    """A training run: validation scores from the rate; stops the bench after `stop_after` selection runs."""

    def __init__(self, stop_after: int | None = None, fail: tuple[float, ...] = ()):
        self.selected: list[float] = []
        self.stop_after, self.fail = stop_after, set(fail)

    def __call__(self, job, config, run_dir, suite):
        lr = config["optimizer"]["lr"]
        if job.phase != "select":
            return {"metrics": {"test": {"accuracy": accuracy_at(lr)}}}
        if self.stop_after is not None and len(self.selected) == self.stop_after:
            raise Interrupted
        self.selected.append(lr)
        if lr in self.fail:
            raise RuntimeError("diverged")
        return {"metrics": {"validation": {"accuracy": accuracy_at(lr), "macro_f1": macro_f1_at(lr),
                                           "loss": 1.0 - accuracy_at(lr)}}}


def make_suite(**changes) -> suites.Suite:
    data = {"run": {"model": "minilm-l6", "train": {"steps": 10, "batch_size": 4}, "optimizer": {"name": "adamw"}},
            "tasks": ["movie-sentiment"], "seeds": [0], "methods": ["lora"], "baselines": [], "peer": False,
            "method_fields": {"targets": ["query"], "r": 4}, "lr": {"default": GRID},
            "select": {"tuner": "optuna", "trials": 8}}
    data.update(changes)
    return suites.parse(data, name="t")


def run(suite, tmp_path, fake, **kw):
    lines: list[str] = []
    records = runner.run_suite(suite, tmp_path / "results", tmp_path / "runs", run_one=fake, peer_methods=set(),
                               echo=lines.append, isolate=False, **kw)
    return records, lines


def record(tmp_path, name: str) -> dict:
    return json.loads((tmp_path / "results" / f"{name}.json").read_text())


@pytest.fixture(autouse=True)
def fresh_process(monkeypatch):
    """Only LoRA is registered; no suggestion is remembered from another test (as in a new process)."""
    monkeypatch.setattr(runner, "registered_methods", lambda: ["lora"])
    tuned.suggest.cache_clear()


needs_optuna = pytest.mark.skipif(importlib.util.find_spec("optuna") is None,
                                  reason="the optuna tuner needs optuna (pip install 'peftlab[ray]')")


# ---- the walk --------------------------------------------------------------------------------------


@needs_optuna
def test_the_walk_runs_the_grid_then_tpe_and_chooses_the_best_trial(tmp_path):
    fake = Fake()
    records, _ = run(make_suite(), tmp_path, fake)
    assert len(fake.selected) == 8 and fake.selected[:3] == GRID  # the grid's rates are the first trials
    assert len(set(fake.selected)) == 8 and all(2.5e-5 <= lr <= 4e-3 for lr in fake.selected)  # [min/4, max*4]
    assert all(float(f"{lr:.4g}") == lr for lr in fake.selected)  # readable job names
    selects = sorted((tmp_path / "results").glob("*--select.json"))
    assert len(selects) == 8
    final = record(tmp_path, "lora--movie-sentiment--s0")
    best = max(fake.selected, key=accuracy_at)
    assert final["lr"] == best and final["selection"]["chosen"] == best
    assert final["selection"]["tuner"] == "optuna" and final["selection"]["trials"] == 8
    assert final["selection"]["range"] == [2.5e-5, 4e-3] and final["selection"]["added"] == fake.selected[3:]
    assert len(final["selection"]["scores"]) == 8
    assert tpe_works(fake.selected[3:], best), fake.selected


def tpe_works(suggested: list[float], best: float) -> bool:
    """The best trial, and most of TPE's 5 (its prior still draws a few far off), are nearer the peak
    than the grid's best (1e-3, a factor 3 off). TPE told the opposite direction gets at most one there."""
    near = [lr for lr in suggested if abs(math.log(lr / PEAK)) < math.log(3)]
    return abs(math.log(best / PEAK)) < 0.5 * math.log(3) and len(near) >= 3


@needs_optuna
def test_the_walk_minimises_when_the_mode_is_min(tmp_path):
    """On validation.loss (1 - accuracy here), min mode must go the same way as max on accuracy."""
    fake = Fake()
    run(make_suite(select={"tuner": "optuna", "trials": 8, "metric": "validation.loss", "mode": "min"}),
        tmp_path, fake)
    best = max(fake.selected, key=accuracy_at)
    assert record(tmp_path, "lora--movie-sentiment--s0")["lr"] == best
    assert tpe_works(fake.selected[3:], best), fake.selected


@needs_optuna
def test_an_interrupted_bench_resumes_with_the_same_trials(tmp_path):
    whole = Fake()
    run(make_suite(), tmp_path / "whole", whole)
    tuned.suggest.cache_clear()
    first = Fake(stop_after=5)
    with pytest.raises(Interrupted):
        run(make_suite(), tmp_path / "cut", first)
    assert first.selected == whole.selected[:5]
    tuned.suggest.cache_clear()  # a new process: the next suggestion comes from the records alone
    _, lines = run(make_suite(), tmp_path / "cut", Fake(), dry_run=True)
    skipped = [line for line in lines if "select: done before, skipped" in line]
    assert len(skipped) == 5  # the dry run lists the trials that ran, then names the next one
    assert any(f"lr{whole.selected[5]:g}--select: would run" in line for line in lines), lines
    assert lines[-1].endswith("lora--movie-sentiment--s0: would run after its selection runs")
    tuned.suggest.cache_clear()
    rest = Fake()
    run(make_suite(), tmp_path / "cut", rest)
    assert first.selected + rest.selected == whole.selected  # nothing ran twice, the same rates
    assert record(tmp_path / "cut", "lora--movie-sentiment--s0")["selection"] == \
        record(tmp_path / "whole", "lora--movie-sentiment--s0")["selection"]


@needs_optuna
def test_a_grid_suites_selection_runs_are_reused_as_trials(tmp_path):
    grid = Fake()
    run(make_suite(select=None), tmp_path, grid)
    assert grid.selected == GRID
    final = record(tmp_path, "lora--movie-sentiment--s0")["selection"]
    assert final["chosen"] == 1e-3 and "tuner" not in final and "trials" not in final  # a grid record as before
    tpe = Fake()
    run(make_suite(select={"tuner": "optuna", "trials": 5}), tmp_path, tpe)
    assert len(tpe.selected) == 2 and not set(tpe.selected) & set(GRID)  # same rate, same hash: not run again


@needs_optuna
def test_a_failed_trial_counts_and_is_not_chosen(tmp_path):
    fake = Fake(fail=(1e-3,))
    run(make_suite(select={"tuner": "optuna", "trials": 5}), tmp_path, fake)
    assert len(fake.selected) == 5
    final = record(tmp_path, "lora--movie-sentiment--s0")
    assert "0.001" not in final["selection"]["scores"] and final["lr"] != 1e-3
    assert final["lr"] == max([lr for lr in fake.selected if lr != 1e-3], key=accuracy_at)


@needs_optuna
def test_suggestions_are_a_pure_function_of_the_finished_trials():
    trials = tuple(tuned.Trial(lr, (accuracy_at(lr), 0.0)) for lr in GRID)
    pair, bounds = ("lora", "movie-sentiment"), (2.5e-5, 4e-3)
    once = tuned.suggest("max", bounds, pair, trials, 3)
    tuned.suggest.cache_clear()
    assert tuned.suggest("max", bounds, pair, trials, 3) == once
    assert tuned.trial_seed(pair, 3) == tuned.trial_seed(("lora", "movie-sentiment"), 3) != tuned.trial_seed(pair, 4)


def test_rates_are_rounded_to_three_digits_or_four_to_stay_new():
    bounds = (1e-5, 1e-2)
    assert tuned.readable(0.00123456, bounds, set()) == 0.00123
    assert tuned.readable(0.00123456, bounds, {0.00123}) == 0.001235
    assert tuned.readable(0.0012301, bounds, {0.00123}) is None  # both repeat: ask again
    assert tuned.readable(1.00004e-5, (1.00001e-5, 1e-2), set()) is None  # both leave the range


# ---- per-task selection ----------------------------------------------------------------------------


def test_a_task_selects_on_its_own_metric(tmp_path):
    s = make_suite(select=None, tasks={"movie-sentiment": {},
                                       "sms-spam": {"train": {"steps": 7},
                                                    "select": {"metric": "validation.macro_f1"}}})
    fake = Fake()
    run(s, tmp_path, fake)
    movie, sms = record(tmp_path, "lora--movie-sentiment--s0"), record(tmp_path, "lora--sms-spam--s0")
    assert movie["lr"] == 1e-3 and movie["selection"]["metric"] == "validation.accuracy"
    assert sms["lr"] == 1e-4 and sms["selection"]["metric"] == "validation.macro_f1"
    assert sms["config"]["train"]["steps"] == 7 and "select" not in sms["config"]  # a run field still overrides
    assert movie["config"]["train"]["steps"] == 10
    plain = make_suite(select=None, tasks={"movie-sentiment": {}, "sms-spam": {"train": {"steps": 7}}})
    job = suites.Job("lora", "sms-spam", 0, "select", lr=1e-4)
    assert (suites.run_config(plain, job, 1e-4, pathlib.Path("o"), {"r"})
            == suites.run_config(s, job, 1e-4, pathlib.Path("o"), {"r"}))  # the same runs, the same hashes


def test_a_task_can_take_its_own_tuner_and_the_report_says_which():
    s = make_suite(select={"tuner": "optuna", "trials": 6}, lr_extend=2,
                   tasks={"movie-sentiment": {"select": {"tuner": "grid"}},
                          "sms-spam": {"select": {"metric": "validation.macro_f1"}}})
    assert s.selection("movie-sentiment") == {"tuner": "grid", "metric": "validation.accuracy", "mode": "max"}
    assert s.selection("sms-spam") == {"tuner": "optuna", "trials": 6, "metric": "validation.macro_f1",
                                       "mode": "max"}
    assert s.selection_rates("lora", "movie-sentiment") == GRID
    assert s.selection_rates("lora", "sms-spam") == GRID and make_suite(
        select={"tuner": "optuna", "trials": 2}).selection_rates("lora", "sms-spam") == GRID[:2]
    text = report.markdown(s, [], [], [])
    assert "movie-sentiment: the lr grid (+ up to 2 rates past an end) on `validation.accuracy` (max)" in text
    assert "sms-spam: Optuna TPE, 6 trials (the grid's rates first" in text
    assert "on `validation.macro_f1` (max)" in text
    assert "Learning-rate selection per task" not in report.markdown(make_suite(select=None), [], [], [])


# ---- suite validation ------------------------------------------------------------------------------


@pytest.mark.parametrize("select, message", [
    ({"tuner": "hyperopt", "trials": 8}, r"select.tuner 'hyperopt' is unknown: use grid .* or optuna"),
    ({"tuner": "optuna", "trials": 0}, r"select.trials must be an integer >= 1"),
    ({"tuner": "optuna"}, r"select.trials must be an integer >= 1 with tuner: optuna"),
    ({"tuner": "optuna", "trials": True}, r"select.trials must be an integer"),
    ({"tuner": "optuna", "trials": 8, "range": [1e-2, 1e-3]}, r"select.range must be \[low, high\] with 0 < low"),
    ({"tuner": "optuna", "trials": 8, "range": [0, 1e-2]}, r"select.range must be \[low, high\]"),
    ({"tuner": "optuna", "trials": 8, "range": [1e-3]}, r"select.range must be \[low, high\]"),
    ({"tuner": "optuna", "trials": 8, "range": [3e-4, 1e-2]}, r"leaves out lr.default's 0.0001: widen it"),
    ({"trials": 8}, r"select.trials applies to tuner: optuna only"),
    ({"tuner": "grid", "range": [1e-5, 1e-2]}, r"select.range applies to tuner: optuna only"),
    ({"tuner": "optuna", "trials": 8, "budget": 3}, r"select has unknown key\(s\) \['budget'\]"),
    ({"mode": "up"}, r"select.mode must be max or min"),
])
def test_bad_select_keys_name_the_key_and_the_fix(select, message):
    with pytest.raises(PeftlabError, match=message):
        make_suite(select=select)


def test_bad_task_select_is_named_with_its_task():
    with pytest.raises(PeftlabError, match=r"tasks.sms-spam.select.tuner 'random' is unknown"):
        make_suite(tasks={"sms-spam": {"select": {"tuner": "random"}}})
    with pytest.raises(PeftlabError, match=r"tasks.sms-spam.select.metric must look like validation.accuracy"):
        make_suite(tasks={"sms-spam": {"select": {"metric": "f1"}}})


@needs_optuna
def test_a_good_range_is_kept_and_bounds_the_trials(tmp_path):
    s = make_suite(select={"tuner": "optuna", "trials": 6, "range": [1e-4, 1e-3]})
    fake = Fake()
    run(s, tmp_path, fake)
    assert len(fake.selected) == 6 and all(1e-4 <= lr <= 1e-3 for lr in fake.selected)
    assert record(tmp_path, "lora--movie-sentiment--s0")["selection"]["range"] == [1e-4, 1e-3]
