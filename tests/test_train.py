"""The training recipe: run directory, resume, atomic checkpoints, NaN stop, the step hook, SFT.

Runs use a tiny random BERT (tests/run_helpers.py) on 200 movie-review snippets: 6 steps
take about a second. One test fine-tunes the real SmolLM2-135M for a few steps.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import peftlab
import peftlab.core
from peftlab import PeftlabError
from peftlab.recipe import checkpoint, config as runconfig, loop, metrics as task_metrics, trainer as train
from run_helpers import metrics, step_losses, tiny_checkpoint, tiny_overrides

TESTS = pathlib.Path(__file__).parent


def _run(tmp_path, name, **extra):
    model_dir = tiny_checkpoint(tmp_path.parent)
    return runconfig.build(None, tiny_overrides(model_dir, tmp_path / name, **extra))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 6-step run (checkpoints at steps 3 and 6)."""
    root = tmp_path_factory.mktemp("reference")
    run = _run(root, "run")
    summary = train.train(run, echo=lambda *a: None)
    return root / "run", summary


def _adapter(run_dir: pathlib.Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def _assert_same_trajectory(a: pathlib.Path, b: pathlib.Path) -> None:
    la, lb = step_losses(a), step_losses(b)
    assert sorted(la) == sorted(lb) == [1, 2, 3, 4, 5, 6]
    for s in la:
        assert lb[s] == pytest.approx(la[s], abs=1e-6), f"step {s}"
    ta, tb = _adapter(a), _adapter(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(tb[k], ta[k], atol=1e-6, rtol=1e-5)


# ---- the run directory ------------------------------------------------------------------------


def test_a_run_directory_holds_config_adapter_metrics_and_summary(reference):
    run_dir, summary = reference
    names = {p.name for p in run_dir.iterdir()}
    assert {"config.yaml", "task.json", "adapter", "metrics.jsonl", "summary.json", "tensorboard",
            "checkpoints"} <= names
    saved = runconfig.validate(__import__("yaml").safe_load((run_dir / "config.yaml").read_text()))
    assert saved.train.steps == 6 and saved.output == str(run_dir) and saved.method["r"] == 4
    assert {p.name for p in (run_dir / "adapter").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    assert any(p.name.startswith("events.out.tfevents") for p in (run_dir / "tensorboard").rglob("*"))
    written = json.loads((run_dir / "summary.json").read_text())
    assert written["steps"] == 6 and written == json.loads(json.dumps(summary))
    # LoRA r=4 on query and value of 2 layers (4 sites x 4 x (32 + 32)) plus the 2-class head (32 x 2 + 2)
    assert written["trainable_parameters"] == 4 * 4 * 64 + 66
    assert written["trainable_share"] == pytest.approx(written["trainable_parameters"] / written["total_parameters"])
    assert written["peak_rss_mb"] > 100 and written["wall_time_s"] > written["train_time_s"] > 0
    assert written["steps_per_second"] > 0
    test = written["metrics"]["test"]
    assert 0 <= test["accuracy"] <= 1 and test["loss"] > 0 and "accuracy" in written["metrics"]["validation"]
    task = json.loads((run_dir / "task.json").read_text())
    assert task == {"kind": "classification", "label_names": ["negative", "positive"], "sizes": [160, 20, 20]}
    # one log line per step, then the final evaluations
    assert [m["step"] for m in metrics(run_dir) if "loss" in m and "grad_norm" in m] == [1, 2, 3, 4, 5, 6]
    assert any("test_accuracy" in m for m in metrics(run_dir))
    assert [p.name for p in checkpoint.sorted_checkpoints(run_dir / "checkpoints")] == ["checkpoint-3", "checkpoint-6"]


def test_the_summary_names_the_source_commit(reference, tmp_path, monkeypatch):
    _, summary = reference
    assert summary["versions"].get("peftlab_commit") == train.source_commit()
    # a checkout: HEAD's commit, "-dirty" once a tracked file under src/ changes
    repo = tmp_path / "checkout"
    (repo / "src").mkdir(parents=True)
    (repo / "src" / "a.py").write_text("x = 1\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    for args in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "one"]):
        subprocess.run([*git, *args], check=True, capture_output=True)
    head = subprocess.run([*git, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert train.source_commit(repo) == head
    (repo / "src" / "a.py").write_text("x = 2\n")
    train.source_commit.cache_clear()
    assert train.source_commit(repo) == head + "-dirty"
    # outside a checkout (an installed wheel) there is no commit, and no key
    assert train.source_commit(tmp_path) is None
    monkeypatch.setattr(train, "source_commit", lambda: None)
    assert "peftlab_commit" not in train.run_versions()


def test_the_saved_adapter_reloads_with_the_trained_head(reference, tmp_path):
    from transformers import AutoModelForSequenceClassification

    run_dir, summary = reference
    model_dir = tiny_checkpoint(tmp_path.parent)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    peftlab.load(model, run_dir / "adapter")
    saved = _adapter(run_dir)
    assert torch.equal(model.classifier.weight, saved["classifier.weight"])
    last = load_file(checkpoint.latest(run_dir / "checkpoints") / "trainable.safetensors")
    for key in saved:  # the final adapter is the last checkpoint's state
        torch.testing.assert_close(last[key], saved[key], atol=0, rtol=0)


def test_an_output_directory_holding_another_run_is_refused_and_kept(reference, tmp_path):
    run_dir, _ = reference
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    different = _run(tmp_path, "copy", **{"optimizer.lr": 0.02})
    with pytest.raises(PeftlabError, match=r"holds a different run \(config differs at optimizer.lr\).*--overwrite"):
        train.train(different)
    same = _run(tmp_path, "copy")
    with pytest.raises(PeftlabError, match="holds this run already.*--resume.*--overwrite"):
        train.train(same)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(PeftlabError, match="holds other files"):
        train.train(_run(tmp_path, "other"))
    assert {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_overwrite_replaces_the_old_run(reference, tmp_path):
    run_dir, _ = reference
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    (copy / "stale.txt").write_text("old")
    train.train(_run(tmp_path, "copy", **{"train.steps": 2, "train.save_every": 2}), overwrite=True,
                echo=lambda *a: None)
    assert not (copy / "stale.txt").exists()
    assert json.loads((copy / "summary.json").read_text())["steps"] == 2


def test_resume_needs_a_checkpoint_and_the_same_config(reference, tmp_path):
    with pytest.raises(PeftlabError, match="holds no run"):
        train.train(_run(tmp_path, "empty"), resume=True)
    run_dir, _ = reference
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "checkpoints")
    with pytest.raises(PeftlabError, match="has no checkpoint yet.*--overwrite"):
        train.train(_run(tmp_path, "copy"), resume=True)
    with pytest.raises(PeftlabError, match="differs from the run.*at method.r"):
        train.train(_run(tmp_path, "copy", **{"method.r": 2}), resume=True)


# ---- resume and checkpoints -------------------------------------------------------------------


def test_resume_reproduces_the_uninterrupted_run_step_by_step(reference, tmp_path, monkeypatch):
    run_dir, _ = reference
    calls = []

    def interrupt_in_step_5(model):  # called once per training forward
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return None

    monkeypatch.setattr(peftlab.core, "regularization", interrupt_in_step_5)
    with pytest.raises(KeyboardInterrupt):
        train.train(_run(tmp_path, "run"), echo=lambda *a: None)
    assert max(step_losses(tmp_path / "run")) == 4  # steps 1-4 logged, checkpoint at 3
    monkeypatch.undo()
    summary = train.train(_run(tmp_path, "run"), resume=True, echo=lambda *a: None)
    assert summary["resumed_from"].endswith("checkpoint-3")
    _assert_same_trajectory(run_dir, tmp_path / "run")  # step 4 is redone, not logged twice


KILLED_DURING_SAVE = r"""
import os, sys, time, pathlib
sys.path.insert(0, sys.argv[1])
from run_helpers import tiny_overrides
from peftlab.recipe import checkpoint, config as runconfig, trainer as train

real_save_file = checkpoint.save_file
def save_file(tensors, path):
    if "checkpoint-6" in str(path) and path.name == "optimizer.safetensors":
        pathlib.Path(path).write_bytes(b"half a file")  # the write is under way...
        pathlib.Path(sys.argv[4]).touch()
        time.sleep(600)                                    # ...when the process is killed
    real_save_file(tensors, path)
checkpoint.save_file = save_file
train.train(runconfig.build(None, tiny_overrides(pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3]))))
"""


def test_a_process_killed_while_saving_leaves_the_previous_checkpoint_loadable(reference, tmp_path):
    run_dir, _ = reference
    model_dir = tiny_checkpoint(tmp_path.parent)
    marker = tmp_path / "saving"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", KILLED_DURING_SAVE, str(TESTS), str(model_dir),
                              str(tmp_path / "run"), str(marker)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not marker.exists():
        assert child.poll() is None, child.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "the child never reached the second checkpoint"
        time.sleep(0.2)
    child.send_signal(signal.SIGKILL)
    child.wait()
    folder = tmp_path / "run" / "checkpoints"
    assert any(p.name.startswith(".tmp-checkpoint-6") for p in folder.iterdir())  # the half-written one
    assert checkpoint.latest(folder).name == "checkpoint-3"
    # the previous checkpoint loads, and resuming from it finishes the run as if never killed
    summary = train.train(_run(tmp_path, "run"), resume=True, echo=lambda *a: None)
    assert summary["resumed_from"].endswith("checkpoint-3")
    assert not any(p.name.startswith(".tmp-") for p in folder.iterdir())
    _assert_same_trajectory(run_dir, tmp_path / "run")


def test_gradient_checkpointing_recomputes_the_layers_and_trains_the_same_steps(reference, tmp_path, monkeypatch):
    """train.gradient_checkpointing: transformers' checkpoint wraps each encoder layer (counted here), and
    the recomputed forward gives the uninterrupted run's losses and adapter (dropout replays its RNG)."""
    import transformers.modeling_utils as modeling

    calls = []
    real = modeling.checkpoint  # torch.utils.checkpoint.checkpoint, as transformers imported it

    def counted(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return real(*args, **kwargs)

    monkeypatch.setattr(modeling, "checkpoint", counted)
    run = _run(tmp_path, "checkpointed", **{"train.gradient_checkpointing": True})
    train.train(run, echo=lambda *a: None)
    assert calls and set(calls) == {False}  # non-reentrant: the frozen embeddings need no input gradients
    _assert_same_trajectory(reference[0], tmp_path / "checkpointed")


def test_optimizer_state_round_trips_through_safetensors_and_json():
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    for opt_class, kwargs in ((torch.optim.AdamW, {"betas": (0.8, 0.9)}), (torch.optim.SGD, {"momentum": 0.9})):
        opt = opt_class(params, lr=0.1, **kwargs)
        for _ in range(2):
            sum((p ** 2).sum() for p in params).backward()
            opt.step()
        tensors, meta = checkpoint.optimizer_state(opt)
        fresh = opt_class(params, lr=0.5, **kwargs)
        checkpoint.load_optimizer_state(fresh, tensors, json.loads(json.dumps(meta)))
        a, b = opt.state_dict(), fresh.state_dict()
        assert a["param_groups"] == b["param_groups"]
        for i in a["state"]:
            for k, v in a["state"][i].items():
                assert torch.equal(b["state"][i][k], v), (opt_class, k)


# ---- NaN, the step hook, regularisation, parameter groups ---------------------------------------


def test_a_nan_loss_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    calls = []

    def nan_in_step_3(model):
        calls.append(1)
        return torch.tensor(float("nan")) if len(calls) == 3 else None

    monkeypatch.setattr(peftlab.core, "regularization", nan_in_step_3)
    with pytest.raises(loop.TrainingDiverged, match=r"loss became nan at step 3; the last good checkpoint is "
                                                     r".*checkpoint-2.*Lower optimizer.lr"):
        train.train(_run(tmp_path, "run", **{"train.save_every": 1}), echo=lambda *a: None)
    folder = tmp_path / "run" / "checkpoints"
    assert [p.name for p in checkpoint.sorted_checkpoints(folder)] == ["checkpoint-1", "checkpoint-2"]
    assert not (tmp_path / "run" / "adapter").exists()
    saved = load_file(folder / "checkpoint-2" / "trainable.safetensors")
    assert all(torch.isfinite(v).all() for v in saved.values())


def test_the_recipe_calls_the_step_hook_adds_the_regulariser_and_uses_the_method_param_groups(
        reference, tmp_path, monkeypatch):
    run_dir, _ = reference
    seen_steps = []
    monkeypatch.setattr(peftlab.LoRA, "step_hook", True)
    monkeypatch.setattr(peftlab.LoRA, "after_step", lambda self, adapters, step: seen_steps.append(step))
    monkeypatch.setattr(peftlab.LoRA, "adds_loss", True)
    monkeypatch.setattr(peftlab.LoRA, "loss", lambda self, adapters: torch.tensor(5.0))

    def freeze_b(self, adapters, lr):  # B at learning rate 0: it must stay at its initial zeros
        a = [x.A for x in adapters.values()]
        b = [x.B for x in adapters.values()]
        return [{"params": a, "lr": lr}, {"params": b, "lr": 0.0}]

    monkeypatch.setattr(peftlab.LoRA, "param_groups", freeze_b)
    train.train(_run(tmp_path, "run"), echo=lambda *a: None)
    assert seen_steps == [1, 2, 3, 4, 5, 6]
    first = step_losses(tmp_path / "run")[1]
    assert first == pytest.approx(step_losses(run_dir)[1] + 5.0, abs=1e-5)  # same batch, plus the constant
    adapter = _adapter(tmp_path / "run")
    b_keys = [k for k in adapter if k.endswith(".B")]
    assert b_keys and all(torch.count_nonzero(adapter[k]) == 0 for k in b_keys)
    assert any(torch.count_nonzero(adapter[k]) for k in adapter if k.endswith(".A"))


def test_the_recipe_fills_the_step_count_and_rate_that_a_method_takes_from_the_run():
    """AdaLoRA, LaMDA, IncreLoRA and LoRA-SB schedule over the run; LoRA-SB also needs its rate."""
    def validated(method, **train_values):
        values = runconfig.default_dict()
        values["method"], values["optimizer"]["lr"] = method, 3e-3
        values["train"].update(train_values)
        return runconfig.validate(values)

    run = validated({"name": "adalora", "targets": ["query"]})  # no total_steps: fine in a run config
    train.fill_run_fields(run, 8454)
    assert run.method["total_steps"] == 265  # the default job: ceil(8,454 / 32) steps of one epoch
    for values, expected in (({"steps": 40}, 40), ({"grad_accum": 2}, 133), ({"epochs": 2.0}, 530)):
        run = validated({"name": "lamda"}, **values)
        train.fill_run_fields(run, 8454)
        assert run.method["total_steps"] == expected, values
    run = validated({"name": "lora_sb", "total_steps": 7})  # what the config says stays
    train.fill_run_fields(run, 8454)
    assert (run.method["total_steps"], run.method["lr"]) == (7, 3e-3)
    run = validated({"name": "lora"})
    train.fill_run_fields(run, 8454)
    assert run.method == {"name": "lora"}  # LoRA takes nothing from the run
    with pytest.raises(PeftlabError, match="config key method: .*tinit < total_steps - tfinal"):
        validated({"name": "adalora", "tinit": 30, "tfinal": 20}, steps=40)


def test_a_scheduled_method_trains_without_total_steps_and_saves_the_filled_value(tmp_path):
    run = _run(tmp_path, "run", **{"method.name": "lamda", "method.eta": 0.25})
    train.train(run, echo=lambda *a: None)
    saved = runconfig.build(tmp_path / "run" / "config.yaml", [])
    assert saved.method["total_steps"] == 6  # one more column of B frozen every 0.25 * 6 steps


def test_classification_metrics_compute_accuracy_and_macro_f1():
    from types import SimpleNamespace

    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.0, 1.0]]).numpy()
    out = task_metrics.classification_metrics(SimpleNamespace(predictions=logits, label_ids=[0, 1, 1, 1]))
    assert out["accuracy"] == 0.75
    assert out["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)


# ---- the real chat model ------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_sft_on_chatterbot_runs_and_its_loss_falls(tmp_path):
    """8 chats, batch 4, 6 steps = 3 passes: the answer loss of the last pass is below the first."""
    run = runconfig.build(None, [
        "model=smollm2-135m", "task=chatterbot", f"output={tmp_path / 'sft'}", "data.limit=8",
        "data.split=[1.0, 0.0, 0.0]", "data.max_length=64", "method.targets=[q_proj, v_proj]",
        "optimizer.lr=0.002", "train.batch_size=4", "train.steps=6", "train.log_every=1",
        "train.save_every=6", "train.progress=false",
    ])
    train.train(run, echo=lambda *a: None)
    losses = step_losses(tmp_path / "sft")
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert losses[5] + losses[6] < 0.8 * (losses[1] + losses[2])
    assert (peftlab.recipe.models.cache_dir() / "smollm2-135m-instruct-fp32" / "config.json").is_file()
    config = json.loads((tmp_path / "sft" / "adapter" / "adapter_config.json").read_text())
    assert "default" in config["adapters"]
