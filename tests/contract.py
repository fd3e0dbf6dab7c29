"""The contract every method passes: one set of checks run over a table of cases.

A case is (config factory, host model factory, input batch factory). The checks:
  1. output unchanged at init (when every adapter declares identity_at_init), else changed
  2. merged output == unmerged output (atol 1e-5, fp32), for methods with a weight form
  3. unmerge restores the host weights (atol 1e-6)
  4. disabled() output == base output
  5. detach restores the base state dict exactly, and the requires_grad flags
  6. only adapter (and also_train) parameters receive gradients and change in a step
  7. save -> load into a fresh base model gives the same outputs
  8. the base model's own state-dict keys are unchanged; adapter keys sit under '.adapters.'
     (a model-level adapter's under 'adapters.<name>.' at the root)
  9. declared lora_factors multiply to the change of the original weight, and the peft format
     then loads in `peft` with the same outputs; a method without them is refused that format
A method joins by adding rows (in its own test file, calling `run_contract`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch

import peftlab
from conftest import output_of


@dataclass
class Case:
    id: str
    make_config: Callable[[], peftlab.MethodConfig]
    make_model: Callable[[], torch.nn.Module]
    make_batch: Callable[[], dict]
    calibration: Callable[[], Any] | None = None  # for data-driven inits
    peft_refusal: str | None = None  # why save(format="peft") must refuse this case, when it must

    def __str__(self) -> str:
        return self.id


def _perturb(model: torch.nn.Module) -> None:
    """Move every trainable parameter off its initial value, so merges are not trivially exact."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in peftlab.trainable_parameters(model).values():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _attach(case: Case, model: torch.nn.Module) -> torch.nn.Module:
    calibration = case.calibration() if case.calibration else None
    return peftlab.attach(model, case.make_config(), calibration=calibration)


def run_contract(case: Case, tmp_path) -> None:
    batch = case.make_batch()
    model = case.make_model()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    base_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with torch.no_grad():
        base_out = output_of(model, batch)

    _attach(case, model)
    sites = peftlab.adapters(model, "default")
    adapters = list(sites.values())

    # 8. keys: the base keys are all still there, and everything new is adapter state
    keys = set(model.state_dict())
    assert set(base_state) <= keys
    assert all(".adapters.default." in "." + k for k in keys - set(base_state))  # model-level: adapters.default.*

    # 1. at init
    with torch.no_grad():
        init_out = output_of(model, batch)
    if all(a.identity_at_init for a in adapters):
        torch.testing.assert_close(init_out, base_out, atol=1e-5, rtol=1e-5)
    else:
        assert not torch.allclose(init_out, base_out, atol=1e-6), "declared to change the output at init"

    # 6. gradients and a step touch only trainable parameters
    trainable = peftlab.trainable_parameters(model)
    assert trainable, "the method trains nothing"
    model.train()
    out = output_of(model, batch)
    (out.float().pow(2).mean()).backward()
    for n, p in model.named_parameters():
        if n in trainable:
            continue
        assert p.grad is None, f"frozen parameter {n} received a gradient"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.optim.SGD(trainable.values(), lr=0.1).step()
    after = model.state_dict()
    trained_storage = {p.data_ptr() for p in trainable.values()}  # tied weights share storage
    for k in before:
        if after[k].data_ptr() not in trained_storage:
            assert torch.equal(before[k], after[k]), f"{k} changed but is not trainable"
    model.eval()
    _perturb(model)

    with torch.no_grad():
        adapted_out = output_of(model, batch)

    # 4. disabled == base
    with peftlab.disabled(model), torch.no_grad():
        torch.testing.assert_close(output_of(model, batch), base_out, atol=1e-5, rtol=1e-5)

    # 2, 3. merge and unmerge
    if all(a.weight_form for a in adapters):
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        peftlab.merge(model)
        with torch.no_grad():
            torch.testing.assert_close(output_of(model, batch), adapted_out, atol=1e-5, rtol=1e-4)
        peftlab.unmerge(model)
        for k, v in model.state_dict().items():
            torch.testing.assert_close(v, weights[k], atol=1e-6, rtol=0)
    else:
        try:
            peftlab.merge(model)
        except peftlab.PeftlabError as err:
            assert "no weight form" in str(err)
        else:
            raise AssertionError("merge of a method without weight form must refuse")

    # 7. save and load into a fresh model
    peftlab.save(model, tmp_path / "adapter")
    fresh = case.make_model()
    peftlab.load(fresh, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(output_of(fresh, batch), adapted_out, atol=1e-5, rtol=1e-5)

    # 9. the peft format
    _check_peft_export(case, model, batch, adapted_out, tmp_path)

    # 5. detach restores the base exactly
    peftlab.detach(model)
    state = model.state_dict()
    assert set(state) == set(base_state)
    for k, v in base_state.items():
        assert torch.equal(state[k], v), f"{k} not restored by detach"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == base_flags
    with torch.no_grad():
        torch.testing.assert_close(output_of(model, batch), base_out, atol=0, rtol=0)


def _check_peft_export(case: Case, model: torch.nn.Module, batch: dict, adapted_out: torch.Tensor, tmp_path) -> None:
    from peft import PeftModel

    adapters = list(peftlab.adapters(model, "default").values())
    config = peftlab.adapter_configs(model)["default"]
    own_form = config.method in ("lora", "dora") or config.peft_type != "LORA"  # IA3, LN_TUNING: their own files
    with torch.no_grad():
        factors = [a.lora_factors() if a.additive else None for a in adapters]
        for adapter, pair in zip(adapters, factors):
            if pair is not None:
                change = adapter.delta_weight() - (adapter.residual() if adapter.has_residual else 0)
                torch.testing.assert_close(pair[1] @ pair[0], change, atol=1e-6, rtol=1e-5)
    refusal = case.peft_refusal or (None if own_form or all(factors) else "not a low-rank product")
    if refusal:
        with pytest.raises(peftlab.PeftlabError, match=refusal):
            peftlab.save(model, tmp_path / "peft", format="peft")
        return
    peftlab.save(model, tmp_path / "peft", format="peft")
    loaded = PeftModel.from_pretrained(case.make_model(), tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(output_of(loaded, batch), adapted_out, atol=1e-5, rtol=1e-5)
