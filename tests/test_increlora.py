"""IncreLoRA: contract rows; ranks grow on schedule to exactly the budget in ~50 training steps;
the sensitivity is sum|dW * dL/dW| / sqrt(numel); grown ranks save and load; the orthogonality term."""
import math

import pytest
import torch

import peftlab
from conftest import output_of, tiny_bert, tiny_gpt2, token_batch
from contract import Case, run_contract
from peftlab.methods.increlora import ranks
from short_training import train

QV = ["query", "value"]

ROWS = [
    Case("increlora-linear", lambda: peftlab.config("increlora", r=2, target_rank=4, targets=QV),
         tiny_bert, token_batch),
    Case("increlora-conv1d", lambda: peftlab.IncreLoRA(r=1, target_rank=2, dropout=0.1, targets=["c_attn", "c_fc"]),
         tiny_gpt2, token_batch),
]


@pytest.mark.parametrize("case", ROWS, ids=str)
def test_contract(case, tmp_path):
    run_contract(case, tmp_path)


def growing_config(**fields):
    # 4 sites from rank 1: budget 4 * 4 = 16, +2 ranks to 2 sites every 5 steps after step 5
    # -> 12 ranks to hand out in 3 allocations (steps 10, 15, 20)
    return peftlab.IncreLoRA(r=1, target_rank=4, max_rank=8, warmup=5, interval=5, top_h=2, targets=QV, **fields)


def test_ranks_grow_on_schedule_to_exactly_the_budget(tmp_path):
    model = peftlab.attach(tiny_bert(), growing_config(total_steps=50))
    adapters = peftlab.adapters(model, "default")
    history = {}
    train(model, 50, lr=5e-3, after_step=lambda step: history.__setitem__(step, ranks(adapters)))

    totals = {step: sum(r.values()) for step, r in history.items()}
    grew_at = [step for step in range(2, 51) if totals[step] != totals[step - 1]]
    assert grew_at == [10, 15, 20]
    assert [totals[s] for s in (9, 10, 15, 20, 50)] == [4, 8, 12, 16, 16]
    for step in range(2, 51):  # ranks only grow, by rank_step, and only at chosen sites
        changes = [history[step][s] - history[step - 1][s] for s in adapters]
        assert all(c in (0, 2) for c in changes) and sum(c > 0 for c in changes) <= 2
    final = ranks(adapters)
    assert sum(final.values()) == 16 and max(final.values()) <= 8
    assert len(set(final.values())) > 1  # the budget went where the scores pointed, not evenly
    for a in adapters.values():  # growth is over: reserves closed, no more sensitivity tracking
        assert int(a.reserve) == 0 and not a.growing
        assert torch.equal(a.gates()[int(a.rank):], torch.zeros(8 - int(a.rank)))

    # the grown ranks travel with the saved adapter
    batch = token_batch()
    with torch.no_grad():
        expected = output_of(model, batch)
    peftlab.save(model, tmp_path / "increlora")
    fresh = peftlab.load(tiny_bert(), tmp_path / "increlora")
    assert ranks(peftlab.adapters(fresh, "default")) == final
    with torch.no_grad():
        torch.testing.assert_close(output_of(fresh, batch), expected, atol=1e-5, rtol=1e-5)


def test_scores_follow_the_smoothed_sensitivity():
    model = peftlab.attach(tiny_bert(), growing_config())
    site = "encoder.layer.0.attention.self.query"
    adapter = peftlab.adapters(model, "default")[site]
    host = model.get_submodule(site)
    with torch.no_grad():
        adapter.E.normal_()  # a non-zero update, so the sensitivity is not trivially 0
    host.weight.requires_grad_(True)  # dL/dW0 == dL/d(dW): read it from the host's own gradient
    model.train()
    output_of(model, token_batch()).pow(2).mean().backward()
    delta = adapter.delta_weight().detach()
    expected = (delta * host.weight.grad).abs().sum() / math.sqrt(delta.numel())
    torch.testing.assert_close(adapter.sensitivity, expected, rtol=1e-4, atol=1e-8)
    host.weight.requires_grad_(False)
    peftlab.step(model, 1)
    torch.testing.assert_close(adapter.importance, 0.15 * expected, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(adapter.uncertainty, 0.15 * 0.85 * expected, rtol=1e-4, atol=1e-8)
    assert adapter.sensitivity is None
    assert int(adapter.reserve) == 2  # the reserve opens after the first step


def test_orthogonality_term():
    model = peftlab.attach(tiny_bert(), growing_config(orth_reg=0.3))
    adapters = peftlab.adapters(model, "default")
    peftlab.step(model, 1)  # open the reserves: rank 1 + reserve 2 rows in use
    terms = []
    for a in adapters.values():
        A, B = a.A[:3], a.B[:, :3]
        terms += [torch.linalg.matrix_norm(A @ A.T - torch.eye(3)), torch.linalg.matrix_norm(B.T @ B - torch.eye(3))]
    loss = peftlab.regularization(model)
    torch.testing.assert_close(loss, 0.3 * torch.stack(terms).mean())
    loss.backward()
    for a in adapters.values():
        assert a.A.grad[:3].abs().sum() > 0 and torch.equal(a.A.grad[3:], torch.zeros_like(a.A.grad[3:]))


def test_bad_input():
    with pytest.raises(peftlab.PeftlabError, match="raise max_rank"):
        peftlab.IncreLoRA(r=4, target_rank=4, max_rank=4)
    with pytest.raises(peftlab.PeftlabError, match="must be >= the initial r"):
        peftlab.IncreLoRA(r=4, target_rank=2)
    model = tiny_bert()
    with pytest.raises(peftlab.PeftlabError, match="max_rank=96"):
        peftlab.attach(model, peftlab.IncreLoRA(target_rank=32, targets=QV))
    assert "_peftlab" not in model.__dict__
    late = peftlab.attach(tiny_bert(), growing_config(total_steps=15))
    with pytest.raises(peftlab.PeftlabError, match="reach its budget at step ~20"):
        peftlab.step(late, 1)
    over = peftlab.attach(tiny_bert(), growing_config(target_total_rank=40))
    with pytest.raises(peftlab.PeftlabError, match="budget 40"):
        peftlab.step(over, 1)
