"""SSF: contract rows, the merged layer equals gamma * (W x + b) + beta written out, bad input."""
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


ROWS = [
    Case("ssf-all-linear", lambda: peftlab.SSF(targets="all-linear"), biased_bert, token_batch,
         peft_refusal="not a low-rank product"),
    Case("ssf-identity-init", lambda: peftlab.SSF(init_std=0.0, targets=["query", "value"]), tiny_bert, token_batch,
         peft_refusal="not a low-rank product"),
    Case("ssf-conv1d", lambda: peftlab.SSF(targets=["c_attn", "c_fc"]), tiny_gpt2, token_batch,
         peft_refusal="not a low-rank product"),
]


@pytest.mark.parametrize("case", ROWS, ids=str)
def test_contract(case, tmp_path):
    run_contract(case, tmp_path)


def test_forward_and_merge_follow_the_equations():
    model, batch = biased_bert(), token_batch()
    torch.manual_seed(3)
    peftlab.attach(model, peftlab.SSF(targets=["value"]))
    site = "encoder.layer.0.attention.self.value"
    host, adapter = model.get_submodule(site), peftlab.adapters(model, "default")[site]
    gamma, beta = adapter.gamma.detach(), adapter.beta.detach()
    assert 0.005 < gamma.sub(1).std() < 0.04 and 0.005 < beta.std() < 0.04  # N(1, 0.02^2), N(0, 0.02^2)
    W, b, x = host.weight.clone(), host.bias.clone(), torch.randn(4, 32)
    with torch.no_grad():
        torch.testing.assert_close(host(x), gamma * (x @ W.T + b) + beta, atol=1e-6, rtol=1e-5)
        adapted = output_of(model, batch)
    peftlab.merge(model)
    torch.testing.assert_close(host.weight, gamma[:, None] * W, atol=0, rtol=0)  # W' = diag(gamma) W
    torch.testing.assert_close(host.bias, gamma * b + beta, atol=0, rtol=0)  # b' = gamma * b + beta
    with torch.no_grad():
        torch.testing.assert_close(output_of(model, batch), adapted, atol=1e-5, rtol=1e-5)  # merged == unmerged
    peftlab.unmerge(model)
    assert torch.equal(host.weight, W) and torch.equal(host.bias, b)
    peftlab.merge(model)
    peftlab.detach(model)  # detach undoes the merge too: weight and bias bit for bit
    assert torch.equal(host.weight, W) and torch.equal(host.bias, b)


def test_merge_refuses_a_layer_without_bias_and_changes_nothing():
    model = peftlab.attach(tiny_llama(), peftlab.SSF(targets=["v_proj"]))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(peftlab.PeftlabError, match="shifts the output of model.layers.0.self_attn.v_proj, which has "
                                                   "no bias"):
        peftlab.merge(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_bad_input_is_refused_before_any_change():
    model = tiny_bert()
    with pytest.raises(peftlab.PeftlabError, match="supports linear, conv1d layers.*word_embeddings"):
        peftlab.attach(model, peftlab.SSF(targets=["query", "word_embeddings"]))
    assert "_peftlab" not in model.__dict__
    with pytest.raises(peftlab.PeftlabError, match="init_std must be a number >= 0"):
        peftlab.SSF(init_std=-1.0)
