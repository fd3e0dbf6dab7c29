"""IA3: contract rows, merge == unmerged (incl. the bias), parity and files both ways with `peft`."""
import pytest
import torch

import peftlab
from conftest import load_minilm, output_of, tiny_bert, tiny_gpt2, tiny_llama, token_batch
from contract import Case, run_contract


def biased_bert():
    """tiny_bert with non-zero biases (BERT starts them at 0, which would hide a bias left unfolded)."""
    model = tiny_bert()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return model


BERT = dict(targets=["key", "value", "output.dense"], feedforward=["output.dense"])
ROWS = [
    Case("ia3-bert", lambda: peftlab.IA3(**BERT), biased_bert, token_batch),
    Case("ia3-conv1d", lambda: peftlab.IA3(targets=["c_attn", "mlp.c_proj"], feedforward=["mlp.c_proj"]),
         tiny_gpt2, token_batch),
    Case("ia3-llama-no-bias", lambda: peftlab.IA3(targets=["k_proj", "v_proj", "down_proj"], feedforward=["down_proj"]),
         tiny_llama, token_batch),
]


@pytest.mark.parametrize("case", ROWS, ids=str)
def test_contract(case, tmp_path):
    run_contract(case, tmp_path)


def _randomise(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in peftlab.adapters(model, "default").values():
            adapter.scale.copy_(1 + 0.3 * torch.randn(adapter.scale.shape, generator=g))


def test_forward_and_merge_follow_the_equations():
    model, batch = biased_bert(), token_batch()
    peftlab.attach(model, peftlab.IA3(**BERT))
    _randomise(model)
    key = model.get_submodule("encoder.layer.0.attention.self.key")
    ffn = model.get_submodule("encoder.layer.0.output.dense")
    l_key = peftlab.adapters(model, "default")["encoder.layer.0.attention.self.key"].scale.detach()
    l_ffn = peftlab.adapters(model, "default")["encoder.layer.0.output.dense"].scale.detach()
    W_key, b_key, W_ffn, b_ffn = key.weight.clone(), key.bias.clone(), ffn.weight.clone(), ffn.bias.clone()
    x_key, x_ffn = torch.randn(5, 32), torch.randn(5, 64)
    with torch.no_grad():  # h = l * (W x + b) for keys; h = W (l * x) + b for the FFN
        torch.testing.assert_close(key(x_key), l_key * (x_key @ W_key.T + b_key), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(ffn(x_ffn), (l_ffn * x_ffn) @ W_ffn.T + b_ffn, atol=1e-6, rtol=1e-5)
        adapted = output_of(model, batch)
    peftlab.merge(model)
    torch.testing.assert_close(key.weight, l_key[:, None] * W_key, atol=0, rtol=0)
    torch.testing.assert_close(key.bias, l_key * b_key, atol=0, rtol=0)  # the output scale folds into the bias
    torch.testing.assert_close(ffn.weight, W_ffn * l_ffn[None, :], atol=0, rtol=0)
    torch.testing.assert_close(ffn.bias, b_ffn, atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(output_of(model, batch), adapted, atol=1e-5, rtol=1e-5)  # merged == unmerged
    peftlab.unmerge(model)
    assert torch.equal(key.weight, W_key) and torch.equal(key.bias, b_key) and torch.equal(ffn.weight, W_ffn)


def test_targets_that_are_not_linear_are_refused_before_any_change():
    model = tiny_bert()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(peftlab.PeftlabError, match="supports linear, conv1d layers.*LayerNorm"):
        peftlab.attach(model, peftlab.IA3(targets=["value", "LayerNorm"]))
    assert "_peftlab" not in model.__dict__ and set(model.state_dict()) == set(state)


# ---- peft on the real MiniLM-L6: parity, and files both ways (tolerance 1e-5, fp32) -----------------

MINILM = dict(targets=["key", "value", "output.dense"], feedforward=["output.dense"])


def _peft_ia3():
    from peft import IA3Config, get_peft_model

    config = IA3Config(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"])
    return get_peft_model(load_minilm()[0], config).eval()


def test_parity_with_peft(minilm_batch):
    theirs, ours = _peft_ia3(), peftlab.attach(load_minilm()[0], peftlab.IA3(**MINILM))
    sites = peftlab.adapters(ours, "default")
    peft_vectors = {n[len("base_model.model."):-len(".ia3_l.default")]: p for n, p in theirs.named_parameters()
                    if n.endswith(".ia3_l.default")}
    assert set(sites) == set(peft_vectors) and len(sites) == 6 * 4
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for site, adapter in sites.items():  # same initial vectors, then the same trained values
            torch.testing.assert_close(adapter.scale, peft_vectors[site].flatten(), atol=0, rtol=0)
            values = 1 + 0.2 * torch.randn(adapter.scale.shape, generator=g)
            adapter.scale.copy_(values)
            peft_vectors[site].copy_(values.reshape(peft_vectors[site].shape))
        mine, peers = ours(**minilm_batch).last_hidden_state, theirs(**minilm_batch).last_hidden_state
        base = load_minilm()[0](**minilm_batch).last_hidden_state
    assert (mine - base).abs().max() > 1e-2
    torch.testing.assert_close(mine, peers, atol=1e-5, rtol=1e-5)


def test_peft_files_both_ways(minilm_batch, tmp_path):
    from peft import PeftModel

    theirs = _peft_ia3()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "ia3_l" in n:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
        expected = theirs(**minilm_batch).last_hidden_state
    theirs.save_pretrained(tmp_path / "from_peft")
    ours = peftlab.load(load_minilm()[0], tmp_path / "from_peft")  # peft -> peftlab
    assert peftlab.adapter_configs(ours)["default"].method == "ia3"
    with torch.no_grad():
        torch.testing.assert_close(ours(**minilm_batch).last_hidden_state, expected, atol=1e-5, rtol=1e-5)
    peftlab.save(ours, tmp_path / "to_peft", format="peft")  # peftlab -> peft
    back = PeftModel.from_pretrained(load_minilm()[0], tmp_path / "to_peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(**minilm_batch).last_hidden_state, expected, atol=1e-5, rtol=1e-5)
