"""LaMDA: contract rows (the official variant and the paper's); B's columns freeze on schedule
during ~50 training steps and stay frozen; the paper's variant starts from W0's top singular
triplets (the host keeps the rest) and freezes all of B within the share of the run given."""
import pytest
import torch

import peftlab
from conftest import tiny_bert, tiny_gpt2, token_batch
from contract import Case, run_contract
from short_training import train

QV = ["query", "value"]

ROWS = [
    Case("lamda-linear", lambda: peftlab.config("lamda", r=4, total_steps=100, targets=QV), tiny_bert, token_batch),
    Case("lamda-conv1d-dropout", lambda: peftlab.LaMDA(r=4, dropout=0.1, targets=["c_attn", "c_fc"]),
         tiny_gpt2, token_batch),
    Case("lamda-paper-linear", lambda: peftlab.LaMDA(r=4, init="svd", freeze_within=0.3, targets=QV),
         tiny_bert, token_batch),
    Case("lamda-paper-conv1d", lambda: peftlab.LaMDA(r=4, init="svd", targets=["c_attn"]), tiny_gpt2, token_batch),
]


@pytest.mark.parametrize("case", ROWS, ids=str)
def test_contract(case, tmp_path):
    run_contract(case, tmp_path)


def test_initial_state_and_what_trains():
    model = peftlab.attach(tiny_bert(), peftlab.LaMDA(r=4, targets=QV))
    for adapter in peftlab.adapters(model, "default").values():
        assert torch.equal(adapter.B.detach(), torch.zeros_like(adapter.B))
        assert adapter.A.abs().sum() > 0 and adapter.Sigma.abs().sum() > 0
        assert int(adapter.frozen_columns) == 0
    names = set(peftlab.trainable_parameters(model))
    assert names and all(n.endswith((".Sigma", ".B")) for n in names)  # A is frozen


def test_columns_of_B_freeze_on_schedule_and_keep_their_values():
    # r = 3, eta = 0.2 of 50 steps: one more column every 10 steps, all frozen from step 30
    config = peftlab.LaMDA(r=3, eta=0.2, total_steps=50, targets=QV)
    model = peftlab.attach(tiny_bert(), config)
    adapters = peftlab.adapters(model, "default")
    A0 = {s: a.A.clone() for s, a in adapters.items()}
    history = []  # (step, frozen count, effective B) per step

    def record(step):
        history.append((step, [int(a.frozen_columns) for a in adapters.values()],
                        {s: a.effective_B().detach().clone() for s, a in adapters.items()}))

    # weight decay and momentum keep pushing on B: frozen columns must still not move
    train(model, 50, lr=1e-2, weight_decay=0.1, after_step=record)

    for step, counts, _ in history:
        assert counts == [min(3, step // 10)] * len(adapters), f"step {step}"
    for (_, done, before), (step, counts, after) in zip(history, history[1:]):
        for site in adapters:
            # columns frozen by the previous step did not move at this step ...
            torch.testing.assert_close(after[site][:, :done[0]], before[site][:, :done[0]], atol=0, rtol=0)
            # ... and the columns still training did
            if counts[0] < 3:
                assert not torch.equal(after[site][:, counts[0]:], before[site][:, counts[0]:]), f"step {step}"
    for site, adapter in adapters.items():
        assert not adapter.B.requires_grad  # fully frozen: B takes no more gradient
        assert adapter.Sigma.requires_grad
        assert torch.equal(adapter.A, A0[site])


def test_paper_variant_starts_from_the_top_singular_triplets():
    model = tiny_bert()
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith(("query", "value"))}
    peftlab.attach(model, peftlab.LaMDA(r=4, alpha=8.0, init="svd", targets=QV))  # s = 2
    for site, adapter in peftlab.adapters(model, "default").items():
        W0 = originals[site].double()
        U, S, Vh = torch.linalg.svd(W0)
        # singular vectors are defined up to sign: compare the rank-one parts u_i s_i v_i^T
        for i in range(4):
            part = 2.0 * torch.outer(adapter.B[:, i], adapter.Sigma[i, i] * adapter.A[i]).double()
            torch.testing.assert_close(part, S[i] * torch.outer(U[:, i], Vh[i]), atol=1e-5, rtol=1e-4)
        assert torch.equal(adapter.Sigma.detach(), torch.diag(torch.diagonal(adapter.Sigma.detach())))
        # the host keeps the rest of the spectrum
        W_res = model.get_submodule(site).weight.detach().double()
        torch.testing.assert_close(torch.linalg.svdvals(W_res)[:28], S[4:], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(W_res + adapter.delta_weight().detach().double(), W0, atol=1e-5, rtol=1e-5)
        assert not adapter.A.requires_grad


def test_paper_schedule_freezes_all_of_B_within_the_share_given():
    # r = 4, all of B frozen within 0.3 of 40 steps = 12 steps: one column every 3 steps
    r, total, share = 4, 40, 0.3
    model = peftlab.attach(tiny_bert(), peftlab.LaMDA(r=r, init="svd", freeze_within=share, total_steps=total,
                                                      targets=QV))
    adapters = peftlab.adapters(model, "default")
    counts = {}
    train(model, 16, lr=1e-3, after_step=lambda step: counts.__setitem__(
        step, {int(a.frozen_columns) for a in adapters.values()}))
    expected = {step: {min(r, step // 3)} for step in range(1, 17)}
    assert counts == expected
    assert min(step for step, c in counts.items() if c == {r}) == 12 == share * total
    assert all(not a.B.requires_grad for a in adapters.values())


def test_a_fully_frozen_B_stays_frozen_when_adapters_are_switched():
    model = peftlab.attach(tiny_bert(), peftlab.LaMDA(r=4, targets=QV), "a")
    peftlab.attach(model, peftlab.LoRA(r=2, targets=QV), "b")
    peftlab.set_active(model, ["a"])
    for adapter in peftlab.adapters(model, "a").values():
        adapter.freeze_columns(4)  # the end of the schedule: B takes no more gradients
    peftlab.set_active(model, ["b"])
    peftlab.set_active(model, ["a", "b"])
    for adapter in peftlab.adapters(model, "a").values():
        assert not adapter.B.requires_grad and adapter.Sigma.requires_grad
    assert all(a.A.requires_grad for a in peftlab.adapters(model, "b").values())


def test_schedule_needs_total_steps():
    model = peftlab.attach(tiny_bert(), peftlab.LaMDA(r=2, targets=QV))
    with pytest.raises(peftlab.PeftlabError, match="total_steps"):
        peftlab.step(model, 1)
    with pytest.raises(peftlab.PeftlabError, match="eta must be > 0"):
        peftlab.LaMDA(eta=0)
    with pytest.raises(peftlab.PeftlabError, match="freeze_within must be in"):
        peftlab.LaMDA(freeze_within=1.5)
    with pytest.raises(peftlab.PeftlabError, match="init 'pissa' is unknown"):
        peftlab.LaMDA(init="pissa")


def test_frozen_state_survives_save_and_load(tmp_path):
    config = peftlab.LaMDA(r=3, eta=0.1, total_steps=20, targets=QV)
    model = peftlab.attach(tiny_bert(), config)
    train(model, 5)  # two columns frozen
    adapters = peftlab.adapters(model, "default")
    assert all(int(a.frozen_columns) == 2 for a in adapters.values())
    peftlab.save(model, tmp_path / "lamda")
    fresh = peftlab.load(tiny_bert(), tmp_path / "lamda")
    for site, adapter in peftlab.adapters(fresh, "default").items():
        assert int(adapter.frozen_columns) == 2
        torch.testing.assert_close(adapter.effective_B(), adapters[site].effective_B(), atol=0, rtol=0)
