"""Intrinsic dimension (theta = theta_0 + P z): contract rows, the Fastfood projection against its
formula written out with dense matrices, P never stored, and the forward equal to W0 + P z."""
import math

import pytest
import torch

import peftlab
from conftest import output_of, tiny_bert, tiny_gpt2, token_batch
from contract import Case, run_contract
from peftlab.methods.intrinsic import Fastfood, Intrinsic

WHOLE_MODEL = "acts on the whole model"

ROWS = [
    Case("intrinsic-linear", lambda: peftlab.config("intrinsic", d=64, targets=["query", "value"]), tiny_bert,
         token_batch, peft_refusal=WHOLE_MODEL),
    Case("intrinsic-all-linear", lambda: Intrinsic(d=200, seed=3), tiny_bert, token_batch, peft_refusal=WHOLE_MODEL),
    Case("intrinsic-conv1d", lambda: Intrinsic(d=32, targets=["c_attn", "c_fc"]), tiny_gpt2, token_batch,
         peft_refusal=WHOLE_MODEL),
]


@pytest.mark.parametrize("case", ROWS, ids=str)
def test_contract(case, tmp_path):
    run_contract(case, tmp_path)


def _sylvester(length: int) -> torch.Tensor:
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < length:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


@pytest.mark.parametrize("d, size", [(10, 100), (64, 64), (300, 40)])
def test_fastfood_is_the_official_formula(d, size):
    """P = (H G Pi H B)[:size, :d] / (sqrt(L sum G^2) sqrt(size / L)), with the module's random B, Pi, G."""
    block = Fastfood(d, size, seed=7)
    length = 2 ** math.ceil(math.log2(max(d, size)))
    assert block.length == length
    B = torch.diag(block.sign.double())
    Pi = torch.eye(length, dtype=torch.float64)[block.permutation]  # (Pi x)_i = x[perm[i]]
    G = block.gauss.double()
    divisor = math.sqrt(length * float(G.pow(2).sum())) * math.sqrt(size / length)
    H = _sylvester(length)
    dense = (H @ torch.diag(G) @ Pi @ H @ B)[:size, :d] / divisor  # (size, d)
    z = torch.randn(d, dtype=torch.float64)
    torch.testing.assert_close(block(z), dense @ z, atol=1e-6, rtol=1e-6)
    # the normalisation: columns of unit norm on average
    assert abs(float(dense.norm(dim=0).pow(2).mean()) - 1) < 0.35


def test_projection_is_never_stored_and_only_z_is_saved(tmp_path):
    d = 4096
    model = peftlab.attach(tiny_bert(), Intrinsic(d=d))
    whole = peftlab.adapters(model, "default")[""]
    entries = sum(s.out_features * s.in_features for s in whole.sites)
    buffers = sum(b.numel() for b in whole.buffers())
    assert buffers < 3 * 4 * max(entries, d) * len(whole.sites)  # O(L) per layer
    assert buffers < d * entries / 100  # far from a dense (D x d) matrix
    assert list(peftlab.trainable_parameters(model)) == ["adapters.default.z"]
    peftlab.save(model, tmp_path / "a")
    from safetensors.torch import load_file

    assert set(load_file(tmp_path / "a" / "adapter_model.safetensors")) == {"adapters.default.z"}


def test_forward_equals_base_with_w0_plus_pz():
    """The hooked model computes exactly the base model with every targeted weight moved by P_l z."""
    batch = token_batch()
    model = peftlab.attach(tiny_bert(), Intrinsic(d=50, seed=1))
    whole = peftlab.adapters(model, "default")[""]
    with torch.no_grad():
        whole.z.copy_(torch.randn(50, generator=torch.Generator().manual_seed(0)))
        adapted = output_of(model, batch)
        reference = tiny_bert()
        changes = whole.delta_weights()
        for name, delta in changes.items():
            reference.get_submodule(name).weight.add_(delta)
        torch.testing.assert_close(output_of(reference, batch), adapted, atol=1e-5, rtol=1e-5)
    # every layer moves, by a change linear in z
    assert all(delta.abs().sum() > 0 for delta in changes.values())
    with torch.no_grad():
        twice = {n: d.clone() for n, d in changes.items()}
        whole.z.mul_(2)
        for name, delta in whole.delta_weights().items():
            torch.testing.assert_close(delta, 2 * twice[name])


def test_layers_get_different_projections_from_one_seed():
    model = peftlab.attach(tiny_bert(), Intrinsic(d=16, targets=["query"], seed=0))
    whole = peftlab.adapters(model, "default")[""]
    a, b = (block.permutation for block in whole.projections.values())
    assert not torch.equal(a, b)
    again = peftlab.adapters(peftlab.attach(tiny_bert(), Intrinsic(d=16, targets=["query"], seed=0)), "default")[""]
    assert all(torch.equal(x.gauss, y.gauss) for x, y in zip(whole.projections.values(), again.projections.values()))


def test_bad_fields_are_refused_before_anything_changes():
    with pytest.raises(peftlab.PeftlabError, match="Intrinsic d must be a positive integer"):
        Intrinsic(d=0)
    with pytest.raises(peftlab.PeftlabError, match="Intrinsic seed"):
        Intrinsic(seed=-1)
    model = tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(peftlab.PeftlabError, match="no layer with a weight|matched"):
        peftlab.attach(model, Intrinsic(d=4, targets=["nothing_here"]))
    assert set(model.state_dict()) == set(before) and "_peftlab" not in model.__dict__
