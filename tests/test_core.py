"""Core behaviour beyond the contract: registry and configs, bad input, several named adapters,
mixed batches, merge order, the step and loss hooks."""
import json

import pytest
import torch

import peftlab
from peftlab import PeftlabError
from conftest import output_of, tiny_bert, token_batch

QV = ["query", "value"]


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_untouched(model, before):
    assert "_peftlab" not in model.__dict__
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert all(p.requires_grad for p in model.parameters())


def _randomise(model, name="default", seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in peftlab.adapters(model, name).values():
            for p in a.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))


# ---- registry and configs ----------------------------------------------------------------

def test_registry_names_and_aliases():
    names = peftlab.methods()
    assert {"lora", "pissa", "olora", "rslora"} <= set(names)
    assert names == sorted(names) and all(n == n.lower() for n in names)
    assert peftlab.config("pissa", r=4).init == "pissa"
    assert peftlab.config("rslora").rslora is True
    assert isinstance(peftlab.config("lora", r=4), peftlab.LoRA)


def test_config_json_round_trip():
    cfg = peftlab.LoRA(r=4, alpha=8, targets=["query"], overrides={"value": {"r": 2}}, init="olora")
    text = json.dumps(cfg.to_json())
    assert json.loads(text)["method"] == "lora"
    assert peftlab.from_json(text) == cfg


def test_bad_configs_name_the_problem():
    with pytest.raises(PeftlabError, match="unknown method 'lorax'.*registered methods: .*lora"):
        peftlab.config("lorax")
    with pytest.raises(PeftlabError, match=r"unknown field\(s\) \['rank'\].*allowed: .*'r'"):
        peftlab.from_json({"method": "lora", "rank": 8})
    with pytest.raises(PeftlabError, match="no 'method' key"):
        peftlab.from_json({"r": 8})
    with pytest.raises(PeftlabError, match="positive integer"):
        peftlab.LoRA(r=0)
    with pytest.raises(PeftlabError, match="init 'svd' is unknown"):
        peftlab.LoRA(init="svd")
    with pytest.raises(PeftlabError, match="callable"):
        peftlab.LoRA(targets=lambda n, m: True).to_json()


# ---- bad input leaves the model untouched ------------------------------------------------

@pytest.mark.parametrize("config, message", [
    (peftlab.LoRA(targets=["q_proj"]), "matched no module.*attention.self.query"),
    (peftlab.LoRA(r=33, targets=QV), r"rank r=33 is larger than .*query allows \(32 x 32\).*r <= 32"),
    (peftlab.LoRA(r=4, targets=QV, overrides={"value": {"r": 40}}), "rank r=40"),
    (peftlab.LoRA(r=4, targets=QV, overrides={"value": {"rank": 4}}), "unknown field"),
    (peftlab.LoRA(targets=["LayerNorm"]), "supports linear.*LayerNorm"),
    (peftlab.LoRA(init="pissa", targets=["word_embeddings"]), "embedding: exclude it"),
    (peftlab.LoRA(targets=QV, also_train=["no_such_head"]), "also_train"),
])
def test_attach_bad_input_leaves_model_untouched(config, message):
    model = tiny_bert()
    before = _state(model)
    with pytest.raises(PeftlabError, match=message):
        peftlab.attach(model, config)
    _assert_untouched(model, before)


def test_attach_refuses_duplicate_name_and_non_config():
    model = peftlab.attach(tiny_bert(), peftlab.LoRA(r=2, targets=QV))
    with pytest.raises(PeftlabError, match="attached already"):
        peftlab.attach(model, peftlab.LoRA(r=2, targets=QV))
    with pytest.raises(PeftlabError, match="method config"):
        peftlab.attach(model, {"method": "lora"}, name="other")
    with pytest.raises(PeftlabError, match="no adapter named 'nope'"):
        peftlab.merge(model, "nope")
    with pytest.raises(PeftlabError, match="no peftlab adapters"):
        peftlab.merge(tiny_bert())


def test_only_adapters_train_and_summary():
    model = peftlab.attach(tiny_bert(), peftlab.LoRA(r=4, targets=QV))
    trainable = peftlab.trainable_parameters(model)
    assert set(trainable) == {f"encoder.layer.{i}.attention.self.{p}.adapters.default.{w}"
                              for i in range(2) for p in ("query", "value") for w in "AB"}
    assert sum(p.numel() for p in trainable.values()) == 4 * 4 * (32 + 32)
    text = peftlab.summary(model)
    total = sum(p.numel() for p in model.parameters())
    assert "lora" in text and "1,024" in text and f"{100 * 1024 / total:.3f}%" in text


# ---- several adapters ----------------------------------------------------------------------

def test_named_adapters_active_set_and_mixed_batch():
    model = tiny_bert()
    batch = token_batch(batch=4)
    with torch.no_grad():
        base = output_of(model, batch)
    peftlab.attach(model, peftlab.LoRA(r=2, targets=QV), name="a")
    _randomise(model, "a", seed=1)
    peftlab.attach(model, peftlab.LoRA(r=3, targets=["key"]), name="b")
    _randomise(model, "b", seed=2)
    with torch.no_grad():
        peftlab.set_active(model, "a")
        out_a = output_of(model, batch)
        peftlab.set_active(model, ["b"])
        out_b = output_of(model, batch)
        peftlab.set_active(model, ["a", "b"])
        out_ab = output_of(model, batch)
    assert not torch.allclose(out_a, out_b) and not torch.allclose(out_ab, out_a)
    # only active adapters train
    peftlab.set_active(model, "b")
    assert all(".adapters.b." in n for n in peftlab.trainable_parameters(model))
    # a mixed batch: each example runs through its own adapter (None: the base model)
    with peftlab.per_example(model, ["a", "b", None, "a"]), torch.no_grad():
        mixed = output_of(model, batch)
    torch.testing.assert_close(mixed[0], out_a[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], out_b[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[2], base[2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[3], out_a[3], atol=1e-5, rtol=1e-5)
    with pytest.raises(PeftlabError, match="unknown adapters"):
        with peftlab.per_example(model, ["c"] * 4):
            pass


def test_merge_order_is_enforced_and_detach_is_exact():
    model = tiny_bert()
    before = _state(model)
    peftlab.attach(model, peftlab.LoRA(r=2, targets=QV), name="a")
    peftlab.attach(model, peftlab.LoRA(r=2, init="pissa", targets=["query"]), name="b")
    _randomise(model, "a")
    peftlab.merge(model, "a")
    peftlab.merge(model, "b")
    with pytest.raises(PeftlabError, match="reverse order"):
        peftlab.unmerge(model, "a")
    with pytest.raises(PeftlabError, match="unmerge before using disabled"):
        with peftlab.disabled(model):
            output_of(model, token_batch())
    peftlab.unmerge(model)
    peftlab.detach(model)
    _assert_untouched(model, before)


def test_merge_without_original_subtracts():
    model = tiny_bert()
    peftlab.attach(model, peftlab.LoRA(r=2, targets=QV))
    _randomise(model)
    weights = _state(model)
    peftlab.merge(model, keep_original=False)
    peftlab.unmerge(model)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, weights[k], atol=1e-6, rtol=0)


def test_step_and_regularization_hooks_reach_the_method():
    calls = []

    @peftlab.register("probe-hooks")
    class Probe(peftlab.LoRA):
        step_hook = True
        adds_loss = True

        def after_step(self, adapters, step):
            calls.append((len(adapters), step))

        def loss(self, adapters):
            return sum(a.B.pow(2).sum() for a in adapters.values()) + 1.0

    model = peftlab.attach(tiny_bert(), Probe(r=2, targets=QV))
    peftlab.step(model, 7)
    assert calls == [(4, 7)]
    assert peftlab.regularization(model).item() == pytest.approx(1.0)
    peftlab.set_active(model, [])
    peftlab.step(model, 8)
    assert calls == [(4, 7)] and peftlab.regularization(model) is None


@pytest.mark.parametrize("method", ["lora", "pissa", "dora", "vera"])
def test_detach_keep_merged_leaves_a_plain_model_computing_the_adapted_function(method):
    base = tiny_bert()
    names, flags = set(base.state_dict()), {n: p.requires_grad for n, p in base.named_parameters()}
    batch = token_batch()
    model = peftlab.attach(base, peftlab.config(method, r=4, targets=QV, also_train=["pooler"]))
    _randomise(model)
    with torch.no_grad():
        model.pooler.dense.bias.add_(0.5)  # what training made of an also_train module
    expected = output_of(model, batch)
    peftlab.detach(model, keep_merged=True)
    assert "_peftlab" not in model.__dict__ and set(model.state_dict()) == names
    assert not any(".adapters." in n for n, _ in model.named_modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    torch.testing.assert_close(output_of(model, batch), expected, atol=1e-5, rtol=1e-5)


def test_detach_keep_merged_takes_every_adapter_at_once():
    model = peftlab.attach(tiny_bert(), peftlab.LoRA(r=2, targets=["query"]), "a")
    peftlab.attach(model, peftlab.LoRA(r=2, targets=["value"]), "b")
    weights = _state(model)
    with pytest.raises(PeftlabError, match="removes every adapter at once.*Detach the others first"):
        peftlab.detach(model, "a", keep_merged=True)
    assert set(peftlab.adapter_configs(model)) == {"a", "b"}
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in weights.items())


def test_merge_refuses_a_method_without_weight_form():
    from peftlab.core import Adapter

    class Bottleneck(Adapter):  # changes the hidden state, not the weight
        weight_form = False

        def __init__(self, kind, width):
            super().__init__(kind)
            self.up = torch.nn.Parameter(torch.zeros(width))

        def forward(self, host, x, base):
            y = base(x)
            return y + torch.tanh(y) * self.up

    @peftlab.register("probe-bottleneck")
    class BottleneckConfig(peftlab.MethodConfig):
        def build(self, site, stats=None, initialize=True):
            return Bottleneck(site.kind, site.kind.out_features(site.host))

    model = peftlab.attach(tiny_bert(), BottleneckConfig(targets=QV))
    _randomise(model)
    weights = _state(model)
    with pytest.raises(PeftlabError, match="no weight form and cannot be merged"):
        peftlab.merge(model)
    with pytest.raises(PeftlabError, match="no weight form and cannot be merged"):
        peftlab.detach(model, keep_merged=True)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in weights.items())
    assert all(not slot.merged for _, slot in peftlab.core._slots(model))
    assert peftlab.adapter_configs(model)  # still attached
