"""DoRA: contract rows, the fast row norm against the direct one, the fused channel scaling's
gradients, parity with `peft` on MiniLM-L6 (dropout and rsLoRA included), bad input.

(tests/test_peft_parity.py also checks DoRA on query/value against peft in eval mode; the parity
test here covers every encoder linear, training-mode dropout and rsLoRA.)
"""
import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

import peftlab
from conftest import output_of, tiny_bert, tiny_cnn, tiny_gpt2, tiny_llama, token_batch
from contract import Case, run_contract
from peftlab.methods.dora import ScaleChannels, fast_weight_norm, row_norm

QV = ["query", "value"]
ENCODER_LINEARS = r"re:.*encoder.*\.(query|key|value|dense)$"  # every encoder linear, not the pooler

ROWS = [
    Case("dora-kaiming-linear", lambda: peftlab.DoRA(r=4, targets=QV), tiny_bert, token_batch),
    Case("dora-gaussian-linear", lambda: peftlab.config("dora", r=4, init="gaussian", targets=QV), tiny_bert,
         token_batch),
    Case("dora-rslora-dropout-all-linear", lambda: peftlab.DoRA(r=4, rslora=True, dropout=0.1, targets="all-linear"),
         tiny_bert, token_batch),
    Case("dora-overrides", lambda: peftlab.DoRA(r=2, targets=QV, overrides={"value": {"r": 6, "alpha": 3.0}}),
         tiny_bert, token_batch),
    Case("dora-conv1d", lambda: peftlab.DoRA(r=4, targets=["c_attn", "c_fc"]), tiny_gpt2, token_batch),
    Case("dora-linear-without-bias", lambda: peftlab.DoRA(r=4, targets=["q_proj", "v_proj", "down_proj"]),
         tiny_llama, token_batch),
]


@pytest.mark.parametrize("case", ROWS, ids=str)
def test_contract(case, tmp_path):
    run_contract(case, tmp_path)


# ---- the row norm ------------------------------------------------------------------------

@pytest.mark.parametrize("out_features, in_features, r, scale", [(48, 32, 4, 2.0), (16, 80, 8, 0.5), (64, 64, 1, 16.0)])
def test_fast_row_norm_equals_the_direct_form(out_features, in_features, r, scale):
    g = torch.Generator().manual_seed(out_features + r)
    W = torch.randn(out_features, in_features, generator=g, dtype=torch.float64)
    A = torch.randn(r, in_features, generator=g, dtype=torch.float64) / in_features**0.5
    B = 0.3 * torch.randn(out_features, r, generator=g, dtype=torch.float64)
    direct = row_norm(W + scale * B @ A)
    # exact in exact arithmetic: float64 agrees to rounding ...
    torch.testing.assert_close(fast_weight_norm(W, A, B, scale), direct, atol=0, rtol=1e-12)
    # ... and fp32 to fp32 tolerance
    fast32 = fast_weight_norm(W.float(), A.float(), B.float(), scale)
    assert fast32.dtype == torch.float32
    torch.testing.assert_close(fast32, direct.float(), atol=0, rtol=2e-6)


def test_fast_row_norm_of_a_half_precision_weight_is_summed_in_fp32():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(64, 256, generator=g).half()
    A, B = (torch.randn(4, 256, generator=g) / 16).half(), (0.1 * torch.randn(64, 4, generator=g)).half()
    expected = row_norm(W.float() + 2.0 * B.float() @ A.float())
    fast = fast_weight_norm(W, A, B, 2.0)
    assert fast.dtype == torch.float16
    torch.testing.assert_close(fast.float(), expected, atol=0, rtol=1e-3)  # one fp16 rounding of the result


def test_row_norm_sends_no_gradient_and_m_starts_at_the_row_norms_of_w0():
    model = peftlab.attach(tiny_bert(), peftlab.DoRA(r=4, targets=QV))
    for site, adapter in peftlab.adapters(model, "default").items():
        W0 = model.get_submodule(site).weight
        torch.testing.assert_close(adapter.m, row_norm(W0), atol=0, rtol=1e-6)
        assert not adapter.weight_norm(W0).requires_grad


def test_a_zero_row_of_w0_stays_zero_instead_of_nan():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6))
    with torch.no_grad():
        model[0].weight[2] = 0  # a pruned output
    x = torch.randn(3, 8)
    expected = model(x)
    peftlab.attach(model, peftlab.DoRA(r=2, targets=["0"]))
    adapter = peftlab.adapters(model, "default")["0"]
    assert adapter.m[2] == 0
    torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=0)
    peftlab.merge(model)
    assert torch.isfinite(model[0].weight).all() and (model[0].weight[2] == 0).all()


# ---- the fused channel scaling -----------------------------------------------------------

@pytest.mark.parametrize("with_bias", [False, True])
def test_scale_channels_gradients_match_autograd(with_bias):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    scale = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True) if with_bias else None
    inputs = (z, scale, bias)
    assert torch.autograd.gradcheck(ScaleChannels.apply, inputs)
    expected = z * scale + ((1 - scale) * bias if with_bias else 0)
    torch.testing.assert_close(ScaleChannels.apply(*inputs), expected)


# ---- parity with peft ---------------------------------------------------------------------

def _peft_and_peftlab(minilm, **fields):
    model, _ = minilm
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(
        r=8, lora_alpha=16, lora_dropout=fields.get("dropout", 0.0), use_rslora=fields.get("rslora", False),
        target_modules=ENCODER_LINEARS[3:], use_dora=True))
    peftlab.attach(model, peftlab.DoRA(r=8, alpha=16, targets=ENCODER_LINEARS, **fields))
    g = torch.Generator().manual_seed(5)
    layers = {}
    with torch.no_grad():
        for site, adapter in peftlab.adapters(model, "default").items():
            layer = peft_model.base_model.model.get_submodule(site)
            theirs = {"A": layer.lora_A["default"].weight, "B": layer.lora_B["default"].weight,
                      "m": layer.lora_magnitude_vector["default"].weight}
            torch.testing.assert_close(adapter.m, theirs["m"], atol=1e-6, rtol=0)  # same init of m
            theirs["B"].add_(0.05 * torch.randn(theirs["B"].shape, generator=g))  # move off init
            theirs["m"].mul_(1 + 0.1 * torch.randn(theirs["m"].shape, generator=g))
            for key, value in theirs.items():
                getattr(adapter, key).copy_(value)
            layers[site] = (adapter, theirs)
    assert len(layers) == 36
    return peft_model, model, layers


def test_same_weights_same_outputs_and_merged_weights_as_peft(minilm, minilm_batch):
    peft_model, model, layers = _peft_and_peftlab(minilm, rslora=True)
    peft_model.eval(), model.eval()
    with torch.no_grad():
        torch.testing.assert_close(output_of(model, minilm_batch), output_of(peft_model, minilm_batch),
                                   atol=1e-5, rtol=0)
    peftlab.merge(model)
    merged = peft_model.merge_and_unload()
    for site in layers:
        torch.testing.assert_close(model.get_submodule(site).weight, merged.get_submodule(site).weight,
                                   atol=1e-5, rtol=0)


def test_training_mode_with_dropout_matches_peft_outputs_and_gradients(minilm, minilm_batch):
    peft_model, model, layers = _peft_and_peftlab(minilm, dropout=0.1)
    peft_model.train(), model.train()
    # Same seed, same order of random draws (BERT's dropouts and each adapter's dropout of x).
    torch.manual_seed(0)
    theirs = output_of(peft_model, minilm_batch)
    torch.manual_seed(0)
    ours = output_of(model, minilm_batch)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    ours.pow(2).mean().backward()
    theirs.pow(2).mean().backward()
    for adapter, tensors in layers.values():
        for key, tensor in tensors.items():
            torch.testing.assert_close(getattr(adapter, key).grad, tensor.grad, atol=1e-5, rtol=1e-4)


# ---- bad input -----------------------------------------------------------------------------

def test_bad_configs_and_hosts_are_refused_with_the_fix():
    with pytest.raises(peftlab.PeftlabError, match="positive integer"):
        peftlab.DoRA(r=0)
    with pytest.raises(peftlab.PeftlabError, match="dropout"):
        peftlab.DoRA(dropout=1.0)
    with pytest.raises(peftlab.PeftlabError, match="init 'pissa'.*peftlab.LoRA"):
        peftlab.DoRA(init="pissa")
    with pytest.raises(peftlab.PeftlabError, match="r <= 32"):
        peftlab.attach(tiny_bert(), peftlab.DoRA(r=40, targets=QV))
    with pytest.raises(peftlab.PeftlabError, match="supports linear, conv1d.*conv1"):
        peftlab.attach(tiny_cnn(), peftlab.DoRA(r=2, targets=["conv1"]))
    with pytest.raises(peftlab.PeftlabError, match="word_embeddings"):
        peftlab.attach(tiny_bert(), peftlab.DoRA(r=2, targets=["word_embeddings"]))


def test_dora_is_not_additive_so_merge_keeps_the_original():
    model = peftlab.attach(tiny_bert(), peftlab.DoRA(r=4, targets=QV))
    with pytest.raises(peftlab.PeftlabError, match="not additive.*keep_original=True"):
        peftlab.merge(model, keep_original=False)


def test_registry_and_json_round_trip():
    assert "dora" in peftlab.methods()
    cfg = peftlab.config("dora", r=4, alpha=8, rslora=True, dropout=0.05, targets=QV)
    assert isinstance(cfg, peftlab.DoRA) and cfg.scale == pytest.approx(8 / 2)
    assert peftlab.from_json(cfg.to_json()) == cfg
