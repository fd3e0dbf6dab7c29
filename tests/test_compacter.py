"""Compacter and Compacter++: contract rows, the PHM product against an explicit sum of Kronecker
products, one A shared by every layer (trained, saved and loaded once), rank-one B_i,
compacter_pp == Compacter after the FFN only, bad input, and a forward/backward on MiniLM-L6 and a
tiny Llama."""
import pytest
import torch
import torch.nn.functional as F

import peftlab
from conftest import output_of, tiny_bert, tiny_gpt2, tiny_llama, token_batch
from contract import Case, run_contract
from peftlab.methods.bottleneck import AFTER_FFN

ROWS = [
    Case("compacter-bert", lambda: peftlab.Compacter(size=8), tiny_bert, token_batch),
    Case("compacter-gpt2-conv1d", lambda: peftlab.Compacter(size=4, n=2, activation="relu"), tiny_gpt2, token_batch),
    Case("compacter-llama-overrides", lambda: peftlab.Compacter(size=8, overrides={"o_proj": {"size": 4}}),
         tiny_llama, token_batch),
    Case("compacter_pp-bert", lambda: peftlab.CompacterPP(size=8), tiny_bert, token_batch),
    Case("compacter_pp-llama", lambda: peftlab.config("compacter_pp", size=4, n=4), tiny_llama, token_batch),
]


@pytest.mark.parametrize("case", ROWS, ids=str)
def test_contract(case, tmp_path):
    run_contract(case, tmp_path)


def _randomise(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peftlab.trainable_parameters(model).values():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))


def _explicit_weight(A, s, t):
    """H = sum_i kron(A_i, s_i t_i) by torch.kron, one term at a time (independent of the einsum)."""
    return sum(torch.kron(A[i], s[i] @ t[i]) for i in range(A.shape[0]))


# ---- the PHM product --------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 4])
def test_phm_layers_compute_the_explicit_kronecker_sum(n):
    model = peftlab.attach(tiny_bert(), peftlab.Compacter(size=8, n=n))
    _randomise(model)
    for site, adapter in peftlab.adapters(model, "default").items():
        A = adapter.rule
        for phm, shape in ((adapter.down, (8, 32)), (adapter.up, (32, 8))):
            H = _explicit_weight(A, phm.left, phm.right)
            assert H.shape == shape
            torch.testing.assert_close(phm.weight(A), H, atol=1e-6, rtol=1e-5)
            inputs = torch.randn(3, 5, shape[1])
            with torch.no_grad():
                torch.testing.assert_close(phm(inputs, A), inputs @ H.T + phm.bias, atol=1e-5, rtol=1e-5)
            for i in range(n):  # each B_i = s_i t_i^T has rank one
                assert torch.linalg.matrix_rank(phm.left[i] @ phm.right[i]) == 1
        # the whole site: h + Up(gelu_tanh(Down(h))) with the explicit weights
        host = model.get_submodule(site)
        x = torch.randn(3, 5, host.in_features)
        with torch.no_grad():
            h = F.linear(x, host.weight, host.bias)
            z = F.gelu(F.linear(h, _explicit_weight(A, adapter.down.left, adapter.down.right), adapter.down.bias),
                       approximate="tanh")
            expected = h + F.linear(z, _explicit_weight(A, adapter.up.left, adapter.up.right), adapter.up.bias)
            torch.testing.assert_close(host(x), expected, atol=1e-5, rtol=1e-5)


def test_one_A_is_shared_by_every_layer_trained_and_saved_once(tmp_path):
    model = peftlab.attach(tiny_llama(), peftlab.Compacter(size=8, n=4))
    adapters = list(peftlab.adapters(model, "default").values())
    assert len(adapters) == 4 and all(a.rule is adapters[0].rule for a in adapters)
    assert adapters[0].rule.shape == (4, 4, 4)
    rule_keys = [k for k in model.state_dict() if k.endswith(".rule")]
    assert rule_keys == ["model.layers.0.self_attn.o_proj.adapters.default.rule"]
    # trainable: per site 3 d + 3 size (d = 32, size = 8), and n^3 once
    assert sum(p.numel() for p in peftlab.trainable_parameters(model).values()) == 4 * (3 * 32 + 3 * 8) + 4 ** 3
    # A trains (set_active and the optimizer see it once, at the first site)
    _randomise(model)
    peftlab.set_active(model, "default")
    assert [n for n in peftlab.trainable_parameters(model) if n.endswith(".rule")] == rule_keys
    output_of(model, token_batch()).pow(2).mean().backward()
    assert adapters[0].rule.grad is not None and adapters[0].rule.grad.abs().sum() > 0
    # saved once, loaded as one tensor shared again
    peftlab.save(model, tmp_path / "a")
    fresh = peftlab.load(tiny_llama(), tmp_path / "a")
    loaded = list(peftlab.adapters(fresh, "default").values())
    assert all(a.rule is loaded[0].rule for a in loaded)
    torch.testing.assert_close(loaded[0].rule, adapters[0].rule, atol=0, rtol=0)


def test_each_attach_draws_its_own_A():
    config, first, second = peftlab.Compacter(size=8), tiny_bert(), tiny_bert()  # (tiny_bert seeds torch)
    peftlab.attach(first, config)
    peftlab.attach(second, config)
    a = next(iter(peftlab.adapters(first, "default").values())).rule
    b = next(iter(peftlab.adapters(second, "default").values())).rule
    assert a is not b and not torch.equal(a, b)
    assert a.std() < 1e-3  # A ~ N(0, 1e-4^2), the official init


def test_compacter_pp_is_compacter_after_the_ffn_only():
    pp = peftlab.attach(tiny_bert(), peftlab.CompacterPP(size=8))
    full = peftlab.attach(tiny_bert(), peftlab.Compacter(size=8))
    ffn_sites = ["encoder.layer.0.output.dense", "encoder.layer.1.output.dense"]
    assert list(peftlab.adapters(pp, "default")) == ffn_sites
    assert [s for s in peftlab.adapters(full, "default") if "attention" not in s] == ffn_sites
    # with the same random draws, compacter_pp and Compacter(targets=FFN) are the same adapter
    torch.manual_seed(5)
    pp = peftlab.attach(tiny_llama(), peftlab.CompacterPP(size=8))
    torch.manual_seed(5)
    full = peftlab.attach(tiny_llama(), peftlab.Compacter(size=8, targets=list(AFTER_FFN)))
    ours, theirs = pp.state_dict(), full.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    _randomise(pp), _randomise(full)
    with torch.no_grad():
        torch.testing.assert_close(output_of(pp, token_batch()), output_of(full, token_batch()), atol=0, rtol=0)


# ---- merge refused, bad input ----------------------------------------------------------------


def test_merge_is_refused_naming_the_method():
    model = peftlab.attach(tiny_bert(), peftlab.Compacter(size=8))
    with pytest.raises(peftlab.PeftlabError, match=r"\(compacter\) has no weight form"):
        peftlab.merge(model)


@pytest.mark.parametrize("make_config, match", [
    (lambda: peftlab.Compacter(size=0), "Compacter size must be a positive integer, got 0"),
    (lambda: peftlab.CompacterPP(size=0), "CompacterPP size must be a positive integer"),
    (lambda: peftlab.Compacter(size=6, n=4), "size=6 must be a multiple of n=4"),
    (lambda: peftlab.Compacter(n=1, size=4), "n must be at least 2"),
    (lambda: peftlab.Compacter(rule_init_std=0.0), "rule_init_std must be positive"),
], ids=["size-0", "pp-size-0", "size-not-multiple", "n-1", "std-0"])
def test_bad_fields_are_refused(make_config, match):
    with pytest.raises(peftlab.PeftlabError, match=match):
        make_config()


@pytest.mark.parametrize("config, match", [
    (peftlab.Compacter(size=6, n=3), r"n=3 does not divide the width 32 of encoder.layer.0.attention.output.dense"),
    (peftlab.Compacter(size=8, overrides={"output.dense": {"n": 2}}), "A is shared by every layer and has one n"),
    (peftlab.CompacterPP(size=8, targets=["LayerNorm"]), r"supports linear, conv1d layers, but targets also matched"),
], ids=["width", "n-override", "layernorm"])
def test_what_does_not_fit_the_model_is_refused_before_any_change(config, match):
    model = tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(peftlab.PeftlabError, match=match):
        peftlab.attach(model, config)
    assert "_peftlab" not in model.__dict__ and model.state_dict().keys() == before.keys()


# ---- the real MiniLM-L6 and a tiny Llama: forward and backward ------------------------------


def _forward_backward(model, batch):
    model.train()
    output_of(model, batch).float().pow(2).mean().backward()
    trained = peftlab.trainable_parameters(model)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trained)
    rights = [p for n, p in trained.items() if n.endswith(".up.right")]  # Up's t starts at 0 and moves first
    assert rights and all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in rights)


def test_minilm_forward_backward(minilm, minilm_batch):
    model = minilm[0]  # one load for every method: detach gives the base back exactly
    with torch.no_grad():
        base = output_of(model, minilm_batch)
    for method in ["compacter", "compacter_pp"]:
        peftlab.attach(model, peftlab.config(method, size=12))  # d = 384 = 4 * 96
        with torch.no_grad():  # Up starts at exactly 0: the output at attach is the base model's, bit for bit
            torch.testing.assert_close(output_of(model, minilm_batch), base, atol=0, rtol=0)
        _forward_backward(model, minilm_batch)
        peftlab.detach(model)
        model.eval().zero_grad(set_to_none=True)


@pytest.mark.parametrize("method", ["compacter", "compacter_pp"])
def test_tiny_llama_forward_backward(method):
    _forward_backward(peftlab.attach(tiny_llama(), peftlab.config(method, size=8)), token_batch())
