"""DSEE (no peft counterpart): contract rows and properties of the sparse + low-rank update.

- the sparse part S touches only its support Ω, before and after training steps, and Ω never moves;
- Ω is what the official code picks: the largest entries of the sparse part of a low-rank +
  sparse split of W0 (decomposition, at the default settings, recomputed here independently
  by the alternating truncated-SVD / hard-threshold rounds), the largest |W0|
  (magnitude), or a seeded random draw;
- the trainable count is r (in + out) + num_sparse per site.
"""
import pytest
import torch

import peftlab
from conftest import output_of, tiny_bert, tiny_gpt2, token_batch
from contract import Case, run_contract

QV = ["query", "value"]

ROWS = [
    Case("dsee-decomposition", lambda: peftlab.config("dsee", r=4, num_sparse=32, targets=QV), tiny_bert, token_batch),
    Case("dsee-magnitude-dropout", lambda: peftlab.DSEE(r=4, num_sparse=16, support="magnitude", dropout=0.1,
                                                        targets="all-linear"), tiny_bert, token_batch),
    Case("dsee-random", lambda: peftlab.DSEE(r=2, num_sparse=50, support="random", targets=QV), tiny_bert, token_batch),
    Case("dsee-conv1d", lambda: peftlab.DSEE(r=4, num_sparse=32, targets=["c_attn", "c_proj"]), tiny_gpt2, token_batch),
]


@pytest.mark.parametrize("case", ROWS, ids=str)
def test_contract(case, tmp_path):
    run_contract(case, tmp_path)


def _off_support(adapter):
    mask = torch.ones(adapter.out_features * adapter.in_features, dtype=torch.bool)
    mask[adapter.support] = False
    return mask.view(adapter.out_features, adapter.in_features)


def test_sparse_part_touches_only_its_support():
    model = peftlab.attach(tiny_bert(), peftlab.DSEE(r=4, num_sparse=40, targets=QV))
    sites = peftlab.adapters(model, "default")
    supports = {s: a.support.clone() for s, a in sites.items()}
    optimizer = torch.optim.AdamW(peftlab.trainable_parameters(model).values(), lr=1e-2)
    model.train()
    for step in range(3):
        output_of(model, token_batch(seed=step)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    for site, adapter in sites.items():
        assert torch.equal(adapter.support, supports[site])  # Ω is fixed
        assert adapter.support.unique().numel() == 40
        S = adapter.sparse_matrix()
        assert S.flatten()[adapter.support].abs().min() > 0  # every support value trained away from 0
        assert not S[_off_support(adapter)].any()
        low_rank = adapter.scale * adapter.B @ adapter.A
        assert not (adapter.delta_weight() - low_rank)[_off_support(adapter)].any()


def test_magnitude_support_is_the_largest_pretrained_weights():
    model = tiny_bert()
    weight = model.encoder.layer[0].attention.self.query.weight.detach().clone()
    peftlab.attach(model, peftlab.DSEE(num_sparse=25, support="magnitude", targets=["encoder.layer.0.attention.self.query"]))
    (adapter,) = peftlab.adapters(model, "default").values()
    chosen = weight.abs().flatten()[adapter.support]
    rest = weight.abs().flatten()[_off_support(adapter).flatten()]
    assert chosen.min() >= rest.max()


def godec_sparse_part(W, rank, iters, threshold):
    """W = L + S, alternating: L the best rank-`rank` fit of W - S (truncated SVD), S = W - L
    with entries below `threshold` in magnitude set to 0; S after `iters` rounds."""
    S = torch.zeros_like(W)
    for _ in range(iters):
        U, sigma, Vh = torch.linalg.svd(W - S)
        S = W - U[:, :rank] @ torch.diag(sigma[:rank]) @ Vh[:rank]
        S = torch.where(S.abs() < threshold, torch.zeros_like(S), S)
    return S


def test_default_support_is_the_largest_sparse_part_of_the_alternating_decomposition():
    model = tiny_bert()
    site = "encoder.layer.1.attention.self.value"
    weight = model.get_submodule(site).weight.detach().double().clone()  # 32 x 32
    peftlab.attach(model, peftlab.DSEE(targets=[site]))  # the defaults: 64 entries, ratio 0.65, 4 rounds, 0.01
    (adapter,) = peftlab.adapters(model, "default").values()
    top = lambda score: torch.topk(score.abs().flatten(), 64).indices.sort().values
    rank = round(0.65 * 32)  # 21
    expected = top(godec_sparse_part(weight, rank, 4, 0.01))
    assert torch.equal(adapter.support, expected)
    # every round and the threshold matter here: one round, no threshold or the plain
    # magnitude would each choose a different support
    assert not torch.equal(expected, top(godec_sparse_part(weight, rank, 1, 0.01)))
    assert not torch.equal(expected, top(godec_sparse_part(weight, rank, 4, 0.0)))
    assert not torch.equal(expected, top(weight))


def test_random_support_is_seeded_per_site():
    make = lambda seed: peftlab.adapters(
        peftlab.attach(tiny_bert(), peftlab.DSEE(num_sparse=20, support="random", seed=seed, targets=QV)), "default")
    first, again, other = make(0), make(0), make(1)
    q, v = "encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.value"
    assert torch.equal(first[q].support, again[q].support)
    assert not torch.equal(first[q].support, other[q].support)
    assert not torch.equal(first[q].support, first[v].support)


def test_trainable_count_matches_the_formula():
    model = peftlab.attach(tiny_bert(), peftlab.DSEE(r=4, num_sparse=10, targets="all-linear"))
    # per layer: q, k, v, attn-out (32 x 32), intermediate (64 x 32), output (32 x 64)
    expected = 2 * (4 * (4 * 64 + 10) + 2 * (4 * 96 + 10))
    assert sum(p.numel() for p in peftlab.trainable_parameters(model).values()) == expected


def test_bad_input():
    with pytest.raises(peftlab.PeftlabError, match="support"):
        peftlab.DSEE(support="svd")
    model = tiny_bert()
    with pytest.raises(peftlab.PeftlabError, match="num_sparse=2000"):
        peftlab.attach(model, peftlab.DSEE(num_sparse=2000, targets=QV))  # 32 x 32 = 1024 entries
    assert "_peftlab" not in model.__dict__
