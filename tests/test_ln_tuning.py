"""LN tuning: contract rows, parity and files both ways with `peft`, bad input."""
import pytest
import torch

import peftlab
from conftest import load_minilm, output_of, tiny_bert, tiny_gpt2, tiny_llama, token_batch
from contract import Case, run_contract

ROWS = [
    Case("ln-tuning-bert", lambda: peftlab.LNTuning(), tiny_bert, token_batch),
    Case("ln-tuning-llama-rmsnorm", lambda: peftlab.LNTuning(), tiny_llama, token_batch),
    Case("ln-tuning-gpt2-targets", lambda: peftlab.LNTuning(targets=["ln_1", "ln_f"]), tiny_gpt2, token_batch),
]


@pytest.mark.parametrize("case", ROWS, ids=str)
def test_contract(case, tmp_path):
    run_contract(case, tmp_path)


def test_targets_that_are_not_norm_layers_are_refused():
    model = tiny_bert()
    with pytest.raises(peftlab.PeftlabError, match="trains normalisation layers.*query \\(Linear\\)"):
        peftlab.attach(model, peftlab.LNTuning(targets=["LayerNorm", "query"]))
    assert "_peftlab" not in model.__dict__


def test_only_norm_parameters_train():
    model = peftlab.attach(tiny_llama(), peftlab.LNTuning())
    names = set(peftlab.trainable_parameters(model))
    assert names and all(n.endswith("layernorm.weight") or n == "model.norm.weight" for n in names)
    assert len(names) == 2 * 2 + 1  # input and post-attention norms per layer, and the final norm


# ---- peft on the real MiniLM-L6: parity, and files both ways (tolerance 1e-5, fp32) -----------------


def _peft_ln_tuning():
    from peft import LNTuningConfig, get_peft_model

    return get_peft_model(load_minilm()[0], LNTuningConfig(target_modules=["LayerNorm"])).eval()


def _same_values(ours, theirs, seed=0):
    """Give our in-place norm parameters and peft's trained copies the same random values."""
    g = torch.Generator().manual_seed(seed)
    peers = {n.replace("base_model.model.", "").replace(".ln_tuning_layers.default", ""): p
             for n, p in theirs.named_parameters() if ".ln_tuning_layers.default." in n}
    ours_params = peftlab.trainable_parameters(ours)
    assert set(ours_params) == set(peers) and len(peers) == 2 * (1 + 6 * 2)
    with torch.no_grad():
        for name, p in ours_params.items():
            torch.testing.assert_close(p, peers[name], atol=0, rtol=0)  # same initial values
            values = p + 0.1 * torch.randn(p.shape, generator=g)
            p.copy_(values)
            peers[name].copy_(values)


def test_parity_with_peft(minilm_batch):
    theirs, ours = _peft_ln_tuning(), peftlab.attach(load_minilm()[0], peftlab.LNTuning(targets=["LayerNorm"]))
    _same_values(ours, theirs)
    with torch.no_grad():
        mine, peers = ours(**minilm_batch).last_hidden_state, theirs(**minilm_batch).last_hidden_state
        base = load_minilm()[0](**minilm_batch).last_hidden_state
    assert (mine - base).abs().max() > 1e-2
    torch.testing.assert_close(mine, peers, atol=1e-5, rtol=1e-5)


def test_peft_files_both_ways(minilm_batch, tmp_path):
    from peft import PeftModel

    theirs = _peft_ln_tuning()
    _same_values(peftlab.attach(load_minilm()[0], peftlab.LNTuning()), theirs, seed=1)
    with torch.no_grad():
        expected = theirs(**minilm_batch).last_hidden_state
    theirs.save_pretrained(tmp_path / "from_peft")
    ours = peftlab.load(load_minilm()[0], tmp_path / "from_peft")  # peft -> peftlab
    assert peftlab.adapter_configs(ours)["default"].method == "ln_tuning"
    with torch.no_grad():
        torch.testing.assert_close(ours(**minilm_batch).last_hidden_state, expected, atol=1e-5, rtol=1e-5)
    peftlab.save(ours, tmp_path / "to_peft", format="peft")  # peftlab -> peft
    back = PeftModel.from_pretrained(load_minilm()[0], tmp_path / "to_peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(**minilm_batch).last_hidden_state, expected, atol=1e-5, rtol=1e-5)
    peftlab.detach(ours)
    base = load_minilm()[0]
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in base.state_dict().items())
