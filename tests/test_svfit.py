"""SVFit: contract rows; sigma starts at the top singular values; by default the rank per site
holds 99% of the singular-value energy (the paper), computed here from the weight's own
spectrum; a fixed r is the option."""
import pytest
import torch
from torch import nn

import peftlab
from conftest import tiny_bert, tiny_gpt2, token_batch
from contract import Case, run_contract
from peftlab.methods.svfit import energy_rank

QV = ["query", "value"]

ROWS = [
    Case("svfit-linear", lambda: peftlab.config("svfit", r=4, targets=QV), tiny_bert, token_batch),
    Case("svfit-energy-all-linear", lambda: peftlab.SVFit(energy=0.9, targets="all-linear"), tiny_bert, token_batch),
    Case("svfit-default", lambda: peftlab.SVFit(targets=QV), tiny_bert, token_batch),
    Case("svfit-conv1d", lambda: peftlab.SVFit(r=6, targets=["c_attn"]), tiny_gpt2, token_batch),
]


@pytest.mark.parametrize("case", ROWS, ids=str)
def test_contract(case, tmp_path):
    run_contract(case, tmp_path)


def test_initial_sigma_is_the_top_singular_values_and_the_host_keeps_the_tail():
    model = tiny_bert()
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith(("query", "value"))}
    peftlab.attach(model, peftlab.SVFit(r=6, targets=QV))
    for site, adapter in peftlab.adapters(model, "default").items():
        S = torch.linalg.svdvals(originals[site])
        torch.testing.assert_close(adapter.sigma.detach(), S[:6], atol=1e-5, rtol=1e-5)
        W_res = model.get_submodule(site).weight.detach()
        torch.testing.assert_close(W_res + adapter.delta_weight().detach(), originals[site], atol=1e-5, rtol=1e-5)
        # what stays in the host is the rest of the spectrum
        torch.testing.assert_close(torch.linalg.svdvals(W_res)[:26], S[6:], atol=1e-5, rtol=1e-4)
        # frozen singular vectors are orthonormal
        torch.testing.assert_close(adapter.U.T @ adapter.U, torch.eye(6), atol=1e-5, rtol=0)
        torch.testing.assert_close(adapter.Vh @ adapter.Vh.T, torch.eye(6), atol=1e-5, rtol=0)


def test_default_rank_holds_99_percent_of_each_weights_energy():
    model = tiny_bert()
    spectra = {n: torch.linalg.svdvals(m.weight.detach().double()) for n, m in model.named_modules()
               if n.endswith(("query", "value"))}
    peftlab.attach(model, peftlab.SVFit(targets=QV))
    for site, adapter in peftlab.adapters(model, "default").items():
        squares = spectra[site] ** 2
        # the fewest leading singular values with more than 99% of sum(S^2), counted one by one
        k = next(k for k in range(1, len(squares) + 1) if squares[:k].sum() >= 0.99 * squares.sum())
        assert adapter.sigma.shape == (k,), site
        assert squares[:k - 1].sum() < 0.99 * squares.sum() and k > 24  # near full rank (32)
        torch.testing.assert_close(adapter.sigma.detach().double(), spectra[site][:k], atol=1e-5, rtol=1e-5)
    fixed = peftlab.attach(tiny_bert(), peftlab.SVFit(r=8, targets=QV))
    assert all(a.sigma.shape == (8,) for a in peftlab.adapters(fixed, "default").values())


def test_energy_rank_counts_squared_singular_values():
    S = torch.tensor([4.0, 3.0, 2.0, 1.0])  # squares 16, 9, 4, 1: cumulative shares .533 .833 .967 1
    assert [energy_rank(S, e) for e in (0.5, 0.533, 0.54, 0.8, 0.9, 0.97, 0.99, 1.0)] == [1, 1, 2, 2, 3, 4, 4, 4]


class Square(nn.Module):
    """One Linear whose weight has the singular values we choose."""

    def __init__(self, singular_values):
        super().__init__()
        n = len(singular_values)
        g = torch.Generator().manual_seed(0)
        U, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
        V, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
        self.proj = nn.Linear(n, n)
        with torch.no_grad():
            self.proj.bias.zero_()
            self.proj.weight.copy_(U @ torch.diag(torch.tensor(singular_values)) @ V.T)

    def forward(self, x):
        return self.proj(x)


def test_energy_threshold_picks_the_rank_per_site(tmp_path):
    spectrum = [10.0, 5.0, 1.0, 0.5, 0.1, 0.1, 0.1, 0.1]  # squares: 100, 25, 1, ... of ~126.3
    for energy, rank in [(0.5, 1), (0.98, 2), (0.995, 3), (0.999, 4)]:
        model = peftlab.attach(Square(spectrum), peftlab.SVFit(energy=energy, targets=["proj"]))
        adapter = peftlab.adapters(model, "default")["proj"]
        assert adapter.sigma.shape == (rank,)
        torch.testing.assert_close(adapter.sigma.detach(), torch.tensor(spectrum[:rank]), atol=1e-5, rtol=1e-5)
    # a saved energy-chosen adapter loads with the same rank
    x = torch.randn(3, 8)
    with torch.no_grad():
        adapter.sigma.add_(0.3)
        expected = model(x)
    peftlab.save(model, tmp_path / "svfit")
    fresh = peftlab.load(Square(spectrum), tmp_path / "svfit")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), expected, atol=1e-5, rtol=1e-5)


def test_only_sigma_trains():
    model = peftlab.attach(tiny_bert(), peftlab.SVFit(r=3, targets=QV))
    trainable = peftlab.trainable_parameters(model)
    assert all(name.endswith(".sigma") for name in trainable)
    assert sum(p.numel() for p in trainable.values()) == 4 * 3


def test_bad_input():
    with pytest.raises(peftlab.PeftlabError, match="energy must be in"):
        peftlab.SVFit(energy=1.5)
    with pytest.raises(peftlab.PeftlabError, match="not both"):
        peftlab.SVFit(r=8, energy=0.9)
    model = tiny_bert()
    with pytest.raises(peftlab.PeftlabError, match="r <= 32"):
        peftlab.attach(model, peftlab.SVFit(r=40, targets=QV))
    assert "_peftlab" not in model.__dict__
