"""BitFit: contract rows, only biases train and come back on detach, bad input."""
import pytest
import torch

import peftlab
from conftest import load_minilm, output_of, tiny_bert, tiny_gpt2, tiny_llama, token_batch
from contract import Case, run_contract

ROWS = [
    Case("bitfit-bert", lambda: peftlab.BitFit(), tiny_bert, token_batch, peft_refusal="acts on the whole model"),
    Case("bitfit-gpt2-attention", lambda: peftlab.BitFit(targets=["c_attn"]), tiny_gpt2, token_batch,
         peft_refusal="acts on the whole model"),
]


@pytest.mark.parametrize("case", ROWS, ids=str)
def test_contract(case, tmp_path):
    run_contract(case, tmp_path)


def _biases(model):
    return {n for n, _ in model.named_parameters() if n.endswith(".bias")}


def test_only_biases_train_are_saved_and_come_back(tmp_path):
    model, batch = tiny_bert(), token_batch()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    peftlab.attach(model, peftlab.BitFit())
    assert set(peftlab.trainable_parameters(model)) == _biases(model)  # LayerNorm biases included
    with torch.no_grad():
        for p in peftlab.trainable_parameters(model).values():
            p.add_(0.1)
        trained = output_of(model, batch)
    peftlab.save(model, tmp_path)
    from safetensors.torch import load_file
    assert set(load_file(tmp_path / "adapter_model.safetensors")) == _biases(model)
    peftlab.merge(model)  # already in place: nothing to fold
    peftlab.unmerge(model)
    peftlab.detach(model, keep_merged=True)  # the trained biases stay, as a plain model
    torch.testing.assert_close(output_of(model, batch), trained, atol=0, rtol=0)
    fresh = tiny_bert()
    peftlab.load(fresh, tmp_path)
    peftlab.detach(fresh)  # the original values come back
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in original.items())


def test_a_model_without_biases_is_refused_before_any_change():
    model = tiny_llama()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(peftlab.PeftlabError, match="BitFit trains biases, but this model has none"):
        peftlab.attach(model, peftlab.BitFit())
    assert "_peftlab" not in model.__dict__
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
