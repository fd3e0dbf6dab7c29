"""NOLA (no peft counterpart): contract rows and properties from the paper and the official code.

- the trainable count is 2k per site whatever the rank and layer size;
- A0 and the bases are regenerated from the per-site seed buffer, identically, and never saved;
- training moves only the coefficients, and the forward pass computes the paper's
  W0 x + s (sum b_j B_j)(A0 + sum a_i A_i) x with every frozen tensor drawn in the test itself;
- bases are U(-1, 1)/sqrt(k), A0 kaiming-uniform;
- regenerating the bases in every forward/backward (the official memory-saving mode) gives
  the same outputs and gradients as keeping them.
"""
import math
import zlib

import pytest
import torch

import peftlab
from conftest import image_batch, output_of, tiny_bert, tiny_cnn, tiny_gpt2, token_batch
from contract import Case, run_contract
from short_training import train

QV = ["query", "value"]

ROWS = [
    Case("nola-linear", lambda: peftlab.config("nola", r=4, num_basis=32, targets=QV), tiny_bert, token_batch),
    Case("nola-all-linear-regenerated", lambda: peftlab.NOLA(r=4, num_basis=16, dropout=0.1, bases_in_memory=False,
                                                             targets="all-linear"), tiny_bert, token_batch),
    Case("nola-conv1d", lambda: peftlab.NOLA(r=4, num_basis=16, targets=["c_attn"]), tiny_gpt2, token_batch),
    Case("nola-conv2d", lambda: peftlab.NOLA(r=2, num_basis=16, targets=["conv1", "conv2"]), tiny_cnn, image_batch),
]


@pytest.mark.parametrize("case", ROWS, ids=str)
def test_contract(case, tmp_path):
    run_contract(case, tmp_path)


def _trainable(model):
    return sum(p.numel() for p in peftlab.trainable_parameters(model).values())


def test_trainable_count_does_not_depend_on_rank():
    counts = {r: _trainable(peftlab.attach(tiny_bert(), peftlab.NOLA(r=r, num_basis=24, targets="all-linear")))
              for r in (1, 4, 16)}
    assert set(counts.values()) == {12 * 2 * 24}  # 12 linear layers, a and b of 24 each
    lora = _trainable(peftlab.attach(tiny_bert(), peftlab.LoRA(r=16, targets="all-linear")))
    assert lora > 10 * counts[16]


def test_only_coefficients_and_seed_are_saved():
    model = peftlab.attach(tiny_bert(), peftlab.NOLA(r=4, num_basis=8, targets=QV))
    for adapter in peftlab.adapters(model, "default").values():
        assert set(adapter.state_dict()) == {"coef_a", "coef_b", "seed"}


def paper_update(site, seed, r, k, in_features, out_features, alpha, coef_a, coef_b):
    """s * B @ A with A = A0 + sum_i a_i A_i, B = sum_j b_j B_j, every frozen tensor drawn here
    from the documented seeds: site seed = crc32("<seed>/<site>"), stream seed =
    crc32("<site seed>/<A0|A|B>"); A0 ~ U(-1/sqrt(in), 1/sqrt(in)), A_i, B_j ~ U(-1, 1)/sqrt(k)."""
    site_seed = zlib.crc32(f"{seed}/{site}".encode())
    stream = lambda name: torch.Generator().manual_seed(zlib.crc32(f"{site_seed}/{name}".encode()))
    bound = 1 / math.sqrt(in_features)
    A0 = torch.empty(r, in_features).uniform_(-bound, bound, generator=stream("A0"))
    A_bases = (torch.rand((k, r, in_features), generator=stream("A")) * 2 - 1) / math.sqrt(k)
    B_bases = (torch.rand((k, out_features, r), generator=stream("B")) * 2 - 1) / math.sqrt(k)
    A = A0 + sum(coef_a[i] * A_bases[i] for i in range(k))
    B = sum(coef_b[j] * B_bases[j] for j in range(k))
    return alpha / r * B @ A


def test_training_moves_only_the_coefficients_along_the_papers_equation():
    r, k, alpha, seed = 4, 8, 12.0, 5
    model = peftlab.attach(tiny_bert(), peftlab.NOLA(r=r, num_basis=k, alpha=alpha, seed=seed, targets=QV))
    sites = peftlab.adapters(model, "default")
    frozen = {site: (a.A0.clone(), a.bases_a.clone(), a.bases_b.clone()) for site, a in sites.items()}
    train(model, 5, lr=1e-2, weight_decay=0.1)
    assert set(peftlab.trainable_parameters(model)) == {f"{s}.adapters.default.{c}" for s in sites
                                                        for c in ("coef_a", "coef_b")}
    for site, a in sites.items():
        assert a.coef_a.abs().min() > 0 and a.coef_b.abs().min() > 0  # both mixtures trained
        for before, after in zip(frozen[site], (a.A0, a.bases_a, a.bases_b)):
            assert torch.equal(before, after)  # A0 and the bases never move
        host = model.get_submodule(site)
        expected = paper_update(site, seed, r, k, host.in_features, host.out_features, alpha,
                                a.coef_a.detach(), a.coef_b.detach())
        # the forward pass (not delta_weight) computes W0 x + s B A x
        x = torch.randn(3, host.in_features, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            changed = host(x)
            with peftlab.disabled(model):
                base = host(x)
        torch.testing.assert_close(changed - base, x @ expected.T, atol=1e-6, rtol=1e-4)


def test_bases_regenerate_identically_from_the_seed():
    first = peftlab.adapters(peftlab.attach(tiny_bert(), peftlab.NOLA(r=4, num_basis=8, targets=QV, seed=1)), "default")
    again = peftlab.adapters(peftlab.attach(tiny_bert(), peftlab.NOLA(r=4, num_basis=8, targets=QV, seed=1)), "default")
    other = peftlab.adapters(peftlab.attach(tiny_bert(), peftlab.NOLA(r=4, num_basis=8, targets=QV, seed=2)), "default")
    site = "encoder.layer.1.attention.self.query"
    for name in ("A0", "bases_a", "bases_b"):
        assert torch.equal(getattr(first[site], name), getattr(again[site], name))
        assert not torch.equal(getattr(first[site], name), getattr(other[site], name))
    # each site has its own seed, hence its own bases
    assert not torch.equal(first[site].bases_b, first["encoder.layer.0.attention.self.query"].bases_b)
    # loading the saved seed into an adapter made from another seed rebuilds the first one's bases
    other[site].load_state_dict(first[site].state_dict())
    for name in ("A0", "bases_a", "bases_b"):
        assert torch.equal(getattr(other[site], name), getattr(first[site], name))


def test_distributions_of_the_frozen_tensors():
    k, r = 64, 8
    model = peftlab.attach(tiny_bert(), peftlab.NOLA(r=r, num_basis=k, targets=["encoder.layer.0.intermediate.dense"]))
    (adapter,) = peftlab.adapters(model, "default").values()
    assert adapter.bases_a.shape == (k, r, 32) and adapter.bases_b.shape == (k, 64, r)
    for bases in (adapter.bases_a, adapter.bases_b):
        assert bases.abs().max() <= 1 / math.sqrt(k)
        torch.testing.assert_close(bases.std().item(), 1 / math.sqrt(3 * k), rtol=0.05, atol=0)  # U(-1,1) std 1/sqrt(3)
    assert adapter.A0.abs().max() <= 1 / math.sqrt(32)
    A, B = adapter.factors()
    assert torch.equal(A, adapter.A0) and not B.any()  # coefficients start at 0: B = 0


def test_regenerated_bases_give_the_same_outputs_and_gradients():
    results = []
    for in_memory in (True, False):
        model = peftlab.attach(tiny_bert(), peftlab.NOLA(r=4, num_basis=16, targets=QV, bases_in_memory=in_memory))
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in peftlab.trainable_parameters(model).values():
                p.copy_(torch.randn(p.shape, generator=g))
        out = output_of(model, token_batch())
        out.pow(2).mean().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in peftlab.trainable_parameters(model).items()}))
    (out_kept, grads_kept), (out_regen, grads_regen) = results
    torch.testing.assert_close(out_regen, out_kept, atol=1e-6, rtol=1e-5)
    assert grads_kept.keys() == grads_regen.keys()
    for name in grads_kept:
        torch.testing.assert_close(grads_regen[name], grads_kept[name], atol=1e-6, rtol=1e-4)
        assert grads_kept[name].abs().sum() > 0


def test_bad_input():
    with pytest.raises(peftlab.PeftlabError, match="num_basis"):
        peftlab.NOLA(num_basis=0)
    model = tiny_cnn()
    with pytest.raises(peftlab.PeftlabError, match="r=9"):
        peftlab.attach(model, peftlab.NOLA(r=9, targets=["conv1"]))  # conv1: 8 out x 27 in
    assert "_peftlab" not in model.__dict__
