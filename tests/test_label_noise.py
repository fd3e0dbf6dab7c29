"""Label noise (`noise:` in the run config) and the robust losses inside the recipe: only training
labels change, exactly the configured share, recorded in task.json; example ids reach ALDR-KL;
bad configs are refused before any model loads; the default job is unchanged."""
from __future__ import annotations

import json
import types
from collections import Counter

import pytest
import torch

import peftlab
from peftlab.errors import PeftlabError
from peftlab.recipe import config as runconfig
from peftlab.recipe import data, loop, trainer
from peftlab.recipe.config import Noise
from run_helpers import tiny_checkpoint, tiny_overrides

ROWS = [{"text": f"row {i}", "label": i % 3} for i in range(200)]


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.4])
def test_uniform_noise_changes_exactly_that_share_to_other_classes(rate):
    noisy, record = data.label_noise(ROWS, Noise(kind="uniform", rate=rate, seed=5), classes=3, seed=0)
    changed = [i for i, (a, b) in enumerate(zip(ROWS, noisy)) if a["label"] != b["label"]]
    assert len(changed) == round(rate * 200) and [f[0] for f in record["flipped"]] == changed
    assert all(ROWS[i]["label"] == clean and noisy[i]["label"] == new for i, clean, new in record["flipped"])
    assert [r["text"] for r in noisy] == [r["text"] for r in ROWS] and ROWS[0]["label"] == 0  # input untouched
    assert record | {"flipped": None} == {"kind": "uniform", "rate": rate, "seed": 5, "training_examples": 200,
                                          "flipped": None}
    if rate == 0.4:  # every other class is reached
        assert Counter((clean, new) for _, clean, new in record["flipped"]).keys() == {
            (a, b) for a in range(3) for b in range(3) if a != b}


def test_class_dependent_noise_moves_each_label_to_the_next_class():
    noisy, record = data.label_noise(ROWS, Noise(kind="class_dependent", rate=0.3), classes=3, seed=1)
    assert len(record["flipped"]) == 60 and record["seed"] == 1  # no noise seed: the run's
    assert all(new == (clean + 1) % 3 for _, clean, new in record["flipped"])


def test_noise_is_seeded_and_absent_noise_changes_nothing():
    first = data.label_noise(ROWS, Noise(rate=0.2, seed=3), classes=3, seed=0)
    assert first == data.label_noise(ROWS, Noise(rate=0.2, seed=3), classes=3, seed=9)
    assert first != data.label_noise(ROWS, Noise(rate=0.2, seed=4), classes=3, seed=0)
    assert data.label_noise(ROWS, None, classes=3, seed=0) == (ROWS, None)


def _run(tmp_path, *extra):
    return runconfig.build(None, [*tiny_overrides(tiny_checkpoint(tmp_path.parent), tmp_path / "run"), *extra])


def test_only_the_training_split_gets_noise(tmp_path):
    run = _run(tmp_path, "noise={kind: uniform, rate: 0.25}")
    state = types.SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)
    _, _, (train, validation, test), _, _ = trainer._prepare(run, state, resume=False, overwrite=False)
    clean = data.split(data.load(run.task, run.data, run.seed).rows, tuple(run.data.split), run.seed)
    assert validation == clean[1] and test == clean[2]
    changed = [i for i, (a, b) in enumerate(zip(clean[0], train)) if a["label"] != b["label"]]
    record = json.loads((tmp_path / "run" / "task.json").read_text())["noise"]
    assert len(changed) == round(0.25 * len(train)) == len(record["flipped"]) > 0
    assert [f[0] for f in record["flipped"]] == changed and record["seed"] == run.seed


def test_a_run_with_noise_and_aldr_kl_passes_example_ids_to_the_loss(tmp_path, monkeypatch):
    from peftlab.losses.aldr_kl import ALDRKL

    seen, lambdas = [], {}
    original = ALDRKL.per_example

    def recording(self, logits, labels, example_ids=None, **batch):
        seen.append(None if example_ids is None else example_ids.tolist())
        out = original(self, logits, labels, example_ids=example_ids, **batch)
        lambdas["table"] = self.lambdas.clone()
        return out

    monkeypatch.setattr(ALDRKL, "per_example", recording)
    run = _run(tmp_path, "noise={kind: class_dependent, rate: 0.4, seed: 1}", "loss={name: aldr_kl, lambda0: 1.0}",
               "train.steps=4")
    trainer.train(run, echo=lambda *a: None)
    training = [ids for ids in seen if ids is not None]
    sizes = json.loads((tmp_path / "run" / "task.json").read_text())["sizes"]
    assert len(training) == 4 and all(len(ids) == 8 for ids in training)  # 4 steps of 8 numbered rows
    assert all(0 <= i < sizes[0] for ids in training for i in ids)
    assert None in seen  # evaluation batches carry no ids and still get a loss
    table = lambdas["table"]
    assert (table[[i for ids in training for i in ids]] != 1.0).all()  # every seen example's lambda moved
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["metrics"]["test"]["loss"] > 0 and json.loads(
        (tmp_path / "run" / "task.json").read_text())["noise"]["kind"] == "class_dependent"


def test_the_recipe_loss_is_the_library_loss_and_torch_names_still_work():
    logits = torch.randn(6, 3)
    labels = torch.tensor([0, 1, 2, -100, 1, 0])
    outputs = {"logits": logits}  # the mean over the 5 labelled rows, as the library reduces
    gce = loop.task_loss("classification", {"name": "gce", "q": 0.5})(outputs, labels)
    torch.testing.assert_close(gce, peftlab.loss("gce", q=0.5)(logits, labels))
    nll = loop.task_loss("classification", {"name": "nll_loss"})(outputs, labels, example_ids=torch.arange(6))
    torch.testing.assert_close(nll, torch.nn.functional.nll_loss(logits, labels))


def test_the_default_job_has_no_noise_so_bench_hashes_stay():
    assert "noise" not in runconfig.default_dict()
    run = runconfig.validate(runconfig.default_dict())
    assert run.noise is None and run.to_dict()["noise"] is None
    assert runconfig.validate({**runconfig.default_dict(), "noise": None}).noise is None


@pytest.mark.parametrize("override, message", [
    ("noise={kind: pairwise, rate: 0.2}", "noise.kind = 'pairwise' is unknown; allowed: uniform, class_dependent"),
    ("noise={rate: 1.0}", r"noise.rate = 1.0 must be in \[0, 1\)"),
    ("noise={rate: -0.1}", r"noise.rate = -0.1 must be in \[0, 1\)"),
    ("noise={rate: 0.2, seed: -1}", "noise.seed = -1 must be >= 0"),
    ("noise={rate: 0.2, flips: 3}", r"unknown config key\(s\) noise.flips; noise allows: kind, rate, seed"),
    ("noise={rate: high}", "noise.rate = 'high' has the wrong type: give a number"),
    ("loss.name=hinge", "loss.name = 'hinge' is unknown; allowed: cross_entropy, ldr_kl, aldr_kl"),
    ("loss={name: gce, q: 2}", r"config key loss: loss gce q = 2 must be in \(0, 1\]"),
    ("loss={name: gce, weight: 2}", r"unknown config key\(s\) loss.weight; loss allows: name, q"),
    ("loss={name: ldr_kl, lam: [1, 2]}", r"config key loss.lam = \[1, 2\] has the wrong shape: give a number"),
])
def test_bad_noise_and_loss_sections_are_refused_naming_the_key(override, message):
    with pytest.raises(PeftlabError, match=message):
        runconfig.build(None, [override])


def test_aldr_kl_and_noise_need_a_classification_task(tmp_path, monkeypatch):
    from peftlab.recipe import models

    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("a model loaded"))
    sft = ["model=smollm2-135m", "task=chatterbot"]
    with pytest.raises(PeftlabError, match="loss.name = 'aldr_kl' needs example ids, which only classification"):
        runconfig.build(None, [*sft, "loss.name=aldr_kl"])
    with pytest.raises(PeftlabError, match="noise: label noise needs a classification task; task chatterbot is sft"):
        runconfig.build(None, [*sft, "noise={rate: 0.2}"])
    assert runconfig.build(None, [*sft, "loss={name: ldr_kl, lam: 2.0}"]).loss == {"name": "ldr_kl", "lam": 2.0}


def test_noise_needs_two_classes():
    with pytest.raises(PeftlabError, match="the task has 1 class\\(es\\), so no label can change"):
        data.label_noise([{"text": "a", "label": 0}], Noise(rate=0.5), classes=1, seed=0)
