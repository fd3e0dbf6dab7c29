"""RandLoRA: contract rows, trainable count, full-rank reach, bases never saved, parity with `peft` on MiniLM-L6."""
import math

import pytest
import torch

import peftlab
from conftest import load_minilm, tiny_bert, tiny_gpt2, token_batch
from contract import Case, run_contract

QV = ["query", "value"]
ENCODER_LINEARS = r".*encoder.*\.(query|key|value|dense)$"  # every linear of the encoder (not the pooler)

# alpha = r (s = 1) keeps the contract's random perturbation of the scalings from blowing up
# the outputs (peft's default s = 20 would), so fp32 merge tolerances stay meaningful.
ROWS = [
    Case("randlora-linear", lambda: peftlab.config("randlora", r=4, alpha=4.0, targets=QV), tiny_bert, token_batch),
    Case("randlora-mixed-shapes", lambda: peftlab.RandLoRA(r=6, alpha=6.0, dropout=0.1, targets="all-linear",
                                                           basis_shape=[64, 64]), tiny_bert, token_batch),
    Case("randlora-sparse", lambda: peftlab.RandLoRA(r=4, alpha=4.0, bases="sparse", targets="all-linear"),
         tiny_bert, token_batch),
    Case("randlora-conv1d", lambda: peftlab.RandLoRA(r=4, alpha=4.0, targets=["c_attn", "c_fc"]), tiny_gpt2, token_batch),
]


@pytest.mark.parametrize("case", ROWS, ids=str)
def test_contract(case, tmp_path):
    run_contract(case, tmp_path)


def test_trainable_count_matches_the_formula():
    r = 6
    model = peftlab.attach(tiny_bert(), peftlab.RandLoRA(r=r, targets="all-linear", basis_shape=[64, 64]))
    adapters = peftlab.adapters(model, "default").values()
    expected = sum(math.ceil(min(a.in_features, a.out_features) / r) * (r + min(a.in_features, a.out_features))
                   for a in adapters)
    assert sum(p.numel() for p in peftlab.trainable_parameters(model).values()) == expected
    assert expected == 12 * math.ceil(32 / 6) * (6 + 32)  # every layer's smaller side is 32: n = 6 bases


def test_update_reaches_full_rank():
    # n * r >= min(in, out): random scalings give a full-rank update, unlike a rank-r LoRA.
    model = peftlab.attach(tiny_bert(), peftlab.RandLoRA(r=4, targets=["encoder.layer.0.intermediate.dense"]))
    (adapter,) = peftlab.adapters(model, "default").values()
    with torch.no_grad():
        adapter.lam.normal_()
        adapter.gamma.normal_()
    delta = adapter.delta_weight()
    assert delta.shape == (64, 32)
    assert torch.linalg.matrix_rank(delta.double()) == 32


def test_bases_are_frozen_shared_and_regenerate_from_the_seed():
    source = peftlab.attach(tiny_bert(), peftlab.RandLoRA(r=4, targets=QV, seed=3))
    target = peftlab.attach(tiny_bert(), peftlab.RandLoRA(r=4, targets=QV, seed=4))
    adapters = list(peftlab.adapters(source, "default").values())
    for a in adapters:
        assert set(a.state_dict()) == {"lam", "gamma", "seed", "basis_shape"}
        assert not a.A.requires_grad and not a.B.requires_grad
    assert len({a.B.untyped_storage().data_ptr() for a in adapters}) == 1
    site = "encoder.layer.0.attention.self.query"
    a, b = peftlab.adapters(source, "default")[site], peftlab.adapters(target, "default")[site]
    assert not torch.equal(a.A, b.A)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B)


def test_bad_input():
    with pytest.raises(peftlab.PeftlabError, match="bases"):
        peftlab.RandLoRA(bases="gaussian")
    model = tiny_bert()
    with pytest.raises(peftlab.PeftlabError, match="basis_shape"):
        peftlab.attach(model, peftlab.RandLoRA(r=4, targets="all-linear", basis_shape=[32, 32]))
    assert "_peftlab" not in model.__dict__


# ---- parity with peft on the real MiniLM-L6 ---------------------------------------------------


def _parity(ours_config, peft_config, batch, tolerance=1e-5):
    """Same seed -> same frozen bases and initial scalings; same trained scalings -> same outputs."""
    from peft import get_peft_model

    theirs = get_peft_model(load_minilm()[0], peft_config).eval()
    ours = peftlab.attach(load_minilm()[0], ours_config)
    sites = peftlab.adapters(ours, "default")
    assert len(sites) == sum(1 for n, _ in theirs.named_modules() if n.endswith(".randlora_lambda"))
    g = torch.Generator().manual_seed(0)
    for site, adapter in sites.items():
        layer = theirs.base_model.model.get_submodule(site)
        n = adapter.lam.shape[1]
        torch.testing.assert_close(adapter.A, layer.randlora_A["default"][:, :n, : adapter.min_dim].float(), atol=0, rtol=0)
        torch.testing.assert_close(adapter.B, layer.randlora_B["default"][: adapter.max_dim, :n].float(), atol=0, rtol=0)
        torch.testing.assert_close(adapter.lam, layer.randlora_lambda["default"], atol=0, rtol=0)
        torch.testing.assert_close(adapter.gamma, layer.randlora_gamma["default"], atol=0, rtol=0)
        with torch.no_grad():  # the same non-trivial trained values in both
            lam = 0.01 * torch.randn(adapter.lam.shape, generator=g)
            gamma = adapter.gamma * (1 + torch.rand(adapter.gamma.shape, generator=g))
            adapter.lam.copy_(lam), layer.randlora_lambda["default"].copy_(lam)
            adapter.gamma.copy_(gamma), layer.randlora_gamma["default"].copy_(gamma)
    with torch.no_grad():
        mine, peers = ours(**batch).last_hidden_state, theirs(**batch).last_hidden_state
        base = load_minilm()[0](**batch).last_hidden_state
    assert (mine - base).abs().max() > 1e-2  # the scalings really change the output
    torch.testing.assert_close(mine, peers, atol=tolerance, rtol=tolerance)


def test_parity_with_peft_query_value(minilm_batch):
    from peft import RandLoraConfig

    _parity(peftlab.RandLoRA(r=32, seed=5, targets=QV),
            RandLoraConfig(r=32, projection_prng_key=5, target_modules=QV), minilm_batch)


def test_parity_with_peft_mixed_shapes(minilm_batch):
    # 384x384, 1536x384 and 384x1536 layers: peft draws bases for (1536, 1536) and slices them;
    # out < in (output.dense) exercises the transposed product.
    from peft import RandLoraConfig

    _parity(peftlab.RandLoRA(r=64, alpha=128.0, seed=1, targets=f"re:{ENCODER_LINEARS}", basis_shape=[1536, 1536]),
            RandLoraConfig(r=64, randlora_alpha=128, projection_prng_key=1, target_modules=ENCODER_LINEARS),
            minilm_batch)


def test_parity_with_peft_sparse_bases(minilm_batch):
    from peft import RandLoraConfig

    _parity(peftlab.RandLoRA(r=32, seed=2, bases="sparse", targets=QV),
            RandLoraConfig(r=32, projection_prng_key=2, sparse=True, target_modules=QV), minilm_batch)
