"""SoRA: contract rows; the proximal step zeroes gates during training; pruning leaves a smaller
plain LoRA with the same outputs."""
import pytest
import torch

import peftlab
from conftest import output_of, tiny_bert, tiny_gpt2, token_batch
from contract import Case, run_contract
from peftlab.methods.sora import prune, to_lora
from short_training import train

QV = ["query", "value"]

ROWS = [
    Case("sora-linear", lambda: peftlab.config("sora", r=4, targets=QV), tiny_bert, token_batch),
    Case("sora-conv1d-dropout", lambda: peftlab.SoRA(r=4, dropout=0.1, targets=["c_attn"]), tiny_gpt2, token_batch),
]


@pytest.mark.parametrize("case", ROWS, ids=str)
def test_contract(case, tmp_path):
    run_contract(case, tmp_path)


def official_sparse_step(gate, xi):
    """The official SparseAdamW's thresholding, line by line (TsinghuaC3I/SoRA src/sparse_optimizer.py)."""
    p = gate.clone()
    p[p > xi] -= xi
    p[p < -xi] += xi
    p[abs(p) < xi] = 0.0
    return p


# xi = 0.25 (exact in binary): the band edges at xi and 2 xi, inside, on and outside them
XI = 0.25
GATES = [0.6, 0.51, 0.5, 0.49, 0.3, 0.1, 0.0, -0.1, -0.3, -0.49, -0.5, -0.51, -2.0]


def gates_after_one_step(**fields):
    model = peftlab.attach(tiny_bert(), peftlab.SoRA(r=len(GATES), xi=XI, targets=QV, **fields))
    adapter = next(iter(peftlab.adapters(model, "default").values()))
    with torch.no_grad():
        adapter.gate.copy_(torch.tensor(GATES))
    peftlab.step(model, 1)
    return adapter


def test_official_band_zeroes_gates_below_twice_xi():
    adapter = gates_after_one_step()  # threshold="official" is the default
    expected = [0.35, 0.26, 0.25, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -0.25, -0.26, -1.75]
    torch.testing.assert_close(adapter.gate.detach(), torch.tensor(expected))
    torch.testing.assert_close(adapter.gate.detach(), official_sparse_step(torch.tensor(GATES), XI))
    assert adapter.kept().tolist() == [0, 1, 2, 10, 11, 12]


def test_soft_threshold_is_the_papers_proximal_operator():
    adapter = gates_after_one_step(threshold="soft")
    g = torch.tensor(GATES)
    torch.testing.assert_close(adapter.gate.detach(), torch.sign(g) * torch.clamp(g.abs() - XI, min=0))
    assert adapter.kept().tolist() == [0, 1, 2, 3, 4, 8, 9, 10, 11, 12]


def test_a_gate_at_exactly_xi_is_zeroed_where_the_official_code_keeps_it():
    model = peftlab.attach(tiny_bert(), peftlab.SoRA(r=2, xi=XI, targets=QV))
    adapter = next(iter(peftlab.adapters(model, "default").values()))
    with torch.no_grad():
        adapter.gate.copy_(torch.tensor([XI, -XI]))
    peftlab.step(model, 1)
    assert not adapter.gate.any()
    assert official_sparse_step(torch.tensor([XI, -XI]), XI).tolist() == [XI, -XI]  # the documented difference


def test_l1_term_and_gate_group():
    model = peftlab.attach(tiny_bert(), peftlab.SoRA(r=4, l1=0.5, targets=QV))
    gates = torch.cat([a.gate for a in peftlab.adapters(model, "default").values()])
    torch.testing.assert_close(peftlab.regularization(model), 0.5 * gates.abs().mean())
    groups = peftlab.param_groups(model, 1e-3)
    assert [g.get("weight_decay") for g in groups] == [None, 0.0]  # gates get no weight decay
    assert {id(p) for p in groups[1]["params"]} == {id(a.gate) for a in peftlab.adapters(model, "default").values()}
    off = peftlab.attach(tiny_bert(), peftlab.SoRA(r=4, l1=0.0, targets=QV))
    assert peftlab.regularization(off) is None


def trained_sora(also_train=()):
    # xi larger than what one Adam step can move a gate (~lr): zeroed gates stay zero
    model = peftlab.attach(tiny_bert(), peftlab.SoRA(r=6, xi=0.02, l1=0.1, targets=QV, also_train=list(also_train)))
    kept = []
    train(model, 50, lr=1e-2, after_step=lambda step: kept.append(
        sum(len(a.kept()) for a in peftlab.adapters(model, "default").values())))
    return model, kept


def test_training_zeroes_gates_on_the_way():
    model, kept = trained_sora()
    assert kept[0] >= 4 * 6 - 2 and kept[-1] <= 4 * 6 // 2  # ranks were switched off over the steps ...
    assert all(later <= earlier for earlier, later in zip(kept, kept[1:]))  # ... and stayed off
    assert kept[-1] > 0


def test_pruned_lora_is_smaller_and_computes_the_same(tmp_path):
    model, kept = trained_sora()
    batch = token_batch()
    with torch.no_grad():
        expected = output_of(model, batch)
    lora, tensors = to_lora(model)
    assert isinstance(lora, peftlab.LoRA)
    sora_sites = peftlab.adapters(model, "default")
    assert sum(o["r"] for o in lora.overrides.values()) == kept[-1]
    for site, fields in lora.overrides.items():
        assert fields["r"] == len(sora_sites[site].kept())
        assert fields["alpha"] / fields["r"] == pytest.approx(sora_sites[site].scale)
    lora_params = sum(t.numel() for t in tensors.values())
    sora_params = sum(p.numel() for p in peftlab.trainable_parameters(model).values())
    assert lora_params < sora_params
    # the LoRA attached to a fresh base model reproduces the SoRA model's outputs
    fresh = peftlab.attach(tiny_bert(), lora, state_dict=tensors)
    with torch.no_grad():
        torch.testing.assert_close(output_of(fresh, batch), expected, atol=1e-5, rtol=1e-5)
    # and it is an ordinary LoRA: it saves and loads as one
    peftlab.save(fresh, tmp_path / "pruned")
    again = peftlab.load(tiny_bert(), tmp_path / "pruned")
    assert peftlab.adapter_configs(again)["default"].method == "lora"
    with torch.no_grad():
        torch.testing.assert_close(output_of(again, batch), expected, atol=1e-5, rtol=1e-5)


def test_prune_in_place_keeps_outputs_and_also_trained_modules():
    model, _ = trained_sora(also_train=["pooler"])
    batch = token_batch()
    with torch.no_grad():
        expected = output_of(model, batch)
        pooled = model(**batch).pooler_output
    prune(model)
    assert peftlab.adapter_configs(model)["default"].method == "lora"
    with torch.no_grad():
        torch.testing.assert_close(output_of(model, batch), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(**batch).pooler_output, pooled, atol=1e-5, rtol=1e-5)
    # detach still returns the untouched base model, pooler included
    peftlab.detach(model)
    base = tiny_bert()
    for key, value in base.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_nothing_left_to_prune_is_an_error():
    model = peftlab.attach(tiny_bert(), peftlab.SoRA(r=2, xi=10.0, targets=QV))
    peftlab.step(model, 1)  # every gate below the threshold
    with pytest.raises(peftlab.PeftlabError, match="every gate"):
        to_lora(model)
    lora = peftlab.attach(tiny_bert(), peftlab.LoRA(r=2, targets=QV))
    with pytest.raises(peftlab.PeftlabError, match="not SoRA"):
        to_lora(lora)
    with pytest.raises(peftlab.PeftlabError, match="threshold 'hard' is unknown"):
        peftlab.SoRA(threshold="hard")
