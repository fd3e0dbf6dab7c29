"""The core's model-level adapters (peftlab.model_level): parameters registered in the model,
hooks that run only while on and that detach removes, parameters trained in place, files.

A test method `shifted_inputs` acts like a soft prompt: a model pre-hook (with kwargs) turns
input_ids into inputs_embeds + shift, and it trains one existing bias in place.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import peftlab
from peftlab import registry
from peftlab.model_level import MODEL, ModelAdapter
from conftest import output_of, tiny_bert, token_batch

BIAS = "encoder.layer.1.output.dense.bias"


class ShiftedInputs(ModelAdapter):
    def __init__(self, model, in_place):
        super().__init__(in_place)
        self.shift = torch.nn.Parameter(torch.zeros(model.config.hidden_size))  # (hidden,)

    def install(self, model, hooks):
        embed = model.get_input_embeddings()

        def add_shift(module, args, kwargs):
            ids = kwargs.pop("input_ids")  # (batch, seq)
            return args, {**kwargs, "inputs_embeds": embed(ids) + self.shift}

        hooks.before(model, add_shift)


@pytest.fixture
def method():
    """Registers the test method for one test only (the registry is process-wide)."""

    @registry.register("shifted_inputs")
    @dataclass
    class Shifted(peftlab.MethodConfig):
        site_adapters = False
        model_adapter = True

        def build_model(self, model, initialize=True):
            params = dict(model.named_parameters())
            return ShiftedInputs(model, {BIAS: params[BIAS]})

    yield Shifted
    del registry._METHODS["shifted_inputs"]


def _train_a_little(model):
    with torch.no_grad():
        peftlab.adapters(model, "default")[MODEL].shift.normal_()
        dict(model.named_parameters())[BIAS].add_(1.0)


def test_parameters_live_in_the_model_and_hooks_follow_the_state(method):
    model, batch = tiny_bert(), token_batch()
    base = output_of(model, batch).detach()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    peftlab.attach(model, method())
    assert set(model.state_dict()) - set(base_state) == {"adapters.default.shift"}
    assert set(peftlab.trainable_parameters(model)) == {"adapters.default.shift", BIAS}
    torch.testing.assert_close(output_of(model, batch), base, atol=0, rtol=0)  # identity at init
    _train_a_little(model)
    with torch.no_grad():
        adapted = output_of(model, batch)
        assert (adapted - base).abs().max() > 0.1
        with peftlab.disabled(model):  # hook off and the bias's original value swapped in
            torch.testing.assert_close(output_of(model, batch), base, atol=0, rtol=0)
        torch.testing.assert_close(output_of(model, batch), adapted, atol=0, rtol=0)
    peftlab.detach(model)
    assert not model._forward_pre_hooks and "adapters" not in model._modules
    assert all(torch.equal(model.state_dict()[k], v) for k, v in base_state.items())
    assert set(model.state_dict()) == set(base_state)
    torch.testing.assert_close(output_of(model, batch), base, atol=0, rtol=0)


def test_inactive_adapter_hook_does_not_run(method):
    model, batch = tiny_bert(), token_batch()
    peftlab.attach(model, method(), "shift")
    peftlab.attach(model, peftlab.LoRA(r=2, targets=["query"]), "lora")
    with torch.no_grad():
        peftlab.adapters(model, "shift")[MODEL].shift.normal_()
        on = output_of(model, batch)
        peftlab.set_active(model, "lora")
        off = output_of(model, batch)  # LoRA's B is 0 and the bias is untouched: the base
    peftlab.detach(model, "lora")
    peftlab.detach(model, "shift")
    torch.testing.assert_close(off, output_of(model, batch).detach(), atol=0, rtol=0)
    assert (on - off).abs().max() > 0.1


def test_save_and_load_round_trip(method, tmp_path):
    model, batch = tiny_bert(), token_batch()
    peftlab.attach(model, method())
    _train_a_little(model)
    with torch.no_grad():
        adapted = output_of(model, batch)
    peftlab.save(model, tmp_path)
    fresh = peftlab.load(tiny_bert(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(output_of(fresh, batch), adapted, atol=0, rtol=0)
    peftlab.detach(fresh)
    torch.testing.assert_close(dict(fresh.named_parameters())[BIAS], dict(tiny_bert().named_parameters())[BIAS],
                               atol=0, rtol=0)


def test_merge_refuses_a_hooked_adapter_and_changes_nothing(method):
    model = tiny_bert()
    peftlab.attach(model, method())
    _train_a_little(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(peftlab.PeftlabError, match="'default' \\(shifted_inputs\\) has no weight form"):
        peftlab.merge(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_in_place_parameters_reach_the_optimizer_even_when_frozen(method):
    model = peftlab.attach(tiny_bert(), method())
    bias = dict(model.named_parameters())[BIAS]
    bias.requires_grad_(False)  # as LISA freezes a block between re-draws
    grouped = [p for g in peftlab.param_groups(model, 1e-3) for p in g["params"]]
    assert any(p is bias for p in grouped)
    assert any(p is peftlab.adapters(model, "default")[MODEL].shift for p in grouped)


def test_two_adapters_may_not_train_one_parameter_in_place(method):
    model = peftlab.attach(tiny_bert(), method(), "first")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(peftlab.PeftlabError, match=f"would train {BIAS} in place, which adapter 'first'"):
        peftlab.attach(model, method(), "second")
    assert set(model.state_dict()) == set(state) and list(peftlab.adapter_configs(model)) == ["first"]


def test_per_example_refuses_model_level_adapters(method):
    model = peftlab.attach(tiny_bert(), method())
    with pytest.raises(peftlab.PeftlabError, match="acts on the whole model"):
        with peftlab.per_example(model, ["default", None, None]):
            pass


def test_a_model_child_named_adapters_is_refused(method):
    model = tiny_bert()
    model.adapters = torch.nn.Linear(2, 2)
    with pytest.raises(peftlab.PeftlabError, match="already has an attribute 'adapters'"):
        peftlab.attach(model, method())
    assert "_peftlab" not in model.__dict__ and not model._forward_pre_hooks
