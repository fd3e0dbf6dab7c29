"""peftlab bench: suites, the plan, result records, resume/skip, learning-rate selection, the report,
the baselines and the `peft` peer mapping; one real run of a tiny suite through the training recipe.

Most tests drive the runner with a fake `run_one` (no training), so they take milliseconds.
"""
from __future__ import annotations

import json
import pathlib

import pytest
import torch

import peftlab
from peftlab.recipe import adaptation, peer
from peftlab.bench import report, runner, suite as suites
from peftlab.bench.suite import Job
from peftlab.errors import PeftlabError

from conftest import tiny_bert

REGISTERED = ["dora", "lora", "pissa", "vera"]
PEERS = {"lora", "dora", "pissa"}


def make_suite(**changes) -> suites.Suite:
    data = {
        "description": "test suite",
        "run": {"model": "minilm-l6", "train": {"steps": 10, "batch_size": 4}, "optimizer": {"name": "adamw"}},
        "tasks": ["movie-sentiment"],
        "seeds": [0, 1],
        "methods": "all",
        "baselines": ["head-only"],
        "exclude": {"vera": "too slow here"},
        "method_fields": {"targets": ["query"], "r": 4, "total_steps": "{steps}"},
        "lr": {"default": [1e-3], "lora": [1e-4, 1e-3]},
        "peer": True,
    }
    data.update(changes)
    return suites.parse(data, name="t")


class FakeTraining:
    """Stands in for a training run: scores from a table, counts its calls."""

    def __init__(self, validation=None, fail=(), bonus=None, losses=None):
        self.calls: list[Job] = []
        self.validation = validation or {}
        self.losses = losses or {}  # lr -> validation loss (none: the record has no loss)
        self.fail = set(fail)
        self.bonus = bonus or {}  # method -> added to its test score

    def __call__(self, job, config, run_dir, suite):
        self.calls.append(job)
        if job.name in self.fail:
            raise RuntimeError("boom")
        lr = config["optimizer"]["lr"]
        if job.phase == "select":
            loss = {"loss": self.losses[lr]} if lr in self.losses else {}
            return {"metrics": {"validation": {"accuracy": self.validation.get(lr, 0.5), **loss}}}
        score = 0.8 + 0.01 * job.seed + (0.02 if job.implementation == "peft" else 0.0) + self.bonus.get(job.method, 0)
        return {"metrics": {"test": {"accuracy": score}}, "trainable_parameters": 1000 * (1 + len(job.method)),
                "total_parameters": 10 ** 6, "trainable_share": 1e-3, "train_time_s": 10.0 + job.seed,
                "s_per_step": 0.5, "cpu_s_per_step": 0.4 if job.implementation == "peft" else 0.5, "peak_rss_mb": 900.0, "steps": 10, "adapter_bytes": 4096}


def run(suite, tmp_path, fake, **kw):
    lines = []
    kw.setdefault("isolate", False)
    records = runner.run_suite(suite, tmp_path / "results", tmp_path / "runs", run_one=fake,
                               peer_methods=PEERS, echo=lines.append, **kw)
    return records, lines


@pytest.fixture(autouse=True)
def registered(monkeypatch):
    monkeypatch.setattr(runner, "registered_methods", lambda: REGISTERED)


# ---- suites and plans ----------------------------------------------------------------------------


def test_plan_expands_all_with_baselines_selection_and_peers():
    jobs = suites.plan(make_suite(), REGISTERED, PEERS)
    names = [j.name for j in jobs]
    assert names == [
        "head-only--movie-sentiment--s0", "head-only--movie-sentiment--s1",
        "dora--movie-sentiment--s0", "dora--movie-sentiment--s1",
        "dora--movie-sentiment--s0--peft", "dora--movie-sentiment--s1--peft",
        "lora--movie-sentiment--s0--lr0.0001--select", "lora--movie-sentiment--s0--lr0.001--select",
        "lora--movie-sentiment--s0", "lora--movie-sentiment--s1",
        "lora--movie-sentiment--s0--peft", "lora--movie-sentiment--s1--peft",
        "pissa--movie-sentiment--s0", "pissa--movie-sentiment--s1",
        "pissa--movie-sentiment--s0--peft", "pissa--movie-sentiment--s1--peft",
    ]  # vera is excluded; a one-rate grid needs no selection runs


def test_plan_filters_keep_the_selection_a_final_run_needs():
    s = make_suite()
    assert [j.method for j in suites.plan(s, REGISTERED, PEERS, methods=["head-only"])] == ["head-only"] * 2
    only = suites.plan(s, REGISTERED, PEERS, only=["lora--movie-sentiment--s1--peft"])
    assert [j.name for j in only] == ["lora--movie-sentiment--s0--lr0.0001--select",
                                      "lora--movie-sentiment--s0--lr0.001--select", "lora--movie-sentiment--s1--peft"]
    assert [j.name for j in suites.plan(s, REGISTERED, PEERS, only=["head-only--"])] == [
        "head-only--movie-sentiment--s0", "head-only--movie-sentiment--s1"]
    with_adalora = suites.plan(s, [*REGISTERED, "adalora"], PEERS, only=["lora--"])  # a prefix: not adalora--
    assert len(with_adalora) == 6 and all(j.method == "lora" for j in with_adalora)
    with pytest.raises(PeftlabError, match="not in suite t"):
        suites.plan(s, REGISTERED, PEERS, methods=["vera"])
    first_seed = suites.plan(s, REGISTERED, PEERS, methods=["lora"], seeds=[1], peers=False)
    assert [j.name for j in first_seed] == ["lora--movie-sentiment--s0--lr0.0001--select",
                                            "lora--movie-sentiment--s0--lr0.001--select", "lora--movie-sentiment--s1"]
    assert [j.name for j in suites.plan(s, REGISTERED, PEERS, methods=["dora"], seeds=[0])] == [
        "dora--movie-sentiment--s0", "dora--movie-sentiment--s0--peft"]
    assert suites.plan(s, REGISTERED, PEERS, only=["lora--movie-sentiment--s0--lr0.001--select"]) == [
        Job("lora", "movie-sentiment", 0, "select", lr=1e-3)]  # a selection run alone
    with pytest.raises(PeftlabError, match="--seeds \\[7\\] are not in suite t"):
        suites.plan(s, REGISTERED, PEERS, seeds=[7])


def test_run_config_gives_each_method_only_its_fields_and_fills_templates():
    s = make_suite()
    config = suites.run_config(s, Job("lora", "movie-sentiment", 1, "final"), 1e-3, pathlib.Path("out"),
                               runner.accepted_fields("lora"))
    assert config["method"] == {"name": "lora", "targets": ["query"], "r": 4}  # LoRA has no total_steps
    assert config["optimizer"] == {"name": "adamw", "lr": 1e-3}
    assert (config["task"], config["seed"], config["output"]) == ("movie-sentiment", 1, "out")
    s = make_suite(overrides={"lora": {"method": {"alpha": "{lr}", "r": "{steps}"}}})
    config = suites.run_config(s, Job("lora", "movie-sentiment", 0, "final"), 3e-4, pathlib.Path("o"), {"r", "alpha"})
    assert config["method"]["r"] == 10 and config["method"]["alpha"] == 3e-4
    assert suites.run_config(s, Job("head-only", "movie-sentiment", 0, "final"), 1e-3, pathlib.Path("o"),
                             runner.accepted_fields("head-only"))["method"] == {"name": "head-only"}
    # METHOD@TASK: that task only, over the method's own override
    s = make_suite(tasks=["movie-sentiment", "sms-spam"],
                   overrides={"lora": {"method": {"r": 2, "alpha": 4}}, "lora@sms-spam": {"method": {"r": 6}}})
    fields = runner.accepted_fields("lora")
    sms = suites.run_config(s, Job("lora", "sms-spam", 0, "final"), 1e-3, pathlib.Path("o"), fields)["method"]
    movie = suites.run_config(s, Job("lora", "movie-sentiment", 0, "final"), 1e-3, pathlib.Path("o"), fields)["method"]
    assert (sms["r"], sms["alpha"], movie["r"], movie["alpha"]) == (6, 4, 2, 4)


@pytest.mark.parametrize("change, message", [
    ({"colour": 1}, "unknown key"),
    ({"lr": {"lora": [1e-3]}}, "lr needs a `default` grid"),
    ({"lr": {"default": [0]}}, "positive learning rates"),
    ({"baselines": ["linear"]}, "allowed: head-only, full"),
    ({"seeds": []}, "seeds must be a non-empty list"),
    ({"run": {"task": "sms-spam"}}, "list tasks under `tasks`"),
    ({"select": {"metric": "accuracy"}}, "validation.accuracy"),
    ({"lr_extend": -1}, "lr_extend must be an integer >= 0"),
    ({"overrides": {"lora@trec": {"method": {"r": 2}}}}, "'trec' is not one of the suite's tasks"),
])
def test_bad_suites_name_the_key_and_the_fix(change, message):
    with pytest.raises(PeftlabError, match=message):
        make_suite(**change)


def test_unknown_method_and_missing_suite():
    with pytest.raises(PeftlabError, match="unknown method"):
        make_suite(methods=["lora", "nosuch"]).method_names(REGISTERED)
    with pytest.raises(PeftlabError, match="no suite named 'nosuch'.*quick"):
        suites.load("nosuch")


@pytest.mark.parametrize("name", ["quick", "standard", "lm"])
def test_shipped_suites_parse_and_expand(name, monkeypatch):
    monkeypatch.undo()  # the real registry
    s = suites.load(name)
    registered = runner.registered_methods()
    jobs = suites.plan(s, registered, set(peer.METHODS))
    finals = [j for j in jobs if j.phase == "final" and j.implementation == "peftlab"]
    assert {j.method for j in finals} == set(s.method_names(registered))
    from peftlab.recipe import config as runconfig

    for job in finals:  # every method's run config validates as a `peftlab train` config
        fields = runner.accepted_fields(job.method)
        config = suites.run_config(s, job, s.grid(job.method)[0], pathlib.Path("runs"), fields)
        run = runconfig.validate(runner.with_recipe_defaults(config))
        assert run.optimizer["lr"] == s.grid(job.method)[0] and run.method["name"] == job.method


# ---- running, records, resume --------------------------------------------------------------------


def test_records_are_written_and_a_rerun_skips_finished_runs(tmp_path):
    s = make_suite()
    fake = FakeTraining(validation={1e-4: 0.7, 1e-3: 0.6})
    records, lines = run(s, tmp_path, fake)
    assert len(fake.calls) == 16 and all(r["status"] == "ok" for r in records)
    assert lines[0] == "run 1/16, head-only, movie-sentiment, seed 0, ETA ?"
    assert lines[6].startswith("run 7/16, lora, movie-sentiment, seed 0, lr 0.0001 (selection), ETA ")
    record = json.loads((tmp_path / "results" / "lora--movie-sentiment--s1.json").read_text())
    assert record["schema"] == runner.SCHEMA
    assert (record["method"], record["task"], record["seed"]) == ("lora", "movie-sentiment", 1)
    assert record["phase"] == "final" and record["implementation"] == "peftlab"
    assert record["metrics"]["test"]["accuracy"] == pytest.approx(0.81)
    assert record["config"]["method"]["r"] == 4 and record["config"]["output"].endswith("lora--movie-sentiment--s1")
    for key in ("trainable_parameters", "trainable_share", "peak_rss_mb", "train_time_s", "s_per_step",
                "adapter_bytes", "config_hash", "finished_at", "bench_time_s"):
        assert key in record

    again = FakeTraining(validation={1e-4: 0.7, 1e-3: 0.6})
    _, lines = run(s, tmp_path, again)
    assert again.calls == [] and all(line.endswith("done before, skipped") for line in lines)
    invocations = runner.read_invocations(tmp_path / "results")  # the skipping rerun ran nothing: no line
    assert len(invocations) == 1 and invocations[0]["runs"] == invocations[0]["planned"] == 16


def test_the_time_left_counts_only_the_runs_a_resumed_bench_will_train(tmp_path, monkeypatch):
    s = make_suite()
    run(s, tmp_path, FakeTraining(validation={1e-4: 0.7, 1e-3: 0.6}))
    for name in ("lora--movie-sentiment--s1", "dora--movie-sentiment--s1--peft"):
        (tmp_path / "results" / f"{name}.json").unlink()
    remaining = []
    real = runner.progress_line
    monkeypatch.setattr(runner, "progress_line", lambda *a, **k: remaining.append(a[4]) or real(*a, **k))
    again = FakeTraining(validation={1e-4: 0.7, 1e-3: 0.6})
    run(s, tmp_path, again)
    assert len(again.calls) == 2 and remaining == [2, 1]  # not the 16 runs of the plan


def test_learning_rate_is_chosen_on_validation_and_final_and_peer_runs_use_it(tmp_path):
    fake = FakeTraining(validation={1e-4: 0.7, 1e-3: 0.6})
    run(make_suite(), tmp_path, fake)
    results = tmp_path / "results"
    for name in ("lora--movie-sentiment--s0", "lora--movie-sentiment--s1", "lora--movie-sentiment--s1--peft"):
        record = json.loads((results / f"{name}.json").read_text())
        assert record["lr"] == 1e-4
        assert record["selection"]["scores"] == {"0.0001": 0.7, "0.001": 0.6}
    select = json.loads((results / "lora--movie-sentiment--s0--lr0.001--select.json").read_text())
    assert "test" not in select["metrics"]  # selection runs never see the test split


def test_a_grid_grows_past_the_end_its_best_rate_sits_at(tmp_path):
    s = make_suite(methods=["lora"], baselines=[], peer=False, seeds=[0], lr_extend=3)  # lora grid: 1e-4, 1e-3
    fake = FakeTraining(validation={1e-4: 0.6, 1e-3: 0.7, 1e-2: 0.8, 1e-1: 0.75})
    records, lines = run(s, tmp_path, fake)
    assert [j.name for j in fake.calls] == [
        "lora--movie-sentiment--s0--lr0.0001--select", "lora--movie-sentiment--s0--lr0.001--select",
        "lora--movie-sentiment--s0--lr0.01--select",  # 1e-3 was best: one step of 10x further
        "lora--movie-sentiment--s0--lr0.1--select",  # 1e-2 was best: one more; 0.1 is worse, so stop
        "lora--movie-sentiment--s0"]
    text = report.write_report(s, tmp_path / "results").read_text()
    assert "| movie-sentiment | lora | 0.0001: 0.6000, 0.001: 0.7000, 0.01*: 0.8000, 0.1*: 0.7500 | 0.01 |" in text
    assert "up to 3 rates were added" in text
    final = {r["run"]: r for r in records}["lora--movie-sentiment--s0"]
    assert final["lr"] == 0.01 and final["selection"]["added"] == [0.01, 0.1]
    assert final["selection"]["scores"] == {"0.0001": 0.6, "0.001": 0.7, "0.01": 0.8, "0.1": 0.75}
    again = FakeTraining()
    run(s, tmp_path, again)
    assert again.calls == []  # the added rates are remembered through their records
    narrow = make_suite(methods=["lora"], baselines=[], peer=False, seeds=[0], lr_extend=1)
    scores = {1e-4: 0.6, 1e-3: 0.7, 1e-2: 0.8, 1e-1: 0.75}
    run(narrow, tmp_path / "narrow", FakeTraining(validation=scores))
    wider = FakeTraining(validation=scores)  # the same suite allowing 3 added rates: 0.1 is tried, 0.01 stays
    run(s, tmp_path / "narrow", wider)
    assert [j.name for j in wider.calls] == ["lora--movie-sentiment--s0--lr0.1--select"]
    final = json.loads((tmp_path / "narrow" / "results" / "lora--movie-sentiment--s0.json").read_text())
    assert final["lr"] == 0.01 and final["selection"]["scores"]["0.1"] == 0.75  # the evidence is updated

    down = make_suite(methods=["lora"], baselines=[], peer=False, seeds=[0], lr_extend=1)
    fake = FakeTraining(validation={1e-4: 0.7, 1e-3: 0.6, 1e-5: 0.9, 1e-6: 0.95})
    records, _ = run(down, tmp_path / "down", fake)
    assert [j.lr for j in fake.calls if j.phase == "select"] == [1e-4, 1e-3, 1e-5]  # capped at one added rate
    assert records[-1]["lr"] == 1e-5


def test_tied_scores_go_to_the_lower_validation_loss_and_the_grid_follows_it(tmp_path):
    # Every rate predicts the majority class (the same accuracy); the loss falls as the rate grows,
    # so the largest rate is best and the grid grows upwards, not towards the smallest rate.
    s = make_suite(methods=["lora"], baselines=[], peer=False, seeds=[0], lr_extend=2)  # lora grid: 1e-4, 1e-3
    fake = FakeTraining(validation={1e-4: 0.86, 1e-3: 0.86, 1e-2: 0.86, 1e-1: 0.95},
                        losses={1e-4: 0.67, 1e-3: 0.48, 1e-2: 0.34, 1e-1: 0.2})
    records, _ = run(s, tmp_path, fake)
    assert [j.lr for j in fake.calls if j.phase == "select"] == [1e-4, 1e-3, 1e-2, 1e-1]
    final = {r["run"]: r for r in records}["lora--movie-sentiment--s0"]
    assert final["lr"] == 0.1 and "tie_broken_by" not in final["selection"]  # 0.1 wins outright
    assert runner.best_rate({1e-4: (0.86, 0.67), 1e-3: (0.86, 0.48)}, "max") == 1e-3
    assert runner.best_rate({1e-4: (0.86, 0.5), 1e-3: (0.86, 0.5)}, "max") == 1e-4  # then the smaller rate
    assert runner.best_rate({1e-4: (0.2, 0.9), 1e-3: (0.3, 0.1)}, "min") == 1e-4  # the metric comes first

    tied = FakeTraining(validation={1e-4: 0.86, 1e-3: 0.86}, losses={1e-4: 0.67, 1e-3: 0.48})
    records, _ = run(make_suite(methods=["lora"], baselines=[], peer=False, seeds=[0]), tmp_path / "tied", tied)
    final = {r["run"]: r for r in records}["lora--movie-sentiment--s0"]
    assert final["lr"] == 1e-3
    assert final["selection"]["tie_broken_by"] == {"validation.loss": {"0.0001": 0.67, "0.001": 0.48}}
    text = report.write_report(make_suite(methods=["lora"], baselines=[], peer=False, seeds=[0]),
                               tmp_path / "tied" / "results").read_text()
    assert "| movie-sentiment | lora | 0.0001: 0.8600, 0.001: 0.8600 | 0.001~ |" in text


def test_a_changed_config_or_a_failed_run_runs_again(tmp_path):
    s = make_suite(methods=["lora"], lr={"default": [1e-3]}, peer=False, baselines=[], seeds=[0])
    fake = FakeTraining(fail={"lora--movie-sentiment--s0"})
    records, lines = run(s, tmp_path, fake)
    assert records[0]["status"] == "failed" and "boom" in records[0]["error"]
    assert any("failed: RuntimeError: boom" in line for line in lines)
    fake = FakeTraining()
    run(s, tmp_path, fake)
    assert [j.name for j in fake.calls] == ["lora--movie-sentiment--s0"]  # the failure is retried
    fake = FakeTraining()
    run(s, tmp_path, fake)
    assert fake.calls == []
    longer = make_suite(methods=["lora"], lr={"default": [1e-3]}, peer=False, baselines=[], seeds=[0],
                        run={"model": "minilm-l6", "train": {"steps": 20}, "optimizer": {"name": "adamw"}})
    fake = FakeTraining()
    run(longer, tmp_path, fake)
    assert len(fake.calls) == 1  # 20 steps is another run than 10 steps


def test_a_damaged_record_counts_as_unfinished(tmp_path):
    s = make_suite(methods=["lora"], lr={"default": [1e-3]}, peer=False, baselines=[], seeds=[0])
    run(s, tmp_path, FakeTraining())
    path = tmp_path / "results" / "lora--movie-sentiment--s0.json"
    path.write_text(path.read_text()[:40])
    fake = FakeTraining()
    run(s, tmp_path, fake)
    assert len(fake.calls) == 1 and json.loads(path.read_text())["status"] == "ok"
    assert not list(path.parent.glob(".*.tmp"))  # atomic writes leave no scratch files


def test_two_workers_in_child_processes_respect_the_selection_order(tmp_path):
    """Runs in forked children, two at once; a final run starts only after its selection runs."""
    import time

    def fake(job, config, run_dir, suite):
        if job.name == "dora--movie-sentiment--s1":
            import os

            os._exit(3)  # a crash (e.g. killed for memory) fails this record only
        time.sleep(0.3 if job.phase == "select" else 0.01)
        return FakeTraining(validation={1e-4: 0.6, 1e-3: 0.7})(job, config, run_dir, suite)

    records, lines = run(make_suite(), tmp_path, fake, isolate=True, workers=2)
    assert len(records) == 16 and lines[0].startswith("run 1/16")
    by_name = {r["run"]: r for r in records}
    crashed = by_name.pop("dora--movie-sentiment--s1")
    assert crashed["status"] == "failed" and "exit code 3" in crashed["error"]
    assert all(r["status"] == "ok" and r["concurrent_runs"] == 2 for r in by_name.values())
    assert by_name["lora--movie-sentiment--s1--peft"]["lr"] == 1e-3  # the better validation score
    selected = max(by_name[f"lora--movie-sentiment--s0--lr{lr}--select"]["finished_at"] for lr in ("0.0001", "0.001"))
    assert by_name["lora--movie-sentiment--s0"]["finished_at"] >= selected


def test_the_first_seeds_final_run_evaluates_its_selection_run_instead_of_retraining(tmp_path, monkeypatch):
    from peftlab.bench import execute

    def trains(job, config, run_dir, suite):  # leaves a trained adapter behind, as a real run does
        (run_dir / "adapter").mkdir(parents=True)
        return FakeTraining(validation={1e-4: 0.6, 1e-3: 0.7})(job, config, run_dir, suite)

    evaluated = []

    def evaluates(job, config, run_dir, suite, *, selected):
        evaluated.append((job.name, selected["run"], selected["run_dir"]))
        return {"metrics": {"test": {"accuracy": 0.9}}, "trained_in": selected["run"]}

    monkeypatch.setattr(execute, "evaluate_selected", evaluates)
    s = make_suite(methods=["lora"], baselines=[], peer=False)
    records, _ = run(s, tmp_path, trains)
    chosen = "lora--movie-sentiment--s0--lr0.001--select"
    assert evaluated == [("lora--movie-sentiment--s0", chosen, str(tmp_path / "runs" / chosen))]
    by_name = {r["run"]: r for r in records}
    assert by_name["lora--movie-sentiment--s0"]["trained_in"] == chosen
    assert by_name["lora--movie-sentiment--s0"]["lr"] == 1e-3
    assert "trained_in" not in by_name["lora--movie-sentiment--s1"]  # another seed trains

    for path in (tmp_path / "results").glob("lora--movie-sentiment--s0.json"):
        path.unlink()  # without the trained adapter the final run trains after all
    import shutil

    shutil.rmtree(tmp_path / "runs" / chosen)
    again = FakeTraining(validation={1e-4: 0.6, 1e-3: 0.7})
    run(s, tmp_path, again)
    assert [j.name for j in again.calls] == ["lora--movie-sentiment--s0"]


def test_dry_run_lists_without_running(tmp_path):
    fake = FakeTraining()
    _, lines = run(make_suite(), tmp_path, fake, dry_run=True)
    assert fake.calls == [] and lines[0] == "run 1/16, head-only--movie-sentiment--s0: would run"
    assert not (tmp_path / "results").exists()


def test_forgetting_is_the_loss_change_against_the_reference(tmp_path):
    s = make_suite(methods=["lora"], lr={"default": [1e-3]}, peer=False, baselines=[], seeds=[0],
                   forgetting={"examples": 8})

    def fake(job, config, run_dir, suite):
        if job.phase == "reference":
            return {"metrics": {"forgetting_text": {"loss": 3.0}}}
        return {"metrics": {"test": {"loss": 1.0}}, "forgetting": {"after": 3.25}}

    records, _ = run(s, tmp_path, fake)
    assert [r["run"] for r in records] == ["reference--forgetting--s0", "lora--movie-sentiment--s0"]
    assert records[1]["forgetting"] == {"after": 3.25, "before": 3.0, "delta": 0.25}


# ---- the report on fixture results -----------------------------------------------------------------


def fixture_records(tmp_path) -> tuple[suites.Suite, pathlib.Path]:
    s = make_suite()
    run(s, tmp_path, FakeTraining(validation={1e-4: 0.7, 1e-3: 0.6}, bonus={"dora": -0.1, "pissa": 0.03}))
    failed = {"schema": runner.SCHEMA, "run": "x--movie-sentiment--s0", "status": "failed", "phase": "final",
              "error": "PeftlabError: something | broke"}
    runner.write_record(tmp_path / "results" / "x--movie-sentiment--s0.json", failed)
    return s, tmp_path / "results"


def test_report_table_peer_column_grid_and_plots(tmp_path):
    s, results = fixture_records(tmp_path)
    path = report.write_report(s, results)
    text = path.read_text()
    # mean +- sample std over seeds 0 and 1: 0.80, 0.81 -> 0.805 +- 0.007
    assert ("| **head-only** | 0.805 ± 0.007 | - | 0,1 | 10.0k | 0.100% | 10 ± 1 | 0.500 ± 0.000 | 0.500 ± 0.000 "
            "| 900 ± 0 | 4.0 KB | 0.001 |") in text
    rows = [line.split(" | ")[0] for line in text.splitlines() if line.startswith("| ") and " ± " in line]
    assert rows[:4] == ["| **head-only**", "| pissa", "| lora", "| dora"]  # baselines, then best first
    assert "| pissa | 0.835 ± 0.007 | +0.030 | 0,1 | 6.0k |" in text
    assert "| lora | 0.805 ± 0.007 | +0.000 | 0,1 | 5.0k |" in text
    assert "| dora | 0.705 ± 0.007 | -0.100 | 0,1 |" in text
    assert ("| lora | 0.805 ± 0.007 | 0.825 ± 0.007 | 0.500 ± 0.000 | 0.500 ± 0.000 | 0.500 ± 0.000 | 0.400 ± 0.000 "
            "| 1.25x | 900 ± 0 | 900 ± 0 |") in text  # side by side with peft
    assert "| movie-sentiment | lora | 0.0001: 0.7000, 0.001: 0.6000 | 0.0001 |" in text
    assert "Default grid: 0.001." in text and "Own grids: lora: 0.0001, 0.001." in text
    assert "| x--movie-sentiment--s0 | PeftlabError: something \\| broke |" in text
    assert "- vera: too slow here" in text
    assert "Bench invocation " in text and "16 of 16 runs in 0.0 min wall time, 1 at once" in text
    for name in (report.PLOT_PARAMS, report.PLOT_TIME):
        assert (results / name).stat().st_size > 5000 and f"({name})" in text


def test_the_report_names_selection_runs_no_choice_includes(tmp_path):
    s, results = fixture_records(tmp_path)
    assert "Unused selection runs" not in report.write_report(s, results).read_text()
    # a record a lower grid left behind: same method and task, a rate the final choice never scored
    stale = {**runner.read_record(results / "lora--movie-sentiment--s0--lr0.0001--select.json"),
             "run": "lora--movie-sentiment--s0--lr3e-05--select", "lr": 3e-5}
    runner.write_record(results / "lora--movie-sentiment--s0--lr3e-05--select.json", stale)
    text = report.write_report(s, results).read_text()
    assert "## Unused selection runs" in text and "`lora--movie-sentiment--s0--lr3e-05--select`" in text
    assert "lr0.0001--select`" not in text  # the rates the choice scored are not listed
    assert "| lora | 0.805 ± 0.007 | +0.000 | 0,1 | 5.0k |" in text  # and the table is unchanged


def test_the_report_tables_are_embedded_between_markers(tmp_path):
    s, results = fixture_records(tmp_path)
    path = report.write_report(s, results)
    page = tmp_path / "README.md"
    page.write_text("# Title\n\nbefore\n<!-- bench:t -->\nold table\n<!-- /bench:t -->\nafter\n")
    report.embed(page, s, path)
    report.embed(page, s, path)  # idempotent
    text = page.read_text()
    assert text.startswith("# Title\n\nbefore\n<!-- bench:t -->\n### movie-sentiment\n") and "old table" not in text
    assert text.endswith("<!-- /bench:t -->\nafter\n") and text.count("### movie-sentiment") == 1
    assert "| **head-only** | 0.805 ± 0.007 |" in text and "Learning rates" not in text
    assert "(results/score_vs_trainable_parameters.png)" in text  # links relative to the page
    (tmp_path / "docs").mkdir()
    elsewhere = tmp_path / "docs" / "page.md"  # a page beside, not above, the results
    elsewhere.write_text("<!-- bench:t -->\n<!-- /bench:t -->\n")
    report.embed(elsewhere, s, path)
    assert "(../results/score_vs_trainable_parameters.png)" in elsewhere.read_text()
    page.write_text("no markers\n")
    with pytest.raises(PeftlabError, match="needs the marker lines <!-- bench:t -->"):
        report.embed(page, s, path)
    assert page.read_text() == "no markers\n"


def test_pareto_front():
    points = [(10, 0.7, "a"), (5, 0.6, "b"), (20, 0.65, "c"), (30, 0.9, "d"), (5, 0.5, "e")]
    assert [p[2] for p in report.pareto_front(points, "max")] == ["b", "a", "d"]
    assert [p[2] for p in report.pareto_front([(1, 2.0, "a"), (2, 1.0, "b"), (3, 1.5, "c")], "min")] == ["a", "b"]


def test_plot_labels_of_a_cluster_are_spread_apart_in_order():
    heights = report.spread_labels([0.50, 0.51, 0.505, 0.9], gap=0.05)
    ranked = sorted(heights[:3])
    assert [heights.index(h) for h in ranked] == [0, 2, 1]  # order kept
    assert all(b - a >= 0.05 - 1e-9 for a, b in zip(sorted(heights), sorted(heights)[1:]))
    assert sum(heights[:3]) / 3 == pytest.approx((0.50 + 0.51 + 0.505) / 3, abs=1e-6)  # centred
    assert heights[3] == pytest.approx(0.9)  # far away: left where it is
    crowded = report.spread_labels([0.99] * 5, gap=0.05)  # near the top: pushed down, kept inside
    assert max(crowded) <= 0.98 + 1e-9 and min(b - a for a, b in zip(sorted(crowded), sorted(crowded)[1:])) >= 0.05 - 1e-9
    assert report.spread_labels([], gap=0.1) == []


def test_bench_command_line(tmp_path, monkeypatch, capsys):
    from peftlab import bench

    s, results = fixture_records(tmp_path)
    suite_file = tmp_path / "t.yaml"
    suite_file.write_text(json.dumps({"tasks": ["movie-sentiment"], "lr": {"default": [1e-3]}, "methods": ["lora"]}))
    assert bench.main(["report", str(suite_file), "--results", str(results)]) == 0
    assert "report written to" in capsys.readouterr().out
    assert bench.main(["report"]) == 2
    assert "give one suite" in capsys.readouterr().err


# ---- baselines and the peft peer -------------------------------------------------------------------


def test_baselines_train_the_head_or_everything():
    model = tiny_bert()
    model.classifier = torch.nn.Linear(32, 2)
    head = adaptation.baseline("head-only", model, "classifier")
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained == ["classifier.weight", "classifier.bias"]
    assert sum(p.numel() for g in head.param_groups(0.1) for p in g["params"]) == 66
    full = adaptation.baseline("full", model, "classifier")
    assert all(p.requires_grad for p in model.parameters()) and full.after_step is None
    with pytest.raises(PeftlabError, match="has none"):
        adaptation.baseline("head-only", tiny_bert(), None)
    with pytest.raises(PeftlabError, match="takes no fields"):
        adaptation.check_baseline_fields({"name": "full", "r": 8})


def test_baselines_are_run_configs():
    """`peftlab train --set method.name=full` drops the default LoRA's fields; fields are refused."""
    from peftlab.recipe import config as runconfig

    assert runconfig.build(None, ["method.name=full"]).method == {"name": "full"}
    assert runconfig.build(None, ["method.name=head-only"]).method == {"name": "head-only"}
    with pytest.raises(PeftlabError, match="baseline 'full' takes no fields, got \\['r'\\]"):
        runconfig.build(None, ["method.name=full", "method.r=4"])
    assert "head-only" not in peftlab.methods()


@pytest.mark.parametrize("method, fields", [
    ("lora", {}), ("rslora", {}), ("pissa", {}), ("olora", {}), ("dora", {}), ("vera", {"r": 16}),
    ("randlora", {"r": 8}), ("adalora", {"total_steps": 10}),
])
def test_peer_adapts_the_same_sites_with_the_same_trainable_count(method, fields):
    """The peft model trains exactly as many parameters as peftlab's (same sites, rank, head)."""
    class Run:
        kind = "classification"

    targets = ["query", "value"]
    ours = tiny_bert()
    ours.classifier = torch.nn.Linear(32, 2)
    peftlab.attach(ours, peftlab.config(method, targets=targets, also_train=["classifier"], **fields))
    theirs = tiny_bert()
    theirs.classifier = torch.nn.Linear(32, 2)
    Run.method = {"name": method, "targets": targets, **fields}
    plan = peer.plan_for(Run, theirs, "classifier")
    assert plan.config.target_modules == {f"encoder.layer.{i}.attention.self.{t}" for i in (0, 1) for t in targets}
    from peft import get_peft_model

    peft_model = get_peft_model(theirs, plan.config)
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    assert count(peft_model) == count(ours)


def tiny_classifier_and_padded_batches():
    """A 2-layer BERT classifier (eval mode) and 6 right-padded, labelled batches of 4."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=4, intermediate_size=64,
                                                     max_position_embeddings=64, num_labels=2)).eval()
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(6):
        mask = torch.ones(4, 20, dtype=torch.long)
        mask[1, 12:] = 0
        mask[3, 7:] = 0
        batches.append({"input_ids": torch.randint(1, 100, (4, 20), generator=g) * mask, "attention_mask": mask,
                        "labels": torch.randint(0, 2, (4,), generator=g)})
    return model, batches


def peer_model(method_fields: dict, model, batches):
    """`peft`'s counterpart, through the bench's own peer path (`peer.adapt`)."""

    class Run:
        kind = "classification"
        method = method_fields

    return peer.adapt(model, Run, lambda: batches).model


@pytest.mark.parametrize("method", ["corda", "eva", "lora_ga"])
def test_peer_data_driven_inits_take_padded_calibration_batches(method):
    """The recipe's calibration batches (right-padded, one label per example) reach peft's init."""
    model, batches = tiny_classifier_and_padded_batches()
    rows = peer.single_sequences(batches[:1])
    assert [r["input_ids"].shape[1] for r in rows] == [20, 12, 20, 7] and rows[3]["labels"].shape == (1,)
    peft_model = peer_model({"name": method, "r": 2, "targets": ["query", "value"]}, model, batches)
    lora_a = [n for n, p in peft_model.named_parameters() if "lora_A" in n]
    assert len(lora_a) == 4
    assert torch.isfinite(peft_model(**batches[0]).logits).all()


@pytest.mark.parametrize("method", ["corda", "eva"])
def test_peer_and_peftlab_build_the_same_adapter_from_the_same_padded_batches(method):
    # What the bench compares: peftlab's init from padded batches against peft's through the peer
    # path (CorDA: one unpadded sequence per forward). A per-batch covariance once broke this.
    # LoRA-GA is left out: peft factors the (equal) gradient with a randomised SVD.
    import copy

    model, batches = tiny_classifier_and_padded_batches()
    fields = {"name": method, "r": 2, "targets": ["query", "value"]}
    ours = copy.deepcopy(model)
    peftlab.attach(ours, peftlab.config(**fields), calibration=batches)
    theirs = peer_model(fields, copy.deepcopy(model), batches)
    adapters = peftlab.adapters(ours, "default")
    assert len(adapters) == 4
    for site, adapter in adapters.items():
        layer = theirs.base_model.model.get_submodule(site)
        torch.testing.assert_close(adapter.A, layer.lora_A["default"].weight, atol=1e-5, rtol=0)
        torch.testing.assert_close(adapter.B, layer.lora_B["default"].weight, atol=1e-5, rtol=0)


def test_peer_refuses_methods_without_a_counterpart():
    class Run:
        kind = "classification"
        method = {"name": "nola", "targets": ["query"]}

    with pytest.raises(PeftlabError, match="no counterpart of 'nola'"):
        peer.plan_for(Run, tiny_bert(), None)


# ---- one real tiny suite through the training recipe -----------------------------------------------


def test_real_runs_of_a_tiny_suite(tmp_path, monkeypatch):
    """head-only, LoRA and AdaLoRA, each also through peft: 2 steps each on 160 examples of movie sentiment.

    AdaLoRA reads each step's gradients in its step hook: it trains only if the recipe calls the
    hook before the optimizer's gradients are cleared.
    """
    monkeypatch.undo()
    s = suites.parse({
        "run": {"model": "minilm-l6", "data": {"max_length": 32, "limit": 160},
                "train": {"steps": 2, "batch_size": 8, "eval_batch_size": 32, "save_every": 1000,
                          "progress": False}, "optimizer": {"name": "adamw"}},
        "tasks": ["movie-sentiment"], "seeds": [0], "methods": ["lora", "adalora"], "baselines": ["head-only"],
        "method_fields": {"targets": ["query", "value"], "total_steps": "{steps}"}, "lr": {"default": [1e-3]},
        "peer": ["lora", "adalora"], "workers": 2, "threads": 1,
    }, name="tiny")
    records = runner.run_suite(s, tmp_path / "results", tmp_path / "runs", echo=lambda line: None)
    by_name = {r["run"].split("--movie-sentiment--s0")[0] + r["run"].split("--s0")[1]: r for r in records}
    assert sorted(by_name) == ["adalora", "adalora--peft", "head-only", "lora", "lora--peft"]
    assert all(r["status"] == "ok" for r in records), [r.get("error") for r in records]
    assert by_name["head-only"]["trainable_parameters"] == 384 * 2 + 2
    lora_count = 6 * 2 * 8 * (384 + 384) + 770
    assert by_name["lora"]["trainable_parameters"] == by_name["lora--peft"]["trainable_parameters"] == lora_count
    assert by_name["adalora"]["trainable_parameters"] == by_name["adalora--peft"]["trainable_parameters"]
    for r in records:
        assert r["steps"] == 2 and 0 <= r["metrics"]["test"]["accuracy"] <= 1 and "validation" not in r["metrics"]
        assert r["peak_rss_mb"] > 100 and r["adapter_bytes"] > 0 and r["s_per_step"] > 0 and r["cpu_s_per_step"] > 0
        assert r["versions"]["peft"] and r["machine"]["torch_threads"] == 1
    assert (tmp_path / "runs" / "lora--movie-sentiment--s0--peft" / "adapter" / "adapter_config.json").is_file()
    assert "train_runtime" in (tmp_path / "runs" / "lora--movie-sentiment--s0.log").read_text()


def test_a_reused_selection_run_scores_as_the_retrained_final_run(tmp_path):
    """Training is deterministic: evaluating the selection run equals training the final run again."""
    s = suites.parse({
        "run": {"model": "minilm-l6", "data": {"max_length": 32, "limit": 160},
                "train": {"steps": 3, "batch_size": 8, "eval_batch_size": 32, "save_every": 1000,
                          "progress": False, "group_by_length": True}, "optimizer": {"name": "adamw"}},
        "tasks": ["movie-sentiment"], "seeds": [0], "methods": ["lora"], "baselines": ["full"],
        "method_fields": {"targets": ["query", "value"]}, "lr": {"default": [1e-3, 3e-3], "full": [1e-4, 3e-4]},
        "workers": 2, "threads": 1,
    }, name="tiny")
    finals = {}
    for reuse in (True, False):
        records = runner.run_suite(s, tmp_path / f"results-{reuse}", tmp_path / f"runs-{reuse}",
                                   echo=lambda line: None, reuse_selection=reuse)
        assert all(r["status"] == "ok" for r in records), [r.get("error") for r in records]
        finals[reuse] = {r["run"]: r for r in records if r["phase"] == "final"}
    for name, reused in finals[True].items():
        retrained = finals[False][name]
        assert reused["trained_in"].startswith(name) and "trained_in" not in retrained
        assert reused["lr"] == retrained["lr"] and reused["steps"] == retrained["steps"] == 3
        assert reused["trainable_parameters"] == retrained["trainable_parameters"]
        assert reused["metrics"]["test"]["accuracy"] == retrained["metrics"]["test"]["accuracy"]
        assert reused["metrics"]["test"]["loss"] == pytest.approx(retrained["metrics"]["test"]["loss"], abs=1e-5)
