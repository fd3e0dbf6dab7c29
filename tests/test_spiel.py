"""SpIEL: contract rows, the sparse delta saved as indices + values, only the chosen entries change,
the update-prune-regrow schedule on MiniLM-L6 (budget kept, dropped entries back to W0, Adam's
moments seeded from the collected gradient), bad input."""
import pytest
import torch
from safetensors.torch import load_file

import peftlab
from conftest import load_minilm, output_of, tiny_bert, tiny_gpt2, token_batch
from contract import Case, run_contract

QV = ["query", "value"]

ROWS = [
    Case("spiel-density-linear", lambda: peftlab.SpIEL(density=0.1, targets=QV), tiny_bert, token_batch),
    Case("spiel-lora-budget-all-linear", lambda: peftlab.SpIEL(lora_rank=2, targets="all-linear"), tiny_bert,
         token_batch),
    Case("spiel-conv1d", lambda: peftlab.config("spiel", budget=50, targets=["c_attn", "c_fc"]), tiny_gpt2,
         token_batch),
]


@pytest.mark.parametrize("case", ROWS, ids=str)
def test_contract(case, tmp_path):
    run_contract(case, tmp_path)


def _effective(site, adapter) -> torch.Tensor:
    """W0 + scatter(idx, v) written out independently of the adapter's own code, (out, in)."""
    W = site.detach().clone().reshape(-1)
    W[adapter.indices] += adapter.values.detach()
    return W.view(site.shape)


def test_forward_is_w0_plus_scatter_and_save_holds_indices_and_values(tmp_path):
    model = peftlab.attach(tiny_bert(), peftlab.SpIEL(budget=40, targets=QV))
    site = "encoder.layer.0.attention.self.value"
    adapter = peftlab.adapters(model, "default")[site]
    host = model.get_submodule(site)
    with torch.no_grad():
        adapter.values.copy_(torch.randn(40))
    x = torch.randn(3, 5, 32)
    expected = x @ _effective(host.weight, adapter).T + host.bias
    torch.testing.assert_close(host(x), expected, atol=1e-6, rtol=1e-5)
    assert adapter.indices.unique().numel() == 40
    # the gradient of v is dL/dW at the chosen entries (read from the host weight's own gradient)
    host.weight.requires_grad_(True)
    host(x).pow(2).sum().backward()
    torch.testing.assert_close(adapter.values.grad, host.weight.grad.reshape(-1)[adapter.indices], rtol=1e-5,
                               atol=1e-6)
    host.weight.requires_grad_(False)

    peftlab.save(model, tmp_path / "a")
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert {k.rsplit(".", 1)[1] for k in tensors} == {"indices", "values"}
    assert all(t.shape == (40,) for t in tensors.values()), "a sparse delta is saved as indices + values"


def _train(model, batch, steps, lr=1e-2, check=None):
    """AdamW on the model's trainable parameters, peftlab.step with the optimizer after each step."""
    with torch.no_grad():
        target = torch.randn(output_of(model, batch).shape, generator=torch.Generator().manual_seed(4))
    optimizer = torch.optim.AdamW(peftlab.param_groups(model, lr), lr=lr, weight_decay=0.0)
    model.train()
    for step in range(1, steps + 1):
        optimizer.zero_grad()
        (output_of(model, batch) - target).pow(2).mean().backward()
        optimizer.step()
        if check is not None:
            check(step, "before")
        peftlab.step(model, step, optimizer=optimizer)
        if check is not None:
            check(step, "after", optimizer)
    model.eval()
    return optimizer


def test_only_the_chosen_entries_change():
    model = peftlab.attach(tiny_bert(), peftlab.SpIEL(budget=30, regrow_interval=4, accumulation_steps=2,
                                                      targets="all-linear"))
    base = {k: v.clone() for k, v in model.state_dict().items() if ".adapters." not in k}
    _train(model, token_batch(batch=4), steps=10)
    adapters = peftlab.adapters(model, "default")
    peftlab.merge(model)
    merged = model.state_dict()
    for key, before in base.items():
        site = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and site in adapters:
            changed = (merged[key] != before).reshape(-1).nonzero().squeeze(1)
            assert set(changed.tolist()) <= set(adapters[site].indices.tolist())
            assert 0 < changed.numel() <= 30
        else:
            assert torch.equal(merged[key], before), f"{key} changed"


def test_minilm_50_steps_keep_the_budget_drop_to_w0_and_seed_adam():
    model, tok = load_minilm()
    batch = dict(tok(["a gripping film", "dull and far too long", "not bad at all"], padding=True,
                     return_tensors="pt"))
    config = peftlab.SpIEL(density=0.002, regrow_interval=10, accumulation_steps=3, regrow_fraction=0.5,
                           decay="constant", targets=QV)
    peftlab.attach(model, config)
    adapters = peftlab.adapters(model, "default")
    hosts = {s: model.get_submodule(s) for s in adapters}
    W0 = {s: h.weight.detach().clone() for s, h in hosts.items()}
    budgets = {s: a.indices.numel() for s, a in adapters.items()}
    # The dense gradient dL/dW over each collection window, read independently from the host weight.
    grads = {s: torch.zeros_like(w) for s, w in W0.items()}
    seen = {"regrown": 0, "dropped": 0}
    previous = {}

    def check(step, when, optimizer=None):
        collecting = step % 10 in (8, 9, 0)  # the 3 steps before each multiple of 10
        if when == "before":
            previous.update({s: (a.indices.clone(), a.values.detach().clone()) for s, a in adapters.items()})
            for s, h in hosts.items():
                if collecting:
                    grads[s] += h.weight.grad
                h.weight.grad = None
            return
        for s, a in adapters.items():
            assert a.indices.numel() == budgets[s] and a.indices.unique().numel() == budgets[s]
            old_idx, old_v = previous[s]
            if step % 10:
                assert torch.equal(a.indices, old_idx), "indices change only at a regrow"
                continue
            moved = (a.indices != old_idx).nonzero().squeeze(1)
            seen["regrown"] += moved.numel()
            assert moved.numel() > 0
            assert torch.all(a.values[moved] == 0), "a regrown entry starts from 0"
            dropped = sorted(set(old_idx.tolist()) - set(a.indices.tolist()))
            seen["dropped"] += len(dropped)
            effective = _effective(hosts[s].weight, a).reshape(-1)
            assert torch.equal(effective[dropped], W0[s].reshape(-1)[dropped]), "a dropped entry returns to W0"
            mean = grads[s].reshape(-1)[a.indices[moved]] / 3
            state = optimizer.state[a.values]
            torch.testing.assert_close(state["exp_avg"][moved], mean, atol=1e-7, rtol=1e-3)
            kept_values = a.values[a.indices == old_idx]
            assert torch.equal(kept_values, old_v[a.indices == old_idx]), "kept entries keep their values"
        if step % 10 == 0:
            grads.update({s: torch.zeros_like(w) for s, w in W0.items()})

    for h in hosts.values():  # so the host weight's own gradient can be read; the optimizer never sees it
        h.weight.requires_grad_(True)
    _train(model, batch, steps=50, lr=1e-3, check=check)
    assert seen["regrown"] > 0 and seen["dropped"] == seen["regrown"]


def test_fraction_schedule():
    linear = peftlab.SpIEL(regrow_fraction=0.2, total_steps=100)
    assert linear.fraction(0) == pytest.approx(0.2) and linear.fraction(50) == pytest.approx(0.1)
    cosine = peftlab.SpIEL(regrow_fraction=0.2, decay="cosine", total_steps=100)
    assert cosine.fraction(50) == pytest.approx(0.1) and cosine.fraction(100) == pytest.approx(0.0)
    assert peftlab.SpIEL(regrow_fraction=0.2).fraction(10**6) == 0.2  # total_steps unknown: constant


def test_step_needs_the_optimizer():
    model = peftlab.attach(tiny_bert(), peftlab.SpIEL(targets=QV))
    with pytest.raises(peftlab.PeftlabError, match="optimizer="):
        peftlab.step(model, 1)


@pytest.mark.parametrize("fields, message", [
    ({"budget": 5000}, "budget=5000 asks for 5000 entries, more than"),
    ({"lora_rank": 40}, "lora_rank=40"),
])
def test_budget_larger_than_the_layer_is_refused_before_any_change(fields, message):
    model = tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(peftlab.PeftlabError, match=message):
        peftlab.attach(model, peftlab.SpIEL(targets=QV, **fields))
    assert "_peftlab" not in model.__dict__
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("fields, message", [
    ({"regrow_interval": 0}, "regrow_interval must be a positive integer"),
    ({"accumulation_steps": 30}, "accumulation_steps=30 must be <= regrow_interval=20"),
    ({"density": 0.0}, r"density must be in \(0, 1\]"),
    ({"budget": 10, "lora_rank": 2}, "give one of them"),
    ({"decay": "step"}, "decay 'step' is unknown"),
])
def test_bad_fields(fields, message):
    with pytest.raises(peftlab.PeftlabError, match=message):
        peftlab.SpIEL(**fields)
