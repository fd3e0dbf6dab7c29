"""LoLDU: contract rows; the LDU factors reconstruct W0; W_res + s P L_r diag(z0) U_r = W0; a trained
diagonal changes the output by s P L_r diag(z - D_r) U_r x, with the factors from an elimination
written out in the test."""
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


def test_trained_diagonal_moves_the_output_along_w0s_own_ldu_factors():
    # the expected change is built from W0 alone, by a Doolittle elimination written out here
    # (partial pivoting, unit lower L): not from the adapter's buffers
    model = tiny_bert()
    site = "encoder.layer.0.attention.self.query"
    W0 = model.get_submodule(site).weight.detach().double().clone()
    peftlab.attach(model, peftlab.LoLDU(r=4, alpha=2.0, targets=[site]))  # s = 0.5
    (adapter,) = peftlab.adapters(model, "default").values()
    P, L, D, U = doolittle(W0)
    torch.testing.assert_close(P @ L @ torch.diag(D) @ U, W0)
    z = D[:4] * torch.tensor([1.5, 0.5, -1.0, 2.0], dtype=torch.float64)
    with torch.no_grad():
        adapter.z.copy_(z)
    expected = 0.5 * P @ L[:, :4] @ torch.diag(z - D[:4]) @ U[:4]  # s P L_r diag(z - D_r) U_r
    host = model.get_submodule(site)
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        adapted = host(x)
        with peftlab.disabled(model):
            base = host(x)
    torch.testing.assert_close((adapted - base).double(), x.double() @ expected.T, atol=1e-5, rtol=1e-4)


def doolittle(W):
    """P, L, D, U' with W = P L diag(D) U': Gaussian elimination with partial pivoting (largest
    |pivot| of the column), L unit lower (m, k), U' = U / D unit upper (k, n), k = min(m, n)."""
    m, n = W.shape
    k = min(m, n)
    A, order, L = W.clone(), list(range(m)), torch.zeros(m, k, dtype=W.dtype)
    for j in range(k):
        p = j + int(A[j:, j].abs().argmax())
        A[[j, p]], L[[j, p]] = A[[p, j]].clone(), L[[p, j]].clone()
        order[j], order[p] = order[p], order[j]
        L[j, j] = 1
        L[j + 1:, j] = A[j + 1:, j] / A[j, j]
        A[j + 1:] -= torch.outer(L[j + 1:, j], A[j])
    U = torch.triu(A[:k])
    D = torch.diagonal(U).clone()
    P = torch.zeros(m, m, dtype=W.dtype)
    P[order, range(m)] = 1  # row i of L U is row order[i] of W
    return P, L, D, U / D[:, None]


def test_rank_larger_than_the_layer_is_refused():
    model = tiny_bert()
    with pytest.raises(peftlab.PeftlabError, match="r <= 32"):
        peftlab.attach(model, peftlab.LoLDU(r=33, targets=QV))
    assert "_peftlab" not in model.__dict__
    with pytest.raises(peftlab.PeftlabError, match="positive integer"):
        peftlab.LoLDU(r=0)
