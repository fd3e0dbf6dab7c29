"""bench/intruders.py without training: the grid of runs and their configs, the learning rates read
from (fabricated) suite records, the `peftlab train` arguments, reuse of finished runs, and the
counts, tables and figures made from (fabricated) analysis.json files."""
from __future__ import annotations

import importlib.util
import json
import pathlib
import types

import pytest

from peftlab.bench import runner, suite as suites
from peftlab.recipe import config as runconfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_intruders", ROOT / "bench" / "intruders.py")
intruders = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(intruders)

TASKS = ("movie-sentiment", "sms-spam")
# validation accuracy of each selection run: the best rate differs per method and task
SCORES = {("full", "movie-sentiment"): {3e-5: 0.70, 1e-4: 0.80, 3e-4: 0.75},
          ("full", "sms-spam"): {3e-5: 0.90, 1e-4: 0.85, 3e-4: 0.80},
          ("lora", "movie-sentiment"): {5e-4: 0.70, 2e-3: 0.72, 5e-3: 0.78},
          ("lora", "sms-spam"): {5e-4: 0.95, 2e-3: 0.93, 5e-3: 0.90},
          ("vera", "movie-sentiment"): {3e-3: 0.60, 1e-2: 0.65, 3e-2: 0.62},
          ("vera", "sms-spam"): {3e-3: 0.91, 1e-2: 0.90, 3e-2: 0.97}}


def fabricated_suite() -> suites.Suite:
    return suites.parse({
        "run": {"model": "minilm-l6", "data": {"max_length": 64, "split": [0.8, 0.1, 0.1]},
                "optimizer": {"name": "adamw", "weight_decay": 0.0}, "train": {"steps": 250, "batch_size": 32}},
        "tasks": {"movie-sentiment": {}, "sms-spam": {"train": {"steps": 121}}},
        "seeds": [0, 1], "methods": ["lora", "vera", "adalora"], "baselines": ["full"],
        "method_fields": {"targets": ["query", "value"], "total_steps": "{steps}"},
        "lr": {"default": [5e-4, 2e-3, 5e-3], "full": [3e-5, 1e-4, 3e-4], "vera": [3e-3, 1e-2, 3e-2]},
    }, name="fabricated")


@pytest.fixture
def records(tmp_path) -> pathlib.Path:
    """Selection-run records of full, LoRA and VeRA (none of AdaLoRA) in a results folder."""
    for (method, task), scores in SCORES.items():
        for lr, accuracy in scores.items():
            job = suites.Job(method, task, 0, "select", lr=lr)
            runner.write_record(runner.record_path(tmp_path / "results", job), {
                "schema": runner.SCHEMA, "status": "ok", "run": job.name,
                "metrics": {"validation": {"accuracy": accuracy, "loss": 1 - accuracy}}})
    return tmp_path / "results"


def grid_args(tmp_path, smoke=False, **changes) -> types.SimpleNamespace:
    values = {"groups": ["core", "family"], "tasks": list(TASKS), "ranks": [1, 4, 64], "methods": ["vera", "adalora"],
              "runs": str(tmp_path / "runs"), "smoke": smoke}
    return types.SimpleNamespace(**{**values, **changes})


def test_the_selected_rate_is_the_best_validation_score_of_the_records(records):
    suite = fabricated_suite()
    for (method, task), scores in SCORES.items():
        assert intruders.selected_rate(suite, method, task, records) == max(scores, key=scores.get)


def test_the_grid_runs_core_then_family_at_the_selected_rates(tmp_path, records):
    cells = intruders.plan(grid_args(tmp_path), fabricated_suite(), results_dir=records)
    core = [c for c in cells if c["group"] == "core"]
    assert [c["name"] for c in core[:7]] == ["movie-sentiment--full"] + [
        f"movie-sentiment--lora-r{r}{suffix}" for suffix in ("", "-rslora") for r in (1, 4, 64)]
    assert len(core) == 2 * 7 and cells.index(core[-1]) < min(cells.index(c) for c in cells if c["group"] == "family")
    for c in core:
        best = max(SCORES[(c["method"], c["task"])], key=SCORES[(c["method"], c["task"])].get)
        assert c["lr"] == best and c["config"]["optimizer"]["lr"] == best and c["config"]["seed"] == 0
        assert c["config"]["output"] == str(tmp_path / "runs" / c["name"])
        assert c["config"]["train"]["steps"] == (250 if c["task"] == "movie-sentiment" else 121)
        if c["method"] == "lora":  # one rate for every rank; alpha fixed
            assert c["config"]["method"] == {"name": "lora", "targets": ["query", "value"], "r": c["r"],
                                             "alpha": 16.0, "rslora": c["rslora"]}
        else:
            assert c["config"]["method"] == {"name": "full"}
    family = {c["name"]: c for c in cells if c["group"] == "family"}
    assert family["sms-spam--vera"]["lr"] == 3e-2 and family["movie-sentiment--vera"]["lr"] == 1e-2
    assert family["sms-spam--vera"]["config"]["method"] == {"name": "vera", "targets": ["query", "value"]}
    assert family["sms-spam--adalora"]["status"] == "no selected rate" and family["sms-spam--adalora"]["config"] is None


def test_a_smoke_grid_is_shortened_but_keeps_the_selected_rates(tmp_path, records):
    cells = intruders.plan(grid_args(tmp_path, smoke=True, methods=["vera"]), fabricated_suite(), results_dir=records)
    for c in cells:
        assert c["config"]["train"]["steps"] == 4 and c["config"]["data"]["limit"] == 200
    vera = next(c for c in cells if c["name"] == "sms-spam--vera")
    assert vera["lr"] == 3e-2


def test_train_arguments_give_each_method_its_own_defaults_not_the_default_lora_fields(tmp_path):
    """`peftlab train` merges --set sections onto the default job (LoRA r 8); VeRA must not inherit r 8."""
    config = intruders.run_config(fabricated_suite(), "vera", "sms-spam", 0.01, tmp_path / "vera")
    arguments = intruders.train_arguments(config)
    sets = [arguments[i + 1] for i in range(0, len(arguments), 2)]
    assert arguments[::2] == ["--set"] * len(sets)
    built = runconfig.build(None, sets).to_dict()
    assert built == runconfig.validate(config).to_dict()
    assert "r" not in built["method"] and built["optimizer"]["lr"] == 0.01


def test_the_family_and_the_rest_cover_the_standard_suite():
    suite = suites.load("standard")
    methods = set(suite.method_names(runner.registered_methods()))
    assert set(intruders.FAMILY) | set(intruders.NOT_FAMILY) == methods
    assert not set(intruders.FAMILY) & set(intruders.NOT_FAMILY)


# ---- counts, report and figures from fabricated analyses -------------------------------------------


def analysis(counts: dict[str, int], k=10, threshold=0.5) -> dict:
    return {"intruders": {"k": k, "threshold": threshold, "total": sum(counts.values()), "per_matrix": counts}}


def layer(i: int, kind: str) -> str:
    return f"bert.encoder.layer.{i}.{kind}"


FULL = analysis({layer(0, "attention.self.query"): 1, layer(1, "attention.self.query"): 0,
                 layer(0, "attention.self.value"): 2, layer(0, "attention.self.key"): 4,
                 layer(0, "intermediate.dense"): 3, "bert.pooler.dense": 5})


def test_intruder_counts_split_by_matrix_type_and_target():
    counts = intruders.intruder_counts(FULL, ["query", "value"])
    assert counts["total"] == 15 and counts["targets"] == 3 and counts["target_matrices"] == 3
    assert counts["matrices"] == 6
    assert counts["per_type"] == {"attention.self.query": 1, "attention.self.value": 2, "attention.self.key": 4,
                                  "intermediate.dense": 3, "pooler.dense": 5}


def fabricated_records() -> list[dict]:
    def ok(name, method, group, counts, accuracy, **extra):
        return {"name": f"sms-spam--{name}", "task": "sms-spam", "method": method, "group": group, "lr": 2e-3,
                "status": "ok", "test_accuracy": accuracy, "suite_test_accuracy": None,
                "intruders": intruders.intruder_counts(analysis(counts), ["query", "value"]),
                **{"r": None, "rslora": None, **extra}}

    qv = lambda q, v: {layer(0, "attention.self.query"): q, layer(0, "attention.self.value"): v}
    records = [ok("full", "full", "core", FULL["intruders"]["per_matrix"], 0.98)]
    records += [ok(f"lora-r{r}", "lora", "core", qv(n, n), 0.9 + r / 1000, r=r, rslora=False)
                for r, n in ((1, 5), (8, 4))]
    records += [ok(f"lora-r{r}-rslora", "lora", "core", qv(n, 0), 0.95, r=r, rslora=True) for r, n in ((1, 5), (8, 1))]
    records += [ok("vera", "vera", "family", qv(0, 7), 0.97, r=256),
                {"name": "sms-spam--dora", "task": "sms-spam", "method": "dora", "group": "family", "lr": None,
                 "status": "no selected rate", "r": None, "rslora": None}]
    return records


def test_the_report_tables_hold_the_counts(tmp_path):
    text = intruders.report(fabricated_records(), ["sms-spam"], [1, 8], smoke=False)
    assert "| 1 | 16 | 10 | 90.1 | 16 | 5 | 95.0 |" in text
    assert "| 8 | 2 | 8 | 90.8 | 5.66 | 1 | 95.0 |" in text
    assert "3 intruders in its 3 query/value matrices, 15 over all 6 changed matrices" in text
    assert "| vera | 0.002 | 256 | 7 | 97.0 | - | 7 in 2 |" in text
    assert "| lora (r 8, the core run) | 0.002 | 8 | 8 | 90.8 | - | 8 in 2 |" in text
    assert "| pooler.dense | 5 |" in text and "sms-spam--dora (no selected rate)" in text


def test_the_figures_are_written(tmp_path):
    intruders.plot_ranks(fabricated_records(), ["sms-spam"], tmp_path / "ranks.png")
    intruders.plot_family(fabricated_records(), ["sms-spam"], tmp_path / "family.png")
    for name in ("ranks.png", "family.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- reuse of finished runs ------------------------------------------------------------------------


def finished_run(tmp_path, config: dict, k=10) -> pathlib.Path:
    folder = tmp_path / "runs" / "sms-spam--vera"
    (folder / "analysis").mkdir(parents=True)
    (folder / "checkpoints" / "checkpoint-121").mkdir(parents=True)
    (folder / "config.yaml").write_text(runconfig.validate(config).to_yaml())
    (folder / "summary.json").write_text(json.dumps({"metrics": {"test": {"accuracy": 0.97}}}))
    (folder / "analysis" / "analysis.json").write_text(json.dumps(analysis({layer(0, "attention.self.value"): 3}, k=k)))
    return folder


def test_a_finished_run_and_its_analysis_are_reused_and_its_checkpoints_go(tmp_path, monkeypatch):
    config = intruders.run_config(fabricated_suite(), "vera", "sms-spam", 0.01, tmp_path / "runs" / "sms-spam--vera")
    folder = finished_run(tmp_path, config)
    calls = []
    monkeypatch.setattr(intruders.subprocess, "run", lambda argv, **kw: calls.append(argv))
    entry = {"name": "sms-spam--vera", "group": "family", "task": "sms-spam", "method": "vera", "lr": 0.01,
             "config": config}
    record = intruders.run_entry(entry, tmp_path / "runs", 1, ["query", "value"], smoke=True)
    assert calls == [] and record["status"] == "ok" and record["intruders"]["targets"] == 3
    assert record["test_accuracy"] == 0.97 and record["r"] == 256 and not (folder / "checkpoints").exists()
    assert (folder / "adapter").exists() is False and (folder / "config.yaml").is_file()  # nothing else removed


def test_a_changed_config_trains_again_and_another_k_analyses_again(tmp_path, monkeypatch):
    config = intruders.run_config(fabricated_suite(), "vera", "sms-spam", 0.01, tmp_path / "runs" / "sms-spam--vera")
    folder = finished_run(tmp_path, config, k=5)
    calls = []
    monkeypatch.setattr(intruders.subprocess, "run", lambda argv, **kw: calls.append(argv[3]) or
                        types.SimpleNamespace(returncode=0))
    entry = {"name": "sms-spam--vera", "group": "family", "task": "sms-spam", "method": "vera", "lr": 0.01}
    intruders.run_entry({**entry, "config": config}, tmp_path / "runs", 1, ["query", "value"], smoke=True)
    assert calls == ["analyze"]  # same config: no training; k 5 is not this bench's k 10
    changed = intruders.run_config(fabricated_suite(), "vera", "sms-spam", 0.03, folder)
    calls.clear()
    record = intruders.run_entry({**entry, "config": changed}, tmp_path / "runs", 1, ["query", "value"], smoke=True)
    assert calls == ["train", "analyze"] and record["status"] == "analysis failed"
    assert not (folder / "analysis").exists()  # the old run's analysis went before training again
