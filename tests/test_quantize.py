"""Adapters on a quantized frozen base (peftlab.quantize, bitsandbytes NF4 / int8).

Trains with the packed base unchanged, merges with the requantization error reported (and equal
to one computed here), unmerges exactly, saves adapters only, refuses bad input before any
change, LoftQ removes part of the quantization error (peft's decomposition for comparison), every
method attaches and trains or is refused with the declared message, and `peftlab train` trains,
saves and resumes on a quantized base.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import shutil
import warnings

import pytest
import torch
from torch import nn

import peftlab
from peftlab import PeftlabError
from peftlab import quantize as Q
from peftlab.registry import method_class
from conftest import output_of, token_batch, tiny_bert, tiny_gpt2, tiny_llama

SCHEMES = ["nf4", "int8"]


def quantized_llama(scheme: str = "nf4", seed: int = 0) -> nn.Module:
    model = tiny_llama(seed)
    Q.quantize(model, scheme)
    return model


def lm_batch(seed: int = 1) -> dict:
    batch = token_batch(seed)
    return {**batch, "labels": batch["input_ids"].clone()}


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(before: dict[str, torch.Tensor], model: nn.Module) -> None:
    after = model.state_dict()
    assert set(after) == set(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# ---- quantize ------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantize_replaces_the_linear_layers_but_the_head_and_keeps_the_weights_close(scheme):
    model = tiny_llama()
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if type(m) is nn.Linear}
    summary = Q.quantize(model, scheme)
    assert summary.kept == ["lm_head"] and len(summary.layers) == 14
    # fp32 -> 4 bits plus an fp32 scale per 32-block (this model's rows) and its quant state: > 5x smaller
    assert summary.bytes_after < summary.bytes_before / (3 if scheme == "int8" else 5)
    limit = {"nf4": 0.12, "int8": 0.01}[scheme]  # NF4 ~9%, int8 ~0.6% relative error on a Gaussian weight
    for name in summary.layers:
        layer = model.get_submodule(name)
        assert Q.is_quantized(layer)
        assert relative(Q.dequantized_weight(layer), weights[name]) < limit
    # the layer computes with exactly the weight dequantized_weight gives (what merges start from)
    layer = model.get_submodule(summary.layers[0])
    x = torch.randn(5, layer.in_features)
    torch.testing.assert_close(layer(x), x @ Q.dequantized_weight(layer).T, rtol=0, atol=1e-6)


def test_nf4_blocks_never_straddle_rows():
    """bitsandbytes' CPU dequantization misreads blocks across rows; a 32-wide row takes 32-blocks."""
    weight = torch.randn(32, 32) * 0.02
    assert Q.nf4_blocksize(32) == 32 and Q.nf4_blocksize(384) == 64 and Q.nf4_blocksize(100) is None
    assert relative(Q.quantize_dequantize(weight, "nf4"), weight) < 0.12


# ---- training, merging, saving --------------------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
def test_lora_trains_on_a_quantized_base_whose_packed_weights_never_change(scheme):
    model = quantized_llama(scheme)
    base = state(model)
    peftlab.attach(model, peftlab.LoRA(r=4, targets="all-linear"))
    optimizer = torch.optim.AdamW(peftlab.param_groups(model, 1e-2))
    model.train()
    losses = []
    for _ in range(6):
        loss = model(**lm_batch()).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    peftlab.detach(model)
    assert_same_state(base, model)  # packed weights and their scales, bit for bit


@pytest.mark.parametrize("scheme", SCHEMES)
def test_merge_reports_the_requantization_error_and_unmerge_restores_the_packed_weights(scheme):
    model = quantized_llama(scheme)
    peftlab.attach(model, peftlab.LoRA(r=4, alpha=8, targets=["q_proj", "down_proj"]))
    with torch.no_grad():
        for adapter in peftlab.adapters(model, "default").values():
            adapter.B.normal_(std=0.05)
    before, batch = state(model), token_batch()
    with torch.no_grad():
        unmerged = output_of(model, batch)
    expected = {}  # the error computed here: requantize the exact fp32 merge of the dequantized weight
    for site, adapter in peftlab.adapters(model, "default").items():
        exact = Q.dequantized_weight(model.get_submodule(site)) + 2.0 * adapter.B.detach() @ adapter.A.detach()
        error = Q.quantize_dequantize(exact, scheme) - exact
        expected[site] = (error.abs().max().item(), (error.norm() / exact.norm()).item())
    with pytest.warns(UserWarning, match="requantized them: relative Frobenius error"):
        peftlab.merge(model)
    reported = Q.merge_errors(model)["default"]
    assert reported.keys() == expected.keys()
    for site, (max_abs, rel) in expected.items():
        assert reported[site] == pytest.approx((max_abs, rel), rel=1e-4)
        assert rel > 1e-4  # requantizing is not free: the error is real, and reported
    with torch.no_grad():
        merged = output_of(model, batch)
    assert not torch.equal(merged, unmerged)
    peftlab.unmerge(model)
    assert_same_state(before, model)
    assert Q.merge_errors(model) == {}
    with torch.no_grad():
        torch.testing.assert_close(output_of(model, batch), unmerged, rtol=0, atol=0)


def test_dequantize_model_then_detach_keep_merged_is_a_plain_exact_fp32_model():
    model = quantized_llama("nf4")
    peftlab.attach(model, peftlab.LoRA(r=4, targets=["q_proj", "v_proj"]))
    with torch.no_grad():
        for adapter in peftlab.adapters(model, "default").values():
            adapter.B.normal_(std=0.05)
        adapted = output_of(model, token_batch())
    replaced = Q.dequantize_model(model)
    assert len(replaced) == 14 and not any(Q.is_quantized(m) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(output_of(model, token_batch()), adapted, rtol=0, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no requantization, so nothing to warn about
        peftlab.detach(model, keep_merged=True)
    assert all(".absmax" not in k and "quant_" not in k for k in model.state_dict())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(output_of(model, token_batch()), adapted, rtol=0, atol=1e-5)


def test_detach_keep_merged_on_the_quantized_base_keeps_the_requantized_merge():
    model = quantized_llama("int8")
    peftlab.attach(model, peftlab.LoRA(r=4, targets=["q_proj"]))
    with torch.no_grad():
        for adapter in peftlab.adapters(model, "default").values():
            adapter.B.normal_(std=0.05)
    with pytest.warns(UserWarning):
        peftlab.merge(model)
    with torch.no_grad():
        merged = output_of(model, token_batch())
    peftlab.unmerge(model)
    with pytest.warns(UserWarning):
        peftlab.detach(model, keep_merged=True)
    assert Q.is_quantized(model.model.layers[0].self_attn.q_proj)
    with torch.no_grad():
        torch.testing.assert_close(output_of(model, token_batch()), merged, rtol=0, atol=0)


def test_save_writes_adapters_only_and_loads_into_a_fresh_quantized_base(tmp_path):
    from safetensors.torch import load_file

    model = quantized_llama("nf4")
    peftlab.attach(model, peftlab.LoRA(r=4, targets="all-linear"))
    with torch.no_grad():
        for adapter in peftlab.adapters(model, "default").values():
            adapter.B.normal_(std=0.05)
        adapted = output_of(model, token_batch())
    peftlab.save(model, tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert len(saved) == 28 and all(".adapters.default." in k for k in saved)
    fresh = quantized_llama("nf4")
    peftlab.load(fresh, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(output_of(fresh, token_batch()), adapted, rtol=0, atol=1e-6)


# ---- bad input: one clear error, nothing changed ----------------------------------------------------


def test_unknown_scheme_lists_the_accepted_names_and_changes_nothing():
    model = tiny_llama()
    before = state(model)
    with pytest.raises(PeftlabError, match="unknown quantization 'nf3': use one of 'nf4', 'int8'"):
        Q.quantize(model, "nf3")
    assert_same_state(before, model)


def test_a_model_without_supported_layers_is_refused_naming_the_fix():
    model = tiny_gpt2()  # Conv1D layers only, and a tied lm_head
    before = state(model)
    with pytest.raises(PeftlabError, match="no layer to quantize.*torch.nn.Linear.*Conv1D"):
        Q.quantize(model, "nf4")
    assert_same_state(before, model)
    with pytest.raises(PeftlabError, match="no layer to quantize"):
        Q.quantize(tiny_llama(), "int8", exclude="re:.*_proj")


def test_quantize_after_attach_is_refused():
    model = tiny_llama()
    peftlab.attach(model, peftlab.LoRA(r=2, targets=["q_proj"]))
    before = state(model)
    with pytest.raises(PeftlabError, match="quantize before attaching"):
        Q.quantize(model, "nf4")
    assert_same_state(before, model)


@pytest.mark.parametrize("method", ["pissa", "olora", "corda"])
def test_an_init_that_rewrites_the_weight_is_refused_on_a_quantized_base(method):
    model = quantized_llama("nf4")
    before = state(model)
    calibration = [token_batch(2)] if method_class(method).needs_calibration else None
    with pytest.raises(PeftlabError, match=r"quantized( weight)?: (pass init: gaussian|use an init that leaves W alone)"):
        peftlab.attach(model, peftlab.config(method, r=2, targets=["q_proj"]), calibration=calibration)
    assert_same_state(before, model)
    assert "_peftlab" not in model.__dict__


def test_loftq_through_attach_alone_is_refused_naming_quantize():
    model = quantized_llama("nf4")
    before = state(model)
    with pytest.raises(PeftlabError, match=r"peftlab.quantize.quantize\(model, 'nf4', loftq=config\)"):
        peftlab.attach(model, peftlab.LoRA(r=2, init="loftq", targets=["q_proj"]))
    assert_same_state(before, model)


# ---- LoftQ --------------------------------------------------------------------------------------------


def minilm_weight() -> torch.Tensor:
    from safetensors import safe_open

    from peftlab.recipe import models

    with safe_open(str(models.minilm_dir() / "model.safetensors"), "pt") as weights:  # one tensor, not the model
        return weights.get_tensor(KEY).float()  # (384, 384)


KEY = "encoder.layer.0.attention.self.query.weight"


@pytest.mark.parametrize("source", ["random", "minilm"])
def test_loftq_removes_part_of_the_quantization_error(source):
    torch.manual_seed(0)
    W = torch.randn(256, 384) * 0.02 if source == "random" else minilm_weight()
    r, scale = 16, 2.0
    plain = (W - Q.quantize_dequantize(W, "nf4")).norm()
    errors = {}
    for iters in (1, 3):
        target, A, B = Q.loftq_factors(W, "nf4", r, scale, iters)
        errors[iters] = (W - (Q.quantize_dequantize(target, "nf4") + scale * B @ A)).norm() / plain
    # A rank-16 fit of the NF4 residual: >= 3% of its norm on noise-like random weights, more on real ones
    assert errors[1] < {"random": 0.97, "minilm": 0.95}[source], errors
    assert errors[3] <= errors[1] + 1e-3, errors
    # peft's LoftQ decomposition of the same residual (T = 1): the same low-rank part
    from peft.utils.loftq_utils import _low_rank_decomposition

    target, A, B = Q.loftq_factors(W, "nf4", r, scale, 1)
    theirs = _low_rank_decomposition(W - Q.quantize_dequantize(W, "nf4"), reduced_rank=r)
    torch.testing.assert_close(scale * B @ A, theirs["L"] @ theirs["R"], rtol=1e-4, atol=1e-5)


def test_quantize_with_loftq_attaches_a_lora_that_brings_the_model_closer_to_full_precision():
    reference, plain, loftq = tiny_llama(), tiny_llama(), tiny_llama()
    Q.quantize(plain, "nf4")
    summary = Q.quantize(loftq, "nf4", loftq=peftlab.LoRA(r=8, alpha=8, init="loftq", targets="all-linear"))
    assert len(summary.loftq) == 14 and all(after < before for before, after in summary.loftq.values())
    assert peftlab.adapter_configs(loftq)["default"].init == "loftq"
    with torch.no_grad():
        exact = output_of(reference, token_batch())
        assert relative(output_of(loftq, token_batch()), exact) < relative(output_of(plain, token_batch()), exact)


# ---- every method: trains on a quantized base, or is refused with the declared message ------------------


# Methods that fail on a quantized base with a torch error instead of a refusal, until their files
# declare it: LoRA-GA and LoRA-SB take gradients of the host weight in calibration (quantized_base =
# "no"); the parallel adapter (and MAM) takes its dtype from the block's first parameter, uint8 there.
EXTRA_FIELDS = {"adalora": {"total_steps": 10}, "lora_sb": {"total_steps": 10}, "increlora": {"max_rank": 8}}


def _method_case(name: str):
    cls = method_class(name)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = dict(EXTRA_FIELDS.get(name, {}))
    if cls.site_adapters:
        kwargs.setdefault("targets", ["q_proj", "v_proj"] if name != "bitfit" else ["query", "value"])
    if "r" in fields and name not in ("increlora",):
        kwargs["r"] = 2
    return cls, kwargs


@pytest.fixture(scope="module")
def quantized_models():
    """One quantized tiny Llama and BERT (BitFit needs biases, Llama has none); tests take copies."""
    bert = tiny_bert()
    Q.quantize(bert, "nf4")
    return {"llama": quantized_llama("nf4"), "bert": bert}


@pytest.mark.parametrize("name", peftlab.methods())
def test_every_method_trains_on_a_quantized_base_or_is_refused_as_declared(name, quantized_models):
    cls, kwargs = _method_case(name)
    model = copy.deepcopy(quantized_models["bert" if name == "bitfit" else "llama"])
    before = state(model)
    batch = token_batch()
    calibration = [lm_batch(2)] * 2 if cls.needs_calibration else None  # one batch twice: EVA converges at once
    try:
        peftlab.attach(model, peftlab.config(name, **kwargs), calibration=calibration)
    except PeftlabError as refusal:
        assert_same_state(before, model)
        assert "quantized" in str(refusal) and "attach before quantizing" in str(refusal), str(refusal)
        assert cls.quantized_base == "no" or name in ("pissa", "olora", "corda", "loldu", "svfit", "hft", "lisa"), (
            f"{name} is refused but declares quantized_base={cls.quantized_base!r}: {refusal}")
        return
    assert cls.quantized_base != "no"
    model.train()
    output_of(model, batch).float().square().mean().backward()
    grads = [p.grad for p in peftlab.trainable_parameters(model).values()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads) and all(
        g is None or torch.isfinite(g).all() for g in grads)
    peftlab.detach(model)
    assert_same_state(before, model)


# ---- the recipe: `model: {name, quantize}` trains, saves and resumes ------------------------------------


def test_run_config_reads_and_writes_a_quantized_model_and_keeps_the_plain_form():
    from peftlab.recipe import config as runconfig

    run = runconfig.build(None, ["model={name: smollm2-135m, quantize: nf4}", "task=chatterbot"])
    assert run.model == "smollm2-135m" and run.model.quantize == "nf4"
    assert runconfig.validate(runconfig._load_yaml(run.to_yaml())).to_dict() == run.to_dict()
    assert run.to_dict()["model"] == {"name": "smollm2-135m", "quantize": "nf4"}
    assert runconfig.build(None, []).to_dict()["model"] == "minilm-l6"  # existing configs: unchanged
    assert runconfig.build(None, ["model.quantize=int8"]).to_dict()["model"] == {"name": "minilm-l6", "quantize": "int8"}
    with pytest.raises(PeftlabError, match="model.quantize = 'nf2' is unknown: use one of nf4, int8"):
        runconfig.build(None, ["model={name: minilm-l6, quantize: nf2}"])
    with pytest.raises(PeftlabError, match="unknown config key.*model.bits"):
        runconfig.build(None, ["model={name: minilm-l6, bits: 4}"])


def test_train_saves_and_resumes_on_a_quantized_base(tmp_path):
    from safetensors.torch import load_file

    from peftlab.recipe import config as runconfig, trainer
    from run_helpers import step_losses, tiny_checkpoint, tiny_overrides

    model_dir = tiny_checkpoint(tmp_path.parent)
    sets = tiny_overrides(model_dir, tmp_path / "run", **{"method.targets": "all-linear"})
    sets[0] = f"model={{name: {model_dir}, quantize: nf4}}"
    run = runconfig.build(None, sets)
    trainer.train(run, echo=lambda *a: None)
    run_dir = tmp_path / "run"
    losses = step_losses(run_dir)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and all(math.isfinite(v) for v in losses.values())
    assert "quantize: nf4" in (run_dir / "config.yaml").read_text()
    saved = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert all(".adapters.default." in k or k.startswith("classifier.") for k in saved)  # no base weights
    assert sum(".adapters.default." in k for k in saved) == 24  # 12 quantized linears x (A, B)
    shutil.rmtree(run_dir / "checkpoints" / "checkpoint-6")
    summary = trainer.train(runconfig.build(None, sets), resume=True, echo=lambda *a: None)
    assert summary["resumed_from"].endswith("checkpoint-3")
    resumed = step_losses(run_dir)
    assert resumed == pytest.approx(losses, rel=1e-5)
