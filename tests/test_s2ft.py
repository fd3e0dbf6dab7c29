"""S2FT: contract rows, the weight change written out as P^T Delta / Delta P, only the chosen rows and
columns change in training, heads and channels shared by the layers that write and read them, bad input."""
import pytest
import torch

import peftlab
from conftest import output_of, tiny_bert, tiny_gpt2, tiny_llama, token_batch
from contract import Case, run_contract

LLAMA_HEADS = {"re:.*(q_proj|k_proj|v_proj|o_proj)$": {"unit": 8}}  # tiny_llama: head size 32 / 4 = 8

ROWS = [
    Case("s2ft-bert-all-linear", lambda: peftlab.S2FT(fraction=0.25, targets="all-linear"), tiny_bert, token_batch),
    Case("s2ft-llama-heads-and-channels",
         lambda: peftlab.S2FT(count=1, targets=["v_proj", "o_proj", "up_proj", "gate_proj", "down_proj"],
                              overrides=LLAMA_HEADS), tiny_llama, token_batch),
    Case("s2ft-conv1d", lambda: peftlab.config("s2ft", count=3, targets=["c_attn", "c_proj", "c_fc"]), tiny_gpt2,
         token_batch),
]


@pytest.mark.parametrize("case", ROWS, ids=str)
def test_contract(case, tmp_path):
    run_contract(case, tmp_path)


def test_weight_change_is_the_block_in_the_chosen_rows_or_columns():
    model = peftlab.attach(tiny_bert(), peftlab.S2FT(count=2, unit=4, targets=["value", "attention.output.dense"]))
    sites = peftlab.adapters(model, "default")
    for name, adapter in sites.items():
        host = model.get_submodule(name)
        with torch.no_grad():
            adapter.delta.normal_()
        W = host.weight.detach().clone()
        index = adapter.index.tolist()
        assert len(index) == 8 and len(set(index)) == 8
        assert all(i // 4 == index[j - j % 4] // 4 for j, i in enumerate(index)), "units are whole heads"
        if name.endswith("value"):  # rows: the heads this layer writes
            assert adapter.axis == "out" and adapter.delta.shape == (8, 32)
            W[index, :] += adapter.delta.detach()
        else:  # columns: the heads the output projection reads
            assert adapter.axis == "in" and adapter.delta.shape == (32, 8)
            W[:, index] += adapter.delta.detach()
        x = torch.randn(2, 5, 32)
        torch.testing.assert_close(host(x), x @ W.T + host.bias, atol=1e-6, rtol=1e-5)
    # value and the attention output of one layer train the same heads
    assert torch.equal(sites["encoder.layer.0.attention.self.value"].index,
                       sites["encoder.layer.0.attention.output.dense"].index)
    assert not torch.equal(sites["encoder.layer.0.attention.self.value"].index,
                           sites["encoder.layer.1.attention.self.value"].index)


def test_only_the_chosen_rows_and_columns_change_in_training():
    model = tiny_bert()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    peftlab.attach(model, peftlab.S2FT(count=3, targets=["intermediate.dense", "output.dense"]))
    batch = token_batch(batch=4)
    optimizer = torch.optim.AdamW(peftlab.param_groups(model, 1e-2), lr=1e-2)
    model.train()
    for _ in range(5):
        optimizer.zero_grad()
        output_of(model, batch).pow(2).mean().backward()
        optimizer.step()
    sites = peftlab.adapters(model, "default")
    peftlab.merge(model)
    merged = {k: v for k, v in model.state_dict().items() if ".adapters." not in k}
    assert set(merged) == set(base)
    for key, before in base.items():
        site = key.rsplit(".", 1)[0]
        if not (key.endswith(".weight") and site in sites):
            assert torch.equal(merged[key], before), f"{key} changed"
            continue
        adapter = sites[site]
        rows, cols = (merged[key] != before).nonzero().unbind(1)
        chosen = set(adapter.index.tolist())
        assert set((rows if adapter.axis == "out" else cols).tolist()) == chosen
    # up writes the channels down reads, in each layer
    layer = "encoder.layer.1"
    assert torch.equal(sites[f"{layer}.intermediate.dense"].index, sites[f"{layer}.output.dense"].index)


def test_bad_input_is_refused_before_any_change():
    model = tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(peftlab.PeftlabError, match=r"count=9 is more units than .* \(8 of unit 4\)"):
        peftlab.attach(model, peftlab.S2FT(count=9, unit=4, targets=["value"]))
    with pytest.raises(peftlab.PeftlabError, match="unit=5 does not divide"):
        peftlab.attach(model, peftlab.S2FT(unit=5, targets=["value"]))
    assert "_peftlab" not in model.__dict__
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(peftlab.PeftlabError, match=r"fraction must be in \(0, 1\]"):
        peftlab.S2FT(fraction=1.5)
    with pytest.raises(peftlab.PeftlabError, match="axis 'rows' is unknown"):
        peftlab.S2FT(axis="rows")
