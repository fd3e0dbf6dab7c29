"""LoLDU: contract rows; the LDU factors reconstruct W0; W_res + s P L_r diag(z0) U_r = W0."""
import pytest
import torch

import peftlab
from conftest import output_of, tiny_bert, tiny_gpt2, token_batch
from contract import Case, run_contract
from peftlab.methods.loldu import ldu

QV = ["query", "value"]

ROWS = [
    Case("loldu-linear", lambda: peftlab.config("loldu", r=4, targets=QV), tiny_bert, token_batch),
    Case("loldu-trained-scale-all-linear", lambda: peftlab.LoLDU(r=8, train_scale=True, targets="all-linear"),
         tiny_bert, token_batch),
    Case("loldu-conv1d", lambda: peftlab.LoLDU(r=4, alpha=2.0, targets=["c_attn", "c_fc"]), tiny_gpt2, token_batch),
]


@pytest.mark.parametrize("case", ROWS, ids=str)
def test_contract(case, tmp_path):
    run_contract(case, tmp_path)


@pytest.mark.parametrize("shape", [(12, 12), (16, 7), (7, 16)])
def test_ldu_factors_reconstruct_the_weight(shape):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
    P, L, D, U = ldu(weight)
    k = min(shape)
    torch.testing.assert_close(P @ L @ torch.diag(D) @ U, weight, atol=1e-5, rtol=1e-5)
    # L unit lower-triangular, U' unit upper-triangular, P a permutation
    torch.testing.assert_close(torch.diagonal(L), torch.ones(k))
    torch.testing.assert_close(torch.diagonal(U), torch.ones(k))
    assert torch.equal(torch.triu(L[:k], 1), torch.zeros(k, k))
    assert torch.equal(torch.tril(U[:, :k], -1), torch.zeros(k, k))
    assert torch.equal(P.sum(0), torch.ones(shape[0])) and torch.equal(P.sum(1), torch.ones(shape[0]))


def test_ldu_of_a_rank_deficient_weight_still_reconstructs():
    weight = torch.randn(6, 6, generator=torch.Generator().manual_seed(0))
    weight[:, 0] = 0  # the first pivot is exactly 0
    P, L, D, U = ldu(weight)
    assert torch.isfinite(U).all()
    torch.testing.assert_close(P @ L @ torch.diag(D) @ U, weight, atol=1e-5, rtol=1e-5)


def test_residual_plus_scaled_top_part_is_the_original_weight():
    model = tiny_bert()
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith(("query", "value"))}
    peftlab.attach(model, peftlab.LoLDU(r=5, alpha=2.0, targets=QV))
    for site, adapter in peftlab.adapters(model, "default").items():
        W0 = originals[site]
        P, L, U = torch.linalg.lu(W0)
        D = torch.diagonal(U)
        # the stored factors are the first r of the LDU factors
        torch.testing.assert_close(adapter.PL, P @ L[:, :5])
        torch.testing.assert_close(adapter.U, (U / D[:, None])[:5])
        torch.testing.assert_close(adapter.z0, D[:5])
        assert torch.equal(adapter.z.detach(), adapter.z0)
        s = 2.0 / 5
        W_res = model.get_submodule(site).weight.detach()
        torch.testing.assert_close(W_res + s * adapter.PL @ torch.diag(adapter.z0) @ adapter.U, W0,
                                   atol=1e-6, rtol=1e-6)
        assert not torch.allclose(W_res, W0, atol=1e-3)  # the top part really moved into the adapter


def test_only_the_diagonal_trains():
    model = peftlab.attach(tiny_bert(), peftlab.LoLDU(r=6, targets=QV))
    trainable = peftlab.trainable_parameters(model)
    assert all(name.endswith(".z") for name in trainable)
    assert sum(p.numel() for p in trainable.values()) == 4 * 6  # 2 layers x (query, value) x r
    scaled = peftlab.attach(tiny_bert(), peftlab.LoLDU(r=6, train_scale=True, targets=QV))
    assert sum(p.numel() for p in peftlab.trainable_parameters(scaled).values()) == 4 * 7


def test_changing_the_diagonal_changes_the_output_along_the_ldu_factors():
    model = peftlab.attach(tiny_bert(), peftlab.LoLDU(r=4, targets=QV))
    batch = token_batch()
    with torch.no_grad():
        before = output_of(model, batch)
        for adapter in peftlab.adapters(model, "default").values():
            adapter.z.mul_(1.5)
        after = output_of(model, batch)
        site, adapter = next(iter(peftlab.adapters(model, "default").items()))
        expected = 0.25 * adapter.PL @ torch.diag(0.5 * adapter.z0) @ adapter.U
        torch.testing.assert_close(adapter.delta_weight() - adapter.residual(), expected, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(before, after, atol=1e-4)


def test_rank_larger_than_the_layer_is_refused():
    model = tiny_bert()
    with pytest.raises(peftlab.PeftlabError, match="r <= 32"):
        peftlab.attach(model, peftlab.LoLDU(r=33, targets=QV))
    assert "_peftlab" not in model.__dict__
    with pytest.raises(peftlab.PeftlabError, match="positive integer"):
        peftlab.LoLDU(r=0)
