"""IncreLoRA: contract rows; ranks grow on schedule to exactly the budget in ~50 training steps;
each allocation goes to the top_h sites by I_bar * U_bar; the sensitivity is
sum|dW * dL/dW| / sqrt(numel); new ranks start from fresh optimizer state with the official
restart warmup (no move at their first step, the full rate after the warmup, checked against a
fresh AdamW run on the same gradients); grown ranks save and load; the orthogonality term."""
import math

import pytest
import torch

import peftlab
from conftest import output_of, tiny_bert, tiny_gpt2, token_batch
from contract import Case, run_contract
from peftlab.methods.increlora import ranks

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


def train(model, steps, lr=5e-3, weight_decay=0.0, before_step=None, after_step=None):
    """AdamW over peftlab.param_groups on a fixed regression target, the step hook given the optimizer.

    before_step(step, optimizer) runs after backward, before the optimizer step; after_step(step)
    after peftlab.step."""
    batch = token_batch(seed=3, batch=4, length=12)
    with torch.no_grad():
        target = torch.randn(output_of(model, batch).shape, generator=torch.Generator().manual_seed(4))
    optimizer = torch.optim.AdamW(peftlab.param_groups(model, lr), lr=lr, weight_decay=weight_decay)
    model.train()
    for step in range(1, steps + 1):
        loss = (output_of(model, batch) - target).pow(2).mean() + peftlab.regularization(model)
        optimizer.zero_grad()
        loss.backward()
        if before_step is not None:
            before_step(step, optimizer)
        optimizer.step()
        peftlab.step(model, step, optimizer=optimizer)
        if after_step is not None:
            after_step(step)
    model.eval()
    return optimizer


def growing_config(**fields):
    # 4 sites from rank 1: budget 4 * 4 = 16, +2 ranks to 2 sites every 5 steps after step 5
    # -> 12 ranks to hand out in 3 allocations (steps 10, 15, 20)
    return peftlab.IncreLoRA(r=1, target_rank=4, max_rank=8, warmup=5, interval=5, top_h=2, targets=QV, **fields)


def test_ranks_grow_on_schedule_to_exactly_the_budget(tmp_path):
    model = peftlab.attach(tiny_bert(), growing_config(total_steps=50))
    adapters = peftlab.adapters(model, "default")
    history = {}
    train(model, 50, after_step=lambda step: history.__setitem__(step, ranks(adapters)))

    totals = {step: sum(r.values()) for step, r in history.items()}
    grew_at = [step for step in range(2, 51) if totals[step] != totals[step - 1]]
    assert grew_at == [10, 15, 20]
    assert [totals[s] for s in (9, 10, 15, 20, 50)] == [4, 8, 12, 16, 16]
    for step in range(2, 51):  # ranks only grow, by rank_step, and only at chosen sites
        changes = [history[step][s] - history[step - 1][s] for s in adapters]
        assert all(c in (0, 2) for c in changes) and sum(c > 0 for c in changes) <= 2
    final = ranks(adapters)
    assert sum(final.values()) == 16 and max(final.values()) <= 8
    for a in adapters.values():  # growth is over: reserves closed, no more sensitivity tracking
        assert int(a.reserve) == 0 and not a.growing
        assert torch.equal(a.factors(8)[2][int(a.rank):], torch.zeros(8 - int(a.rank)))

    # the grown ranks travel with the saved adapter
    batch = token_batch()
    with torch.no_grad():
        expected = output_of(model, batch)
    peftlab.save(model, tmp_path / "increlora")
    fresh = peftlab.load(tiny_bert(), tmp_path / "increlora")
    assert ranks(peftlab.adapters(fresh, "default")) == final
    with torch.no_grad():
        torch.testing.assert_close(output_of(fresh, batch), expected, atol=1e-5, rtol=1e-5)


def test_each_allocation_goes_to_the_top_h_sites_by_importance_times_uncertainty():
    model = peftlab.attach(tiny_bert(), growing_config())
    adapters = list(peftlab.adapters(model, "default").values())
    optimizer = torch.optim.AdamW(peftlab.param_groups(model, 1e-3))
    peftlab.step(model, 1, optimizer=optimizer)  # opens the reserves
    # importance, uncertainty per site: the products rank sites 2, 1 first; importance alone
    # would pick 0, 1 and uncertainty alone 3, 2
    smoothed = [(4.0, 0.1), (1.0, 1.0), (0.6, 2.0), (0.2, 3.0)]
    for a, (importance, uncertainty) in zip(adapters, smoothed):
        a.importance.fill_(importance)
        a.uncertainty.fill_(uncertainty)
    peftlab.step(model, 10, optimizer=optimizer)  # an allocation step; no backward ran, scores stay
    assert [int(a.rank) for a in adapters] == [1, 3, 3, 1]
    # the next allocation follows the new scores: sites 0 and 1
    for a, (importance, uncertainty) in zip(adapters, [(3.0, 1.0), (2.0, 1.0), (0.1, 0.1), (0.5, 0.5)]):
        a.importance.fill_(importance)
        a.uncertainty.fill_(uncertainty)
    peftlab.step(model, 15, optimizer=optimizer)
    assert [int(a.rank) for a in adapters] == [3, 5, 3, 1]
    # the last allocation is trimmed to the budget
    budget = peftlab.attach(tiny_bert(), growing_config(target_total_rank=7))
    trimmed = list(peftlab.adapters(budget, "default").values())
    optimizer = torch.optim.AdamW(peftlab.param_groups(budget, 1e-3))
    peftlab.step(budget, 1, optimizer=optimizer)
    for a, (importance, uncertainty) in zip(trimmed, smoothed):
        a.importance.fill_(importance)
        a.uncertainty.fill_(uncertainty)
    peftlab.step(budget, 10, optimizer=optimizer)  # 4 + 2 + 1: the second site gets one rank only
    assert [int(a.rank) for a in trimmed] == [1, 2, 3, 1]
    assert all(int(a.reserve) == 0 and not a.growing for a in trimmed)


def test_scores_follow_the_smoothed_sensitivity():
    model = peftlab.attach(tiny_bert(), growing_config())
    site = "encoder.layer.0.attention.self.query"
    adapter = peftlab.adapters(model, "default")[site]
    host = model.get_submodule(site)
    with torch.no_grad():
        adapter.E[0].normal_()  # a non-zero update, so the sensitivity is not trivially 0
    host.weight.requires_grad_(True)  # dL/dW0 == dL/d(dW): read it from the host's own gradient
    model.train()
    output_of(model, token_batch()).pow(2).mean().backward()
    delta = adapter.delta_weight().detach()
    expected = (delta * host.weight.grad).abs().sum() / math.sqrt(delta.numel())
    torch.testing.assert_close(adapter.sensitivity, expected, rtol=1e-4, atol=1e-8)
    host.weight.requires_grad_(False)
    peftlab.step(model, 1, optimizer=torch.optim.SGD(peftlab.param_groups(model, 1e-3)))
    torch.testing.assert_close(adapter.importance, 0.15 * expected, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(adapter.uncertainty, 0.15 * 0.85 * expected, rtol=1e-4, atol=1e-8)
    assert adapter.sensitivity is None
    assert int(adapter.reserve) == 2  # the reserve opens after the first step


def warmup_multipliers(joined, steps, warmup):
    """The official Multi_LambdaLR warmup of a group added after step `joined`: lr 0 at its first
    step (joined + 1), then k / warmup at step joined + 1 + k, capped at 1 (constant main rate)."""
    return {t: 1.0 if warmup == 0 else min(1.0, (t - joined - 1) / warmup) for t in steps}


class Recorder:
    """Per step: the gradients the optimizer saw and the values after peftlab.step, of some blocks."""

    def __init__(self, adapters, blocks):
        self.adapters, self.blocks = adapters, blocks  # blocks: [("A", 1), ("E", 1), ...]
        self.grads, self.values = {}, {}

    def tensors(self):
        for site, a in self.adapters.items():
            for name, b in self.blocks:
                yield (site, f"{name}{b}"), getattr(a, name)[b]

    def before_step(self, step, optimizer):
        for key, p in self.tensors():
            self.grads[(*key, step)] = None if p.grad is None else p.grad.clone()

    def after_step(self, step):
        for key, p in self.tensors():
            self.values[(*key, step)] = p.detach().clone()

    def replay(self, site, name, joined, last, lr, warmup, weight_decay):
        """A fresh AdamW from the value after step `joined`, fed the recorded gradients at the
        official restart warmup's rates, must retrace the block step by step."""
        param = torch.nn.Parameter(self.values[site, name, joined].clone())
        reference = torch.optim.AdamW([param], lr=lr, weight_decay=weight_decay)
        multipliers = warmup_multipliers(joined, range(joined + 1, last + 1), warmup)
        for step in range(joined + 1, last + 1):
            param.grad = self.grads[site, name, step]
            reference.param_groups[0]["lr"] = lr * multipliers[step]
            reference.step()
            torch.testing.assert_close(self.values[site, name, step], param.detach(), atol=1e-7, rtol=1e-5,
                                       msg=lambda m: f"{site} {name} step {step}: {m}")


def test_new_ranks_restart_from_fresh_adam_state_with_a_warmup():
    # reserves open after step 1 (block 1) and after the allocation at step 10 (block 2 at the
    # two chosen sites, whose grown e joins too); restart_warmup = 4, lr 0 at a block's first step
    lr, warmup, decay = 5e-3, 4, 0.1
    model = peftlab.attach(tiny_bert(), growing_config(restart_warmup=warmup))
    adapters = peftlab.adapters(model, "default")
    log = Recorder(adapters, [("A", 1), ("B", 1), ("E", 1), ("A", 2), ("B", 2)])
    train(model, 20, lr=lr, weight_decay=decay, before_step=log.before_step, after_step=log.after_step)
    assert warmup_multipliers(1, [2, 3, 6, 9], warmup) == {2: 0.0, 3: 0.25, 6: 1.0, 9: 1.0}
    grown = [site for site, a in adapters.items() if int(a.grown_at[1]) == 10]
    assert len(grown) == 2

    for site in adapters:
        for name in ("A1", "B1"):
            # the reserve opened after step 1 does not move at its first step, then moves
            assert torch.equal(log.values[site, name, 2], log.values[site, name, 1])
            assert not torch.equal(log.values[site, name, 8], log.values[site, name, 7])
            log.replay(site, name, joined=1, last=9, lr=lr, warmup=warmup, weight_decay=decay)
    for site in grown:
        # e of the grown ranks starts at 1e-5 and does not move at its first step; its Adam
        # state is fresh although it took zero gradients while in reserve
        torch.testing.assert_close(log.values[site, "E1", 10], torch.full((2,), 1e-5))
        assert torch.equal(log.values[site, "E1", 11], log.values[site, "E1", 10])
        log.replay(site, "E1", joined=10, last=20, lr=lr, warmup=warmup, weight_decay=decay)
        for name in ("A2", "B2"):  # the new reserve likewise
            log.replay(site, name, joined=10, last=20, lr=lr, warmup=warmup, weight_decay=decay)


def test_without_the_warmup_new_ranks_take_full_fresh_adam_steps():
    lr = 5e-3
    model = peftlab.attach(tiny_bert(), growing_config(restart_warmup=0))
    adapters = peftlab.adapters(model, "default")
    log = Recorder(adapters, [("A", 1), ("B", 1)])
    train(model, 6, lr=lr, before_step=log.before_step, after_step=log.after_step)
    for site in adapters:
        assert not torch.equal(log.values[site, "A1", 2], log.values[site, "A1", 1])
        for name in ("A1", "B1"):
            log.replay(site, name, joined=1, last=6, lr=lr, warmup=0, weight_decay=0.0)


def test_orthogonality_term():
    model = peftlab.attach(tiny_bert(), growing_config(orth_reg=0.3))
    adapters = peftlab.adapters(model, "default")
    peftlab.step(model, 1, optimizer=torch.optim.SGD(peftlab.param_groups(model, 1e-3)))  # rank 1 + reserve 2
    terms = []
    for a in adapters.values():
        A, B = torch.cat([a.A[0], a.A[1]]), torch.cat([a.B[0], a.B[1]], dim=1)
        terms += [torch.linalg.matrix_norm(A @ A.T - torch.eye(3)), torch.linalg.matrix_norm(B.T @ B - torch.eye(3))]
    loss = peftlab.regularization(model)
    torch.testing.assert_close(loss, 0.3 * torch.stack(terms).mean())
    loss.backward()
    for a in adapters.values():
        assert a.A[0].grad.abs().sum() > 0 and a.A[1].grad.abs().sum() > 0 and a.A[2].grad is None


def test_bad_input():
    with pytest.raises(peftlab.PeftlabError, match="raise max_rank"):
        peftlab.IncreLoRA(r=4, target_rank=4, max_rank=4)
    with pytest.raises(peftlab.PeftlabError, match="must be >= the initial r"):
        peftlab.IncreLoRA(r=4, target_rank=2)
    with pytest.raises(peftlab.PeftlabError, match="restart_warmup"):
        peftlab.IncreLoRA(restart_warmup=-1)
    model = tiny_bert()
    with pytest.raises(peftlab.PeftlabError, match="max_rank=96"):
        peftlab.attach(model, peftlab.IncreLoRA(target_rank=32, targets=QV))
    assert "_peftlab" not in model.__dict__
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    late = peftlab.attach(tiny_bert(), growing_config(total_steps=15))
    with pytest.raises(peftlab.PeftlabError, match="reach its budget at step ~20"):
        peftlab.step(late, 1, optimizer=optimizer)
    over = peftlab.attach(tiny_bert(), growing_config(target_total_rank=40))
    with pytest.raises(peftlab.PeftlabError, match="budget 40"):
        peftlab.step(over, 1, optimizer=optimizer)
    with pytest.raises(peftlab.PeftlabError, match="optimizer="):
        peftlab.step(over, 1)
