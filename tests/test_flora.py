"""FLoRA (no peft counterpart): contract rows and properties of the Tucker-form update.

- the core and factor shapes follow the weight's own dimensions (2 modes for linear, 4 for conv);
- the update equals the Tucker reconstruction, computed here independently: through the
  mode-1 unfolding ΔW_(1) = s U_out G_(1) (U_in ⊗ U_h ⊗ U_w)^T for conv, and for linear layers
  as the sum over core entries of G[a, b] u_a v_b^T, with s != 1, through the forward pass;
- the trainable count matches the formula; the core starts at 0.
"""
import pytest
import torch

import peftlab
from conftest import image_batch, tiny_bert, tiny_cnn, tiny_gpt2, token_batch
from contract import Case, run_contract

QV = ["query", "value"]

ROWS = [
    Case("flora-linear", lambda: peftlab.config("flora", r=4, targets=QV), tiny_bert, token_batch),
    Case("flora-all-linear-dropout", lambda: peftlab.FLoRA(r=4, dropout=0.1, targets="all-linear"), tiny_bert, token_batch),
    Case("flora-conv1d", lambda: peftlab.FLoRA(r=4, targets=["c_attn", "c_proj"]), tiny_gpt2, token_batch),
    Case("flora-conv2d", lambda: peftlab.FLoRA(r=3, kernel_r=2, targets=["conv1", "conv2"]), tiny_cnn, image_batch),
]


@pytest.mark.parametrize("case", ROWS, ids=str)
def test_contract(case, tmp_path):
    run_contract(case, tmp_path)


def _randomise(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in peftlab.trainable_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=g))


def test_conv_core_and_factor_shapes_and_tucker_reconstruction():
    model = peftlab.attach(tiny_cnn(), peftlab.FLoRA(r=3, kernel_r=5, alpha=6.0, targets=["conv2"]))
    (adapter,) = peftlab.adapters(model, "default").values()
    # conv2: 8 -> 8 channels, 3x3 kernel; kernel_r=5 is capped at the kernel size 3
    assert adapter.core.shape == (3, 3, 3, 3)
    assert adapter.factor_out.shape == (8, 3) and adapter.factor_in.shape == (8, 3)
    assert [tuple(f.shape) for f in adapter.factor_kernel] == [(3, 3), (3, 3)]
    _randomise(model)
    U_h, U_w = adapter.factor_kernel
    kron = torch.kron(adapter.factor_in, torch.kron(U_h, U_w))  # rows (i, h, w), columns (b, c, d)
    unfolded = 2.0 * adapter.factor_out @ adapter.core.reshape(3, -1) @ kron.T  # s = alpha / r = 2
    torch.testing.assert_close(adapter.delta_weight(), unfolded, atol=1e-4, rtol=1e-5)
    assert adapter.delta_tensor().shape == model.conv2.weight.shape


def test_linear_forward_adds_the_scaled_two_mode_tucker_product():
    # alpha / r = 6 / 4: a scale other than 1, so a missing or wrong scale shows
    model = peftlab.attach(tiny_bert(), peftlab.FLoRA(r=4, alpha=6.0, targets=["encoder.layer.0.intermediate.dense"]))
    (adapter,) = peftlab.adapters(model, "default").values()
    assert adapter.core.shape == (4, 4) and adapter.factor_out.shape == (64, 4) and adapter.factor_in.shape == (32, 4)
    assert len(adapter.factor_kernel) == 0
    _randomise(model)
    G, U_out, U_in = (t.detach().double() for t in (adapter.core, adapter.factor_out, adapter.factor_in))
    # the paper's ΔW[o, i] = s * sum_{a, b} G[a, b] U_out[o, a] U_in[i, b], entry by entry
    expected = torch.zeros(64, 32, dtype=torch.float64)
    for a in range(4):
        for b in range(4):
            expected += G[a, b] * torch.outer(U_out[:, a], U_in[:, b])
    expected *= 6.0 / 4
    # through the forward pass (it never builds ΔW) and through delta_weight (merge)
    host = model.encoder.layer[0].intermediate.dense
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        adapted = host(x)
        with peftlab.disabled(model):
            base = host(x)
    torch.testing.assert_close((adapted - base).double(), x.double() @ expected.T, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(adapter.delta_weight().detach().double(), expected, atol=1e-5, rtol=1e-5)


def test_initialisation_follows_the_official_code():
    model = peftlab.attach(tiny_cnn(), peftlab.FLoRA(r=4, targets=["conv1", "head"]))
    conv, head = peftlab.adapters(model, "default")["conv1"], peftlab.adapters(model, "default")["head"]
    for adapter in (conv, head):
        assert not adapter.core.any()  # identity at init
    # linear: U_in^T (r, in) as an nn.Linear weight, bound 1/sqrt(in); U_out (out, r) bound 1/sqrt(r)
    assert 0 < head.factor_in.abs().max() <= 1 / 8 ** 0.5 and 0 < head.factor_out.abs().max() <= 1 / 4 ** 0.5
    # conv: kaiming-normal(a=sqrt(3)) over the rank: std 1/sqrt(2 r); U_out (8, 4) etc. are tiny, so pool them
    pooled = torch.cat([f.flatten() for f in (conv.factor_out, conv.factor_in, *conv.factor_kernel)])
    assert 0.15 < pooled.std().item() < 0.55  # 1/sqrt(8) = 0.35 for r = 4; kernel factors use r_k = 2 (0.5)


def test_trainable_count_matches_the_formula():
    r, kr = 3, 2
    model = peftlab.attach(tiny_cnn(), peftlab.FLoRA(r=r, kernel_r=kr, targets=["conv1", "conv2", "head"]))
    conv = lambda cin, out, k: r * r * kr * kr + r * (cin + out) + kr * (k + k)
    expected = conv(3, 8, 3) + conv(8, 8, 3) + (r * r + r * (8 + 4))  # r = 3 fits every dimension here
    assert sum(p.numel() for p in peftlab.trainable_parameters(model).values()) == expected


def test_ranks_are_capped_at_each_dimension():
    model = peftlab.attach(tiny_cnn(), peftlab.FLoRA(r=6, kernel_r=2, targets=["conv1"]))  # 3 -> 8 channels
    (adapter,) = peftlab.adapters(model, "default").values()
    assert adapter.core.shape == (6, 3, 2, 2)
    assert adapter.factor_out.shape == (8, 6) and adapter.factor_in.shape == (3, 3)


def test_bad_input():
    for field in ("r", "kernel_r"):
        with pytest.raises(peftlab.PeftlabError, match=field):
            peftlab.FLoRA(**{field: 0})
    with pytest.raises(peftlab.PeftlabError, match="dropout"):
        peftlab.FLoRA(dropout=1.0)
