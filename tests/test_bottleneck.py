"""Bottleneck adapters (houlsby, pfeiffer, parallel_adapter): contract rows, the equations written out
by hand at one layer, where each sits by default in BERT, Llama and GPT-2, merge refused, bad input,
and a forward/backward on the real MiniLM-L6 and a tiny Llama."""
import pytest
import torch
import torch.nn.functional as F

import peftlab
from conftest import output_of, tiny_bert, tiny_gpt2, tiny_llama, token_batch
from contract import Case, run_contract
from peftlab.methods.parallel_adapter import FFN_BLOCKS, parallel_ffn

NO_PEFT = "acts on the whole model .* peft has no format for it"  # a model-level adapter
ROWS = [
    Case("houlsby-bert", lambda: peftlab.Houlsby(size=8), tiny_bert, token_batch),
    Case("houlsby-llama", lambda: peftlab.Houlsby(size=8, activation="silu"), tiny_llama, token_batch),
    Case("houlsby-gpt2-conv1d", lambda: peftlab.Houlsby(size=8, activation="gelu"), tiny_gpt2, token_batch),
    Case("pfeiffer-bert", lambda: peftlab.Pfeiffer(size=4), tiny_bert, token_batch),
    Case("pfeiffer-llama-overrides",
         lambda: peftlab.Pfeiffer(size=4, overrides={"layers.1.mlp.down_proj": {"size": 2}}), tiny_llama, token_batch),
    Case("parallel-bert", lambda: peftlab.ParallelAdapter(size=8), tiny_bert, token_batch, peft_refusal=NO_PEFT),
    Case("parallel-llama", lambda: peftlab.ParallelAdapter(size=8, scale=2.0), tiny_llama, token_batch,
         peft_refusal=NO_PEFT),
    Case("parallel-gpt2", lambda: peftlab.ParallelAdapter(size=8, activation="tanh"), tiny_gpt2, token_batch,
         peft_refusal=NO_PEFT),
]


@pytest.mark.parametrize("case", ROWS, ids=str)
def test_contract(case, tmp_path):
    run_contract(case, tmp_path)


def _randomise(model, seed=0):
    """Every trainable parameter to random values (Up starts at 0: the equations would be trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peftlab.trainable_parameters(model).values():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))


def _bottleneck(h, down, up, act):
    """Up(act(Down(h))), written out from the raw tensors."""
    return F.linear(act(F.linear(h, down.weight, down.bias)), up.weight, up.bias)


# ---- the equations at one layer --------------------------------------------------------------


@pytest.mark.parametrize("make, site", [(tiny_bert, "encoder.layer.1.attention.output.dense"),
                                        (tiny_gpt2, "transformer.h.0.mlp.c_proj")])
def test_sequential_adapter_is_h_plus_up_act_down_h(make, site):
    model = peftlab.attach(make(), peftlab.Houlsby(size=6, activation="silu"))
    _randomise(model)
    host = model.get_submodule(site)
    adapter = peftlab.adapters(model, "default")[site]
    x = torch.randn(2, 5, adapter.kind.in_features(host))
    with torch.no_grad():
        h = F.linear(x, adapter.kind.matrix(host), host.bias)  # the layer alone
        expected = h + _bottleneck(h, adapter.bottleneck.down, adapter.bottleneck.up, F.silu)
        torch.testing.assert_close(host(x), expected, atol=1e-6, rtol=1e-5)


def test_parallel_adapter_beside_llama_mlp_is_ffn_plus_scaled_bottleneck():
    model = peftlab.attach(tiny_llama(), peftlab.ParallelAdapter(size=6, scale=3.0))
    _randomise(model)
    mlp = model.get_submodule("model.layers.1.mlp")
    f = model.adapters["default"].blocks["model-layers-1-mlp"]
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        gated = F.silu(F.linear(x, mlp.gate_proj.weight)) * F.linear(x, mlp.up_proj.weight)
        ffn = F.linear(gated, mlp.down_proj.weight)  # Llama's FFN, written out
        torch.testing.assert_close(mlp(x), ffn + 3.0 * _bottleneck(x, f.down, f.up, F.relu), atol=1e-6, rtol=1e-5)
        with peftlab.disabled(model):
            torch.testing.assert_close(mlp(x), ffn, atol=1e-6, rtol=1e-5)


def test_parallel_adapter_beside_bert_ffn_joins_the_residual_before_layernorm():
    model = peftlab.attach(tiny_bert(), peftlab.ParallelAdapter(size=6, scale=4.0))
    _randomise(model)
    block = model.get_submodule("encoder.layer.0.output")  # LayerNorm(dense(inter) + x)
    f = model.adapters["default"].blocks["encoder-layer-0-output"]
    inter, x = torch.randn(2, 5, 64), torch.randn(2, 5, 32)  # the FFN's hidden activations, its input
    with torch.no_grad():
        ffn = F.linear(inter, block.dense.weight, block.dense.bias)
        expected = block.LayerNorm(ffn + 4.0 * _bottleneck(x, f.down, f.up, F.relu) + x)
        torch.testing.assert_close(block(inter, x), expected, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(block(inter, input_tensor=x), expected, atol=1e-6, rtol=1e-5)


# ---- where they sit, what they train ---------------------------------------------------------

ATTENTION_OUT = {tiny_bert: "attention.output.dense", tiny_llama: "self_attn.o_proj", tiny_gpt2: "attn.c_proj"}
FFN_OUT = {tiny_bert: "output.dense", tiny_llama: "mlp.down_proj", tiny_gpt2: "mlp.c_proj"}
FFN_BLOCK = {tiny_bert: "output", tiny_llama: "mlp", tiny_gpt2: "mlp"}
LAYER = {tiny_bert: "encoder.layer.{}.", tiny_llama: "model.layers.{}.", tiny_gpt2: "transformer.h.{}."}


@pytest.mark.parametrize("make", [tiny_bert, tiny_llama, tiny_gpt2], ids=lambda m: m.__name__)
def test_default_places(make):
    layers = [LAYER[make].format(i) for i in range(2)]
    houlsby = peftlab.attach(make(), peftlab.Houlsby(size=4))
    assert list(peftlab.adapters(houlsby, "default")) == [
        layer + place for layer in layers for place in (ATTENTION_OUT[make], FFN_OUT[make])]
    pfeiffer = peftlab.attach(make(), peftlab.Pfeiffer(size=4))
    assert list(peftlab.adapters(pfeiffer, "default")) == [layer + FFN_OUT[make] for layer in layers]
    parallel = peftlab.attach(make(), peftlab.ParallelAdapter(size=4))
    assert list(parallel.adapters["default"].layouts) == [layer + FFN_BLOCK[make] for layer in layers]
    # the places are written out in the config, so a saved adapter names them
    config = peftlab.Houlsby(targets=None)
    assert config.targets and peftlab.from_json(config.to_json()) == config


@pytest.mark.parametrize("config, places", [(peftlab.Houlsby(size=5), 4), (peftlab.Pfeiffer(size=5), 2),
                                            (peftlab.ParallelAdapter(size=5), 2)], ids=str)
def test_trainable_count_is_2_size_d_plus_size_plus_d_per_place(config, places):
    model = peftlab.attach(tiny_llama(), config)  # d = 32 at every place
    assert sum(p.numel() for p in peftlab.trainable_parameters(model).values()) == places * (2 * 5 * 32 + 5 + 32)


# ---- merge refused, bad input: clear errors, model untouched --------------------------------


def _untouched(model, before):
    assert "_peftlab" not in model.__dict__
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize("config", [peftlab.Houlsby(size=4), peftlab.ParallelAdapter(size=4)], ids=str)
def test_merge_is_refused_naming_the_method_and_why(config):
    model = peftlab.attach(tiny_bert(), config)
    _randomise(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for merge in (lambda: peftlab.merge(model), lambda: peftlab.detach(model, keep_merged=True)):
        with pytest.raises(peftlab.PeftlabError, match=rf"\({config.method}\) has no weight form"):
            merge()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize("make_config, match", [
    (lambda: peftlab.Houlsby(size=0), "Houlsby size must be a positive integer, got 0"),
    (lambda: peftlab.Pfeiffer(size=-3), "Pfeiffer size must be a positive integer"),
    (lambda: peftlab.ParallelAdapter(size=0), "ParallelAdapter size must be a positive integer"),
    (lambda: peftlab.Houlsby(activation="swish"), "activation 'swish' is unknown; choose one of"),
    (lambda: peftlab.ParallelAdapter(scale=0.0), "scale must be positive"),
    (lambda: peftlab.ParallelAdapter(overrides={"mlp": {"size": 2}}), "takes no overrides"),
], ids=["houlsby-size-0", "pfeiffer-size-negative", "parallel-size-0", "activation", "scale-0", "overrides"])
def test_bad_fields_are_refused(make_config, match):
    with pytest.raises(peftlab.PeftlabError, match=match):
        make_config()


@pytest.mark.parametrize("config, match", [
    (peftlab.Houlsby(targets=["LayerNorm"]), r"supports linear, conv1d layers, but targets also matched: .*LayerNorm"),
    (peftlab.Pfeiffer(targets=["word_embeddings"]), r"targets also matched: .*word_embeddings \(embedding\)"),
    (peftlab.ParallelAdapter(targets=["query"]), r"select .*query \(Linear\), which is no FFN block it knows"),
    (peftlab.ParallelAdapter(targets=["attention"]), r"no FFN block it knows .* target the FFN blocks"),
], ids=["houlsby-layernorm", "pfeiffer-embedding", "parallel-linear", "parallel-attention"])
def test_targets_that_are_not_its_layers_are_refused_before_any_change(config, match):
    model = tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(peftlab.PeftlabError, match=match):
        peftlab.attach(model, config)
    _untouched(model, before)
    assert not model._forward_pre_hooks and not any(m._forward_hooks for m in model.modules())


def test_parallel_ffn_builds_beside_the_model_without_changing_it():
    # MAM builds its FFN part through this function: nothing is installed until the core does it.
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    part = parallel_ffn(model, FFN_BLOCKS, None, size=4, scale=4.0, activation="relu")
    _untouched(model, before)
    assert list(part.layouts) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert not any(m._forward_hooks for m in model.modules())


# ---- the real MiniLM-L6 and a tiny Llama: forward and backward ------------------------------

METHODS = ["houlsby", "pfeiffer", "parallel_adapter"]


def _forward_backward(model, batch):
    model.train()
    output_of(model, batch).float().pow(2).mean().backward()
    trained = peftlab.trainable_parameters(model)
    assert trained and all(p.grad is None for n, p in model.named_parameters() if n not in trained)
    ups = [p for n, p in trained.items() if ".up." in n]  # Up gets a gradient at once (Down once Up moves)
    assert ups and all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in ups)


def test_minilm_forward_backward(minilm, minilm_batch):
    model = minilm[0]  # one load for every method: detach gives the base back exactly
    with torch.no_grad():
        base = output_of(model, minilm_batch)
    for method in METHODS:
        peftlab.attach(model, peftlab.config(method, size=16))
        with torch.no_grad():  # Up starts at exactly 0: the output at attach is the base model's, bit for bit
            torch.testing.assert_close(output_of(model, minilm_batch), base, atol=0, rtol=0)
        _forward_backward(model, minilm_batch)
        peftlab.detach(model)
        model.eval().zero_grad(set_to_none=True)


@pytest.mark.parametrize("method", METHODS)
def test_tiny_llama_forward_backward(method):
    _forward_backward(peftlab.attach(tiny_llama(), peftlab.config(method, size=8)), token_batch())
