"""`peftlab tune`: the space file, trial configs, and a search end to end on a local Ray instance."""
from __future__ import annotations

import json
import math
import pathlib

import pytest
import yaml

from peftlab.bench import tune
from peftlab.errors import PeftlabError
from peftlab.recipe import config as run_config

from fault_helpers import run_cli
from run_helpers import tiny_checkpoint, tiny_overrides


def write_space(tmp_path: pathlib.Path, data: dict) -> pathlib.Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("parameters, problem", [
    ({"optimizer.lr": {"log_uniform": [0.0, 1.0e-2]}}, "low > 0"),
    ({"optimizer.lr": {"uniform": [1.0e-2, 1.0e-3]}}, "low < high"),
    ({"method.r": {"int": [2.5, 8]}}, "integer bounds"),
    ({"method.r": {"normal": [0, 1]}}, "must be one of"),
    ({"method.r": {"choice": []}}, "takes a list"),
    ({}, "`parameters` must map"),
])
def test_a_bad_space_is_refused_naming_the_parameter(tmp_path, parameters, problem):
    with pytest.raises(PeftlabError, match=problem):
        tune.read_space(write_space(tmp_path, {"parameters": parameters}))


def test_the_score_is_a_validation_metric(tmp_path):
    path = write_space(tmp_path, {"metric": "test.accuracy", "parameters": {"method.r": {"choice": [2, 4]}}})
    with pytest.raises(PeftlabError, match="validation metric"):
        tune.read_space(path)


def test_trial_values_land_where_set_puts_them():
    base = run_config.default_dict()
    data = tune.trial_config(base, {"optimizer.lr": 3.0e-4, "method.r": 16, "schedule.warmup_ratio": 0.05},
                             pathlib.Path("runs/x"))
    run = run_config.validate(data)
    assert run.optimizer["lr"] == 3.0e-4 and run.method["r"] == 16
    assert run.schedule.warmup_ratio == 0.05 and str(run.output) == "runs/x"
    assert base["optimizer"]["lr"] != 3.0e-4  # the base is not changed


def test_validation_scores_take_both_prefixes_and_leave_test_out():
    scores = tune.validation_scores({"eval_accuracy": 0.5, "eval_runtime": 3.0, "validation_loss": 0.7,
                                     "test_accuracy": 0.9, "epoch": 1.0})
    assert scores == {"validation.accuracy": 0.5, "validation.loss": 0.7}


def test_best_trial_follows_the_mode_and_ignores_unfinished():
    rows = [{"trial": "a", "status": "finished", "score": 0.6}, {"trial": "b", "status": "stopped", "score": 0.9},
            {"trial": "c", "status": "finished", "score": 0.7}, {"trial": "d", "status": "failed", "score": None}]
    assert tune.best_trial({"mode": "max", "trials": rows})["trial"] == "c"
    assert tune.best_trial({"mode": "min", "trials": rows})["trial"] == "a"
    assert tune.best_trial({"mode": "max", "trials": rows[1:2]}) is None


def test_asha_without_steps_or_validations_says_what_to_set():
    base = run_config.default_dict()
    base["train"] = {**base.get("train", {}), "steps": None, "eval_every": None}
    with pytest.raises(PeftlabError, match="train.eval_every"):
        tune.with_rungs(base, "asha")
    assert tune.with_rungs({**base, "train": {"steps": 80}}, "asha")["train"]["eval_every"] == 10


def _base_config(tmp_path: pathlib.Path) -> pathlib.Path:
    """The tiny model's 6-step run as a config file, validated every 2 steps."""
    data = run_config.default_dict()
    for text in tiny_overrides(tiny_checkpoint(tmp_path), tmp_path / "unused", **{"train.eval_every": 2}):
        data = run_config.merge(data, run_config.parse_override(text))
    data.pop("output")
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_bad_key_fails_before_any_trial(tmp_path):
    pytest.importorskip("ray", reason="ray is not installed (pip install 'peftlab[ray]')")
    space = write_space(tmp_path, {"parameters": {"method.rank": {"choice": [2, 4]}}})
    done = run_cli("tune", _base_config(tmp_path), "--space", space, "--trials", "2", "--out", tmp_path / "out")
    assert done.returncode == 2 and "rank" in done.stderr
    assert not (tmp_path / "out").exists()


def test_search_end_to_end_with_asha_and_the_best_config_trains_again(tmp_path):
    pytest.importorskip("ray", reason="ray is not installed (pip install 'peftlab[ray]')")
    pytest.importorskip("optuna", reason="optuna is not installed (pip install 'peftlab[ray]')")
    space = write_space(tmp_path, {"metric": "validation.loss", "mode": "min", "parameters": {
        "optimizer.lr": {"log_uniform": [1.0e-3, 3.0e-2]}, "method.r": {"choice": [2, 4]}}})
    out = tmp_path / "out"
    done = run_cli("tune", _base_config(tmp_path), "--space", space, "--trials", "4", "--scheduler", "asha",
                   "--out", out, "--concurrent", "1", timeout=600)
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "tune.json").read_text())
    assert len(summary["trials"]) == 4 and summary["metric"] == "validation.loss"
    assert {row["status"] for row in summary["trials"]} <= {"finished", "stopped"}
    # trials run one at a time with a seeded sampler, so the rungs are deterministic: ASHA stops one
    assert any(row["status"] == "stopped" and row["steps"] < 6 for row in summary["trials"])
    for row in summary["trials"]:  # each trial is an ordinary run with the values it was given
        if row["run_dir"] is None:  # stopped before its first checkpoint: nothing left, as for any run
            assert row["status"] == "stopped"
            continue
        trial_run = yaml.safe_load((pathlib.Path(row["run_dir"]) / "config.yaml").read_text())
        assert math.isclose(trial_run["optimizer"]["lr"], row["values"]["optimizer.lr"])
        assert trial_run["method"]["r"] == row["values"]["method.r"]
    best = tune.best_trial(summary)
    assert best is not None and summary["best"] == best["trial"] and "best:" in done.stdout
    assert all(best["score"] <= row["score"] for row in summary["trials"] if row["status"] == "finished")

    again = tmp_path / "again"
    done = run_cli("train", out / "best.yaml", "--output", again)
    assert done.returncode == 0, done.stderr
    retrained = json.loads((again / "summary.json").read_text())["metrics"]["validation"]["loss"]
    assert math.isclose(retrained, best["score"], rel_tol=1e-6)
