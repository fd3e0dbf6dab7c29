"""The bench's measured columns: initialisation time, the validation curve and time to accuracy, latency.

Runs use the tiny random BERT of tests/run_helpers.py on 200 movie-review snippets (6 steps,
a validation every 2); the latency orchestration is checked on tiny_bert with a stand-in timer
that records what the model computes at each measurement; the report's columns on hand-made records.
"""
from __future__ import annotations

import json
import time

import pytest
import torch

import peftlab
from peftlab.bench import execute, html as page_html, report, runner, suite as suites
from peftlab.bench.suite import Job
from peftlab.recipe import adaptation, config as runconfig, loop, trainer as train
from conftest import tiny_bert, token_batch
from run_helpers import metrics, tiny_checkpoint


def _config(tmp_path, name: str, method: dict, eval_every: int | None = 2, eval_batch_size: int = 16) -> dict:
    return runner.with_recipe_defaults({
        "model": str(tiny_checkpoint(tmp_path.parent)), "task": "movie-sentiment", "output": str(tmp_path / name),
        "data": {"limit": 200, "max_length": 32}, "seed": 0, "method": method,
        "train": {"batch_size": 8, "steps": 6, "save_every": 1000, "log_every": 1, "progress": False,
                  "eval_every": eval_every, "eval_batch_size": eval_batch_size},
        "optimizer": {"name": "adamw", "lr": 0.01}})


SUITE = suites.parse({"run": {"model": "minilm-l6"}, "tasks": ["movie-sentiment"], "seeds": [0], "methods": ["lora"],
                      "baselines": [], "lr": {"default": [0.01]}}, name="tiny")


# ---- the recipe's summary ---------------------------------------------------------------------------


class Clock:
    """time.time() that jumps forward by `offset` seconds when told; process_time as it is."""

    def __init__(self):
        self.offset = 0.0

    def time(self) -> float:
        return time.time() + self.offset

    def process_time(self) -> float:
        return time.process_time()


def test_init_time_is_measured_apart_from_training_and_the_curve_has_each_validation(tmp_path, monkeypatch):
    clock, attach = Clock(), adaptation.of_method

    def slow_attach(*args, **kwargs):  # building the adaptation "takes" 1000 s
        clock.offset += 1000.0
        return attach(*args, **kwargs)

    monkeypatch.setattr(adaptation, "of_method", slow_attach)
    monkeypatch.setattr(train, "time", clock)
    monkeypatch.setattr(loop, "time", clock)  # metrics.jsonl's timestamps, on the same clock
    run = runconfig.validate(_config(tmp_path, "run", {"name": "lora", "r": 4, "targets": ["query", "value"]}))
    summary = train.train(run, echo=lambda *a: None)

    assert summary["init_time_s"] >= 1000.0
    assert summary["train_time_s"] < 1000.0  # the jump happened before training started
    assert summary["wall_time_s"] >= summary["init_time_s"] + summary["train_time_s"]
    curve = summary["validation_curve"]
    assert [p["step"] for p in curve] == [2, 4, 6]
    logged = [m for m in metrics(tmp_path / "run") if "eval_accuracy" in m]
    assert [p["accuracy"] for p in curve] == [m["eval_accuracy"] for m in logged]
    assert [p["loss"] for p in curve] == [m["eval_loss"] for m in logged]
    assert set(curve[0]) == {"step", "wall_s", "loss", "accuracy", "macro_f1"}
    walls = [p["wall_s"] for p in curve]
    assert walls == sorted(walls) and 0 <= walls[0] and walls[-1] <= summary["train_time_s"]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["validation_curve"] == curve


# ---- run_job: the record ----------------------------------------------------------------------------


def test_a_final_run_records_init_curve_and_latency_without_a_merged_time_for_houlsby(tmp_path):
    config = _config(tmp_path, "houlsby", {"name": "houlsby", "size": 8})
    record = execute.run_job(Job("houlsby", "movie-sentiment", 0, "final"), config, tmp_path / "houlsby", SUITE)
    assert 0 < record["init_time_s"] < record["wall_time_s"] - record["train_time_s"]
    assert [p["step"] for p in record["validation_curve"]] == [2, 4, 6]
    latency = record["latency_ms"]
    assert set(latency) == {"unmerged", "merged", "base"}
    assert latency["merged"] is None  # a bottleneck adapter has no weight form
    assert latency["unmerged"] > 0 and latency["base"] > 0


def test_a_reused_selection_run_carries_its_init_and_curve_and_measures_latency(tmp_path):
    """The first seed's final run evaluates its selection run: training fields from it, latency its own."""
    config = _config(tmp_path, "pissa", {"name": "pissa", "r": 4, "targets": ["query", "value"]}, eval_every=3)
    select = Job("pissa", "movie-sentiment", 0, "select", lr=0.01)
    selected = execute.run_job(select, config, tmp_path / "pissa", SUITE)
    assert "latency_ms" not in selected  # selection runs are not timed
    assert selected["init_time_s"] > 0 and [p["step"] for p in selected["validation_curve"]] == [3, 6]
    final = execute.evaluate_selected(Job("pissa", "movie-sentiment", 0, "final"), config, tmp_path / "pissa",
                                      SUITE, selected={**selected, "run": select.name})
    assert final["init_time_s"] == selected["init_time_s"]
    assert final["validation_curve"] == selected["validation_curve"]
    assert all(final["latency_ms"][k] > 0 for k in ("unmerged", "merged", "base"))


def test_the_latency_batch_is_the_test_splits_first_rows_padded_to_max_length(tmp_path):
    from transformers import AutoTokenizer

    from peftlab.recipe import data

    run = runconfig.validate(_config(tmp_path, "any", {"name": "lora"}, eval_batch_size=16))
    tokenizer = AutoTokenizer.from_pretrained(run.model)
    batch = execute.latency_batch(run, "classification", tokenizer)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (execute.LATENCY_ROWS, 32)
    test_rows = data.split(data.load(run.task, run.data, run.seed).rows, tuple(run.data.split), run.seed)[2]
    first = tokenizer(test_rows[0]["text"], truncation=True, max_length=32)["input_ids"]
    assert batch["input_ids"][0, :len(first)].tolist() == first
    assert batch["attention_mask"][0].tolist() == [1] * len(first) + [0] * (32 - len(first))
    run.train.eval_batch_size = 3
    assert execute.latency_batch(run, "classification", tokenizer)["input_ids"].shape == (3, 32)


# ---- latency: what each measurement sees ------------------------------------------------------------


def _spy(monkeypatch, weight_of):
    """Replaces the timer: each measurement records (the weight weight_of() gives, the model's output)."""
    seen = []

    def fake_median_ms(model, batch):
        assert not model.training and not torch.is_grad_enabled()
        seen.append((weight_of().detach().clone(), model(**batch).last_hidden_state))
        return float(len(seen))

    monkeypatch.setattr(execute, "median_ms", fake_median_ms)
    return seen


def _trained_lora(model):
    peftlab.attach(model, peftlab.LoRA(r=2, targets=["query"]))
    for name, parameter in model.named_parameters():
        if name.endswith(".B"):  # as after training: the change is not zero
            torch.nn.init.normal_(parameter, std=0.5)
    return model


def test_peftlab_latency_times_unmerged_merged_and_base_and_leaves_the_model_as_it_was(monkeypatch):
    model = _trained_lora(tiny_bert()).eval()
    host = model.encoder.layer[0].attention.self.query
    original = host.weight.detach().clone()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = _spy(monkeypatch, lambda: host.weight)
    batch = token_batch()
    with torch.no_grad(), peftlab.disabled(model):
        base_output = model(**batch).last_hidden_state
    model.train()

    assert execute.latency_ms(model, batch, "peftlab") == {"unmerged": 1.0, "merged": 2.0, "base": 3.0}
    (w_unmerged, unmerged), (w_merged, merged), (w_base, base) = seen
    assert torch.equal(w_unmerged, original) and torch.equal(w_base, original)
    assert not torch.allclose(w_merged, original)  # timed with the change written into the weight
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(base, base_output)
    assert not torch.allclose(base, unmerged)
    assert model.training
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_a_method_without_a_weight_form_has_no_merged_latency(monkeypatch):
    model = tiny_bert()
    peftlab.attach(model, peftlab.config("houlsby", size=4))
    seen = _spy(monkeypatch, lambda: model.encoder.layer[0].output.dense.weight)
    assert execute.latency_ms(model, token_batch(), "peftlab") == {"unmerged": 1.0, "merged": None, "base": 2.0}
    assert len(seen) == 2


def test_a_baseline_is_its_own_base(monkeypatch):
    model = tiny_bert()
    _spy(monkeypatch, lambda: model.encoder.layer[0].attention.self.query.weight)
    assert execute.latency_ms(model, token_batch(), "peftlab") == {"unmerged": 1.0, "merged": None, "base": 1.0}


def test_peft_latency_merges_and_puts_the_weights_back_bit_for_bit(monkeypatch):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_bert(), LoraConfig(r=2, target_modules=["query"], init_lora_weights=False))
    host = model.base_model.model.encoder.layer[0].attention.self.query.base_layer
    original = host.weight.detach().clone()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = _spy(monkeypatch, lambda: host.weight)

    assert execute.latency_ms(model, token_batch(), "peft") == {"unmerged": 1.0, "merged": 2.0, "base": 3.0}
    (_, unmerged), (w_merged, merged), (w_base, base) = seen
    assert not torch.allclose(w_merged, original) and torch.equal(w_base, original)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(base, unmerged)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert not any(getattr(m, "merged", False) for m in model.modules())


def test_the_timer_warms_up_once_then_takes_the_median(monkeypatch):
    model, calls = tiny_bert(), []
    model.register_forward_hook(lambda *args: calls.append(1))
    ticks = iter([0.0, 0.005, 1.0, 1.001, 2.0, 2.003, 3.0, 3.010, 4.0, 4.002])  # 5, 1, 3, 10, 2 ms
    monkeypatch.setattr(execute.time, "perf_counter", lambda: next(ticks))
    with torch.no_grad():
        assert execute.median_ms(model, token_batch()) == pytest.approx(3.0)
    assert len(calls) == 1 + execute.LATENCY_REPEATS


# ---- the report -------------------------------------------------------------------------------------


CURVE = [{"step": 2, "wall_s": 1.0, "accuracy": 0.50}, {"step": 4, "wall_s": 2.0, "accuracy": 0.80},
         {"step": 6, "wall_s": 3.0, "accuracy": 0.90}, {"step": 8, "wall_s": 4.0, "accuracy": 0.86}]


def test_time_to_accuracy_is_the_first_validation_at_95_percent_of_the_last():
    assert report.time_to_accuracy(CURVE) == (6, 3.0)  # 0.95 x 0.86 = 0.817: 0.80 is short of it
    assert report.time_to_accuracy(CURVE, share=0.9) == (4, 2.0)  # 0.774
    assert report.time_to_accuracy(CURVE[:2]) == (4, 2.0)
    assert report.time_to_accuracy([{"step": 3, "wall_s": None, "loss": 1.0}]) is None
    assert report.time_to_accuracy(None) is None and report.time_to_accuracy([]) is None


def _record(method: str, seed: int, **measured) -> dict:
    return {"schema": runner.SCHEMA, "run": f"{method}--movie-sentiment--s{seed}", "status": "ok", "phase": "final",
            "task": "movie-sentiment", "method": method, "implementation": "peftlab", "seed": seed, "lr": 1e-3,
            "metrics": {"test": {"accuracy": 0.8 + 0.01 * seed}}, "trainable_parameters": 1000,
            "trainable_share": 1e-3, "train_time_s": 10.0, "s_per_step": 0.5, "cpu_s_per_step": 0.4,
            "peak_rss_mb": 900.0, "adapter_bytes": 4096, "steps": 10, **measured}


def _table_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("|")]


REPORT_SUITE = suites.parse({"run": {"model": "minilm-l6"}, "tasks": ["movie-sentiment"], "seeds": [0, 1],
                             "methods": ["lora", "houlsby"], "baselines": [], "lr": {"default": [1e-3]}}, name="m")


def test_the_report_prints_the_means_over_seeds_and_a_dash_where_a_record_lacks_them():
    late = [{"step": 2, "wall_s": 1.5, "accuracy": 0.4}, {"step": 4, "wall_s": 2.5, "accuracy": 0.82}]
    records = [_record("lora", 0, init_time_s=1.25, validation_curve=CURVE,
                       latency_ms={"unmerged": 12.0, "merged": 10.0, "base": 9.0}),
               _record("lora", 1, init_time_s=1.75, validation_curve=late,
                       latency_ms={"unmerged": 14.0, "merged": 11.0, "base": 10.0}),
               _record("houlsby", 0), _record("houlsby", 1)]  # from before the columns: no measurements
    text = report.markdown(REPORT_SUITE, records, [])
    header, _, *rows = _table_lines(text)[:4]
    lora, houlsby = (next(row for row in rows if row.startswith(f"| {m} |")) for m in ("lora", "houlsby"))
    assert header.endswith("| lr | init s | to 95% (steps / s) | latency unmerged / merged / base ms |")
    # to 95%: seed 0 at step 6 (3.0 s), seed 1 at step 4 (2.5 s); latency: the means
    assert lora.endswith("| 1.50 | 5 / 2.8 | 13.0 / 10.5 / 9.5 |")
    assert houlsby.endswith("| — | — | — |")
    assert report.MEASURED_NOTE in text
    page = page_html.page(REPORT_SUITE, records)
    assert "<th>to 95% (steps / s)</th>" in page and '<td class="num">—</td>' in page


def test_a_method_that_cannot_merge_shows_a_dash_for_merged_only():
    records = [_record("houlsby", s, latency_ms={"unmerged": 20.0, "merged": None, "base": 10.0}) for s in (0, 1)]
    table = _table_lines(report.markdown(REPORT_SUITE, records, []))
    assert table[0].endswith("| lr | latency unmerged / merged / base ms |")  # no init, no curve: not printed
    assert table[2].endswith("| 20.0 / — / 10.0 |")


def test_records_without_the_measurements_give_the_tables_of_before():
    records = [_record(m, s) for m in ("lora", "houlsby") for s in (0, 1)]
    text = report.markdown(REPORT_SUITE, records, [])
    assert _table_lines(text)[0] == ("| method | test.accuracy | seeds | trainable | share | train time (s) | s/step | "
                                     "CPU s/step | peak RSS (MB) | adapter file | lr |")
    assert "—" not in text and report.MEASURED_NOTE not in text


def test_the_peer_table_shows_both_latencies():
    suite = suites.parse({"run": {"model": "minilm-l6"}, "tasks": ["movie-sentiment"], "seeds": [0],
                          "methods": ["lora"], "baselines": [], "lr": {"default": [1e-3]}, "peer": ["lora"]}, name="p")
    ours = _record("lora", 0, latency_ms={"unmerged": 12.0, "merged": 10.0, "base": 9.0})
    theirs = {**_record("lora", 0, latency_ms={"unmerged": 15.0, "merged": 10.5, "base": 9.5}),
              "implementation": "peft", "run": "lora--movie-sentiment--s0--peft"}
    lines = _table_lines(report.markdown(suite, [ours, theirs], []))
    header = next(i for i, line in enumerate(lines) if "peak RSS peft (MB)" in line)
    assert lines[header].endswith("| peak RSS peft (MB) | latency peftlab (ms) | latency peft (ms) |")
    assert lines[header + 1].count("---") == lines[header].count("|") - 1
    assert lines[header + 2].endswith("| 12.0 / 10.0 / 9.0 | 15.0 / 10.5 / 9.5 |")
