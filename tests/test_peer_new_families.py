"""The `peft` peers of IA3, LN tuning, prompt tuning, P-tuning, prefix tuning and P-tuning v2.

Each peer is trained for real through the recipe (3 steps of the tiny BERT classifier from
run_helpers on movie sentiment, the bench's path: trainer.Hooks(adapt=peer.adapt)) beside the
peftlab run of the same config. Every mapped config starts from the same values in both (IA3's
ones, the norm layers' own values, and for prompts and prefixes the same random draws under the
run's seed), so the two runs match step for step: losses to 1e-5, final logits to 1e-4.
The peer trains only the adapter and the classification head, and its saved folder reloads in
`peft` to the logits the trained model gave (1e-5).
"""
from __future__ import annotations

import json
import pathlib

import pytest
import torch

import peftlab
from conftest import tiny_gpt2, tiny_llama
from peftlab.recipe import config as runconfig, peer, trainer as train
from run_helpers import step_losses, tiny_checkpoint, tiny_overrides

STEPS = 3
TEXTS = ["a warm, funny and moving film", "dull, long and badly acted"]

# method section -> the names of the peer's trained parameters, besides the head's copy
CASES = {
    "ia3": ({"name": "ia3", "targets": ["key", "value", "output.dense"], "feedforward": ["output.dense"]}, "ia3_l"),
    "ln_tuning": ({"name": "ln_tuning", "targets": None}, "ln_tuning_layers"),
    "prompt": ({"name": "prompt", "num_virtual_tokens": 4}, "prompt_encoder"),
    # peft's P-tuning encoder has no vocabulary init: peftlab's init=random is the same start
    "p_tuning": ({"name": "prompt", "num_virtual_tokens": 4, "encoder": "mlp", "encoder_hidden_size": 8,
                  "init": "random"}, "prompt_encoder"),
    "prefix": ({"name": "prefix", "num_virtual_tokens": 4, "encoder_hidden_size": 8}, "prompt_encoder"),
    "p_tuning_v2": ({"name": "p_tuning_v2", "num_virtual_tokens": 4}, "prompt_encoder"),
}


def _run(tmp_path: pathlib.Path, method: dict, name: str):
    model_dir = tiny_checkpoint(tmp_path.parent)
    overrides = [o for o in tiny_overrides(model_dir, tmp_path / name, **{"train.steps": STEPS,
                                                                           "train.save_every": 1000})
                 if not o.startswith("method.")]
    overrides += [f"method.{k}={json.dumps(v)}" for k, v in method.items()]
    return runconfig.build(None, overrides), model_dir


def _train(tmp_path: pathlib.Path, method: dict, implementation: str) -> dict:
    """One run; its summary with "extra": the trained parameters' names, the head's change, final logits."""
    run, _ = _run(tmp_path, method, implementation)

    def trained(model, tokenizer) -> dict:
        model.eval()
        with torch.no_grad():
            logits = model(**tokenizer(TEXTS, return_tensors="pt", padding=True)).logits
        return {"trained": sorted(n for n, p in model.named_parameters() if p.requires_grad),
                "logits": logits.tolist(), "head_change": _head_change(model)}

    hooks = train.Hooks()
    hooks.adapt = peer.adapt if implementation == "peft" else None
    hooks.trained = trained
    summary = train.train(run, overwrite=True, echo=lambda *a: None, hooks=hooks)
    summary["losses"] = step_losses(tmp_path / implementation)
    return summary


def _head_change(model) -> float | None:
    """peft keeps the head's starting copy (ModulesToSaveWrapper.original_module): how far training moved it."""
    from peft.utils import ModulesToSaveWrapper

    wrappers = [m for name, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)
                and name.endswith("classifier")]
    if len(wrappers) != 1:
        return None
    wrapper = wrappers[0]
    return (wrapper.modules_to_save["default"].weight - wrapper.original_module.weight).abs().max().item()


@pytest.mark.parametrize("case", list(CASES))
def test_peer_run_trains_adapter_and_head_and_matches_peftlab(case, tmp_path):
    method, adapter_key = CASES[case]
    ours, theirs = _train(tmp_path, method, "peftlab"), _train(tmp_path, method, "peft")

    # the same start and the same steps: losses match from the first step on (fp32, 1e-5)
    assert sorted(theirs["losses"]) == list(range(1, STEPS + 1))
    for step, loss in ours["losses"].items():
        assert theirs["losses"][step] == pytest.approx(loss, abs=1e-5), f"step {step}"
    torch.testing.assert_close(torch.tensor(theirs["extra"]["logits"]), torch.tensor(ours["extra"]["logits"]),
                               atol=1e-4, rtol=1e-4)
    assert theirs["trainable_parameters"] == ours["trainable_parameters"]

    # the peer trains the adapter and the head, nothing else; the head did move
    names = theirs["extra"]["trained"]
    head = [n for n in names if ".classifier.modules_to_save.default." in n]
    assert sorted(n.rsplit(".", 1)[1] for n in head) == ["bias", "weight"]
    assert all(adapter_key in n for n in names if n not in head) and len(names) > len(head)
    assert theirs["extra"]["head_change"] > 1e-4

    # the peer's saved folder reloads in peft to the trained model's logits
    _check_reload(tmp_path, method, theirs["extra"]["logits"])


def _check_reload(tmp_path: pathlib.Path, method: dict, expected: list) -> None:
    from peft import PeftModel
    from transformers import AutoTokenizer, BertForSequenceClassification

    _, model_dir = _run(tmp_path, method, "peft")
    base = BertForSequenceClassification.from_pretrained(model_dir, num_labels=2)  # a fresh, untrained head
    loaded = PeftModel.from_pretrained(base, tmp_path / "peft" / "adapter").eval()
    peer._backbone_takes_past_key_values(loaded, [])  # what the peer does after get_peft_model
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with torch.no_grad():
        logits = loaded(**tokenizer(TEXTS, return_tensors="pt", padding=True)).logits
    torch.testing.assert_close(logits, torch.tensor(expected), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_prompt_peer_of_a_causal_lm_scores_the_callers_tokens(tmp_path):
    """peft's causal-LM prompt forward returns logits for the prompt's positions too; the peer cuts them,
    so the recipe's loss sees (batch, tokens) logits and the runs match (3 steps of SFT, 1e-5)."""
    from run_helpers import tiny_chat_checkpoint

    model_dir = tiny_chat_checkpoint(tmp_path.parent)
    sets = {"model": str(model_dir), "task": "chatterbot", "data.limit": 24, "data.max_length": 64,
            "method.name": "prompt", "method.num_virtual_tokens": 4, "train.steps": STEPS, "train.batch_size": 4,
            "train.save_every": 1000, "train.log_every": 1, "train.progress": False, "optimizer.lr": 0.01}
    summaries = {}
    for implementation in ("peftlab", "peft"):
        run = runconfig.build(None, [f"{k}={json.dumps(v)}" for k, v in
                                     {**sets, "output": str(tmp_path / implementation)}.items()])
        hooks = train.Hooks()
        hooks.adapt = peer.adapt if implementation == "peft" else None
        summaries[implementation] = train.train(run, overwrite=True, echo=lambda *a: None, hooks=hooks)
    ours, theirs = step_losses(tmp_path / "peftlab"), step_losses(tmp_path / "peft")
    assert sorted(theirs) == list(range(1, STEPS + 1))
    for step, loss in ours.items():
        assert theirs[step] == pytest.approx(loss, abs=1e-5), f"step {step}"
    assert summaries["peft"]["trainable_parameters"] == summaries["peftlab"]["trainable_parameters"]
    assert (tmp_path / "peft" / "adapter" / "adapter_model.safetensors").is_file()


# ---- the mappings themselves (no training) --------------------------------------------------------


class Run:
    kind = "classification"
    method: dict = {}


def _plan(method: dict, model, head="classifier"):
    Run.method = method
    return peer.plan_for(Run, model, head)


def test_ia3_peer_has_peftlab_sites_feedforward_layers_and_conv1d_layout():
    model = tiny_gpt2()
    fields = {"targets": ["c_attn", "mlp.c_proj"], "feedforward": ["mlp.c_proj"]}
    config = _plan({"name": "ia3", **fields}, model, head=None).config
    ours = peftlab.adapters(peftlab.attach(tiny_gpt2(), peftlab.IA3(**fields)), "default")
    assert config.target_modules == set(ours)
    assert config.feedforward_modules == {s for s, a in ours.items() if a.feedforward} == {
        "transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"}
    assert config.fan_in_fan_out and config.modules_to_save is None


def test_prompt_peer_init_and_task_type():
    from peft import PromptTuningInit

    model = tiny_llama()
    sampled = _plan({"name": "prompt", "num_virtual_tokens": 3}, model, head=None).config
    drawn = _plan({"name": "prompt", "num_virtual_tokens": 3, "init": "random"}, model, head=None).config
    assert sampled.prompt_tuning_init == PromptTuningInit.SAMPLE_VOCAB and drawn.prompt_tuning_init == "RANDOM"
    assert sampled.task_type == "CAUSAL_LM" and sampled.num_virtual_tokens == 3
    mlp = _plan({"name": "prompt", "encoder": "mlp"}, model, head=None).config  # m defaults to the hidden size
    assert mlp.peft_type == "P_TUNING" and mlp.encoder_hidden_size == model.config.hidden_size


def test_prefix_peer_width_defaults_to_kv_dim():
    model = tiny_llama()
    kv_dim = model.config.num_key_value_heads * (model.config.hidden_size // model.config.num_attention_heads)
    config = _plan({"name": "prefix", "num_virtual_tokens": 3}, model, head=None).config
    assert config.prefix_projection and config.encoder_hidden_size == kv_dim
    assert not _plan({"name": "p_tuning_v2", "num_virtual_tokens": 3}, model, head=None).config.prefix_projection
