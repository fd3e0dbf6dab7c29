"""Parity with `peft` on the real MiniLM-L6: the same config in both libraries computes the same.

Every case attaches the same config (r=8, alpha=16 on query and value) in peft and in peftlab
to two fresh copies of the model.
  * kaiming LoRA, rsLoRA, DoRA: the random inits come from different generator calls, so
    peft's weights, first moved off their init (B non-zero), are copied into peftlab's
    adapter. Outputs (eval mode) and gradients must then agree, and so must the merged
    weights and the merged models' outputs.
  * PiSSA, OLoRA: deterministic. Each library computes its own initial factors and residual
    weight W0 - s B0 A0; those are compared first. Then peft's factors, moved as above, are
    copied over and outputs and merged weights compared.
Tolerances (fp32): outputs and gradients 1e-5, weights 1e-6.
"""
import pytest
import torch
from peft import LoraConfig, get_peft_model

import peftlab
from conftest import load_minilm, output_of

QV = ["query", "value"]
OUT = dict(atol=1e-5, rtol=0)
WEIGHT = dict(atol=1e-6, rtol=0)

CASES = {
    "lora": (dict(), dict()),
    "rslora": (dict(rslora=True), dict(use_rslora=True)),
    "dora": (dict(), dict(use_dora=True)),
    "pissa": (dict(init="pissa"), dict(init_lora_weights="pissa")),
    "olora": (dict(init="olora"), dict(init_lora_weights="olora")),
}


def attach_both(case):
    peftlab_fields, peft_fields = CASES[case]
    peft_model = get_peft_model(load_minilm()[0], LoraConfig(r=8, lora_alpha=16, target_modules=QV, **peft_fields))
    method = peftlab.DoRA if case == "dora" else peftlab.LoRA
    model = peftlab.attach(load_minilm()[0], method(r=8, alpha=16, targets=QV, **peftlab_fields))
    return peft_model.eval(), model


def peft_layers(peft_model, model):
    """site -> (peft's LoRA layer, peftlab's adapter), for every adapted site."""
    sites = peftlab.adapters(model, "default")
    assert len(sites) == 12
    return {s: (peft_model.base_model.model.get_submodule(s), a) for s, a in sites.items()}


def peft_tensors(layer, dora: bool) -> dict[str, torch.Tensor]:
    tensors = {"A": layer.lora_A["default"].weight, "B": layer.lora_B["default"].weight}
    if dora:
        tensors["m"] = layer.lora_magnitude_vector["default"].weight
    return tensors


def move_off_init(peft_model):
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for _, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def copy_peft_weights(peft_model, model, dora: bool):
    with torch.no_grad():
        for site, (layer, adapter) in peft_layers(peft_model, model).items():
            assert adapter.scale == pytest.approx(layer.scaling["default"], rel=1e-12)
            for key, value in peft_tensors(layer, dora).items():
                getattr(adapter, key).copy_(value)


def gradients(model, batch, params):
    for p in params.values():
        p.grad = None
    output_of(model, batch).pow(2).mean().backward()
    return {k: p.grad.clone() for k, p in params.items()}


@pytest.mark.parametrize("case", ["lora", "rslora", "dora"])
def test_same_weights_same_outputs_gradients_and_merged_weights(case, minilm_batch):
    peft_model, model = attach_both(case)
    dora = case == "dora"
    if dora:  # both start m at the row norms of W0
        for site, (layer, adapter) in peft_layers(peft_model, model).items():
            torch.testing.assert_close(adapter.m, layer.lora_magnitude_vector["default"].weight, **WEIGHT)
    move_off_init(peft_model)
    copy_peft_weights(peft_model, model, dora)

    with torch.no_grad():
        expected = output_of(peft_model, minilm_batch)
        torch.testing.assert_close(output_of(model, minilm_batch), expected, **OUT)

    # gradients of the same loss reach A, B (and m) alike: DoRA's norm is a constant in both
    layers = peft_layers(peft_model, model)
    ours = {f"{s}.{k}": getattr(a, k) for s, (_, a) in layers.items() for k in peft_tensors(layers[s][0], dora)}
    theirs = {f"{s}.{k}": t for s, (layer, _) in layers.items() for k, t in peft_tensors(layer, dora).items()}
    ours_grad, theirs_grad = gradients(model, minilm_batch, ours), gradients(peft_model, minilm_batch, theirs)
    for key, grad in theirs_grad.items():
        torch.testing.assert_close(ours_grad[key], grad, atol=1e-5, rtol=1e-4)

    peftlab.merge(model)
    merged = peft_model.merge_and_unload()
    for site in layers:
        torch.testing.assert_close(model.get_submodule(site).weight, merged.get_submodule(site).weight, **WEIGHT)
    with torch.no_grad():
        torch.testing.assert_close(output_of(model, minilm_batch), output_of(merged, minilm_batch), **OUT)


@pytest.mark.parametrize("case", ["pissa", "olora"])
def test_svd_and_qr_inits_compute_the_same_factors_and_residual(case, minilm_batch):
    peft_model, model = attach_both(case)
    layers = peft_layers(peft_model, model)
    for site, (layer, adapter) in layers.items():
        theirs = peft_tensors(layer, dora=False)
        torch.testing.assert_close(adapter.A, theirs["A"], **WEIGHT)
        torch.testing.assert_close(adapter.B, theirs["B"], **WEIGHT)
        # the frozen host weight each library keeps: W0 - s B0 A0
        torch.testing.assert_close(model.get_submodule(site).weight, layer.base_layer.weight, **WEIGHT)
    base = load_minilm()[0]
    with torch.no_grad():  # at init both reproduce the base model
        torch.testing.assert_close(output_of(model, minilm_batch), output_of(base, minilm_batch), **OUT)

    move_off_init(peft_model)
    copy_peft_weights(peft_model, model, dora=False)
    with torch.no_grad():
        expected = output_of(peft_model, minilm_batch)
        assert (expected - output_of(base, minilm_batch)).abs().max() > 1e-3
        torch.testing.assert_close(output_of(model, minilm_batch), expected, **OUT)

    peftlab.merge(model)
    merged = peft_model.merge_and_unload()
    for site in layers:
        torch.testing.assert_close(model.get_submodule(site).weight, merged.get_submodule(site).weight, **WEIGHT)
    with torch.no_grad():
        torch.testing.assert_close(output_of(model, minilm_batch), output_of(merged, minilm_batch), **OUT)
