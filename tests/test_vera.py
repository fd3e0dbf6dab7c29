"""VeRA: contract rows, trainable count, bases never saved and shared, parity with `peft` on MiniLM-L6."""
import pytest
import torch

import peftlab
from conftest import load_minilm, tiny_bert, tiny_gpt2, token_batch
from contract import Case, run_contract

QV = ["query", "value"]
ENCODER_LINEARS = r".*encoder.*\.(query|key|value|dense)$"  # every linear of the encoder (not the pooler)

ROWS = [
    Case("vera-linear", lambda: peftlab.config("vera", r=8, targets=QV), tiny_bert, token_batch),
    Case("vera-mixed-shapes", lambda: peftlab.VeRA(r=8, dropout=0.1, targets="all-linear", basis_shape=[64, 64]),
         tiny_bert, token_batch),
    Case("vera-conv1d", lambda: peftlab.VeRA(r=8, targets=["c_attn", "c_fc"]), tiny_gpt2, token_batch),
]


@pytest.mark.parametrize("case", ROWS, ids=str)
def test_contract(case, tmp_path):
    run_contract(case, tmp_path)


def test_trainable_count_is_r_plus_out_per_site():
    model = peftlab.attach(tiny_bert(), peftlab.VeRA(r=8, targets="all-linear", basis_shape=[64, 64]))
    expected = sum(8 + a.out_features for a in peftlab.adapters(model, "default").values())
    assert sum(p.numel() for p in peftlab.trainable_parameters(model).values()) == expected
    # tiny BERT, 2 layers: q, k, v, attn-out (out 32), intermediate (64), output (32)
    assert expected == 2 * (5 * (8 + 32) + (8 + 64))


def test_bases_are_frozen_shared_and_never_saved():
    model = peftlab.attach(tiny_bert(), peftlab.VeRA(r=8, targets=QV))
    adapters = list(peftlab.adapters(model, "default").values())
    for a in adapters:
        assert set(a.state_dict()) == {"lambda_d", "lambda_b", "seed", "basis_shape"}
        assert not a.A.requires_grad and not a.B.requires_grad
    # one pair in memory for every site of the same shape
    assert len({a.A.untyped_storage().data_ptr() for a in adapters}) == 1
    assert torch.equal(adapters[0].B, adapters[-1].B)


def test_bases_regenerate_from_the_saved_seed():
    source = peftlab.attach(tiny_bert(), peftlab.VeRA(r=8, targets=QV, seed=7))
    target = peftlab.attach(tiny_bert(), peftlab.VeRA(r=8, targets=QV, seed=0))
    a, b = peftlab.adapters(source, "default"), peftlab.adapters(target, "default")
    site = "encoder.layer.1.attention.self.value"
    assert not torch.equal(a[site].A, b[site].A)
    b[site].load_state_dict(a[site].state_dict())
    assert torch.equal(a[site].A, b[site].A) and torch.equal(a[site].B, b[site].B)


def test_basis_shape_smaller_than_a_layer_is_refused():
    model = tiny_bert()
    with pytest.raises(peftlab.PeftlabError, match="basis_shape"):
        peftlab.attach(model, peftlab.VeRA(r=8, targets="all-linear", basis_shape=[32, 32]))
    assert "_peftlab" not in model.__dict__
    with pytest.raises(peftlab.PeftlabError, match="r must be a positive integer"):
        peftlab.VeRA(r=0)


# ---- parity with peft on the real MiniLM-L6 ---------------------------------------------------


def _peft_site(peft_model, site):
    return peft_model.base_model.model.get_submodule(site)


def _parity(ours_config, peft_config, batch, tolerance=1e-5):
    """Same seed -> same frozen bases and initial vectors; same trained vectors -> same outputs."""
    from peft import get_peft_model

    theirs = get_peft_model(load_minilm()[0], peft_config).eval()
    ours = peftlab.attach(load_minilm()[0], ours_config)
    sites = peftlab.adapters(ours, "default")
    assert len(sites) == sum(1 for n, _ in theirs.named_modules() if n.endswith(".vera_lambda_d"))
    g = torch.Generator().manual_seed(0)
    for site, adapter in sites.items():
        layer = _peft_site(theirs, site)
        torch.testing.assert_close(adapter.A, layer.vera_A["default"][:, : adapter.in_features], atol=0, rtol=0)
        torch.testing.assert_close(adapter.B, layer.vera_B["default"][: adapter.out_features], atol=0, rtol=0)
        torch.testing.assert_close(adapter.lambda_d, layer.vera_lambda_d["default"], atol=0, rtol=0)
        torch.testing.assert_close(adapter.lambda_b, layer.vera_lambda_b["default"], atol=0, rtol=0)
        with torch.no_grad():  # the same non-trivial trained values in both
            d, b = torch.randn(adapter.r, generator=g), 0.1 * torch.randn(adapter.out_features, generator=g)
            adapter.lambda_d.copy_(d), layer.vera_lambda_d["default"].copy_(d)
            adapter.lambda_b.copy_(b), layer.vera_lambda_b["default"].copy_(b)
    with torch.no_grad():
        mine, peers = ours(**batch).last_hidden_state, theirs(**batch).last_hidden_state
        base = load_minilm()[0](**batch).last_hidden_state
    assert (mine - base).abs().max() > 1e-2  # the vectors really change the output
    torch.testing.assert_close(mine, peers, atol=tolerance, rtol=tolerance)


def test_parity_with_peft_query_value(minilm_batch):
    from peft import VeraConfig

    _parity(peftlab.VeRA(r=32, seed=5, targets=QV),
            VeraConfig(r=32, projection_prng_key=5, target_modules=QV), minilm_batch)


def test_parity_with_peft_mixed_shapes(minilm_batch):
    # 384x384, 1536x384 and 384x1536 layers: peft draws one pair for (1536, 1536) and slices it.
    from peft import VeraConfig

    _parity(peftlab.VeRA(r=16, seed=1, targets=f"re:{ENCODER_LINEARS}", basis_shape=[1536, 1536]),
            VeraConfig(r=16, projection_prng_key=1, target_modules=ENCODER_LINEARS), minilm_batch)
