"""Prompt tuning, P-tuning, prefix tuning, P-tuning v2: contract rows, parity with `peft` (same
weights -> same outputs, atol 1e-5 in fp32), the peft format both ways, bad input, merge refused."""
import pytest
import torch

import peftlab
from conftest import output_of, tiny_bert, tiny_llama, token_batch
from contract import Case, run_contract

P = 4
TOL = dict(atol=1e-5, rtol=1e-5)


def tiny_bert_classifier(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(cfg).eval()


def masked_batch():
    batch = token_batch(batch=2, length=7)
    return {**batch, "attention_mask": torch.ones_like(batch["input_ids"])}


ROWS = [
    Case("prompt-bert-cls", lambda: peftlab.config("prompt", num_virtual_tokens=P), tiny_bert_classifier, masked_batch),
    Case("p-tuning-bert-cls", lambda: peftlab.config("prompt", num_virtual_tokens=P, encoder="mlp",
                                                     encoder_hidden_size=8), tiny_bert_classifier, masked_batch),
    Case("prefix-llama", lambda: peftlab.config("prefix", num_virtual_tokens=P, encoder_hidden_size=8), tiny_llama,
         masked_batch),
    Case("p-tuning-v2-llama", lambda: peftlab.config("p_tuning_v2", num_virtual_tokens=P), tiny_llama, masked_batch),
]


@pytest.mark.parametrize("case", ROWS, ids=str)
def test_contract(case, tmp_path):
    run_contract(case, tmp_path)


# ---- parity with peft: copy peft's initial weights into ours, compare outputs ----------------


def _peft_pair(make_model, peft_config, ours):
    """(peft model, our model) holding the same virtual-token weights."""
    from peft import get_peft_model

    theirs = get_peft_model(make_model(), peft_config).eval()
    model = peftlab.attach(make_model(), ours)
    weights = {k.split("prompt_encoder.default.", 1)[1]: v for k, v in theirs.state_dict().items()
               if "prompt_encoder.default." in k}
    encoder = peftlab.adapters(model, "default")[""].encoder
    assert set(weights) == set(encoder.state_dict())
    encoder.load_state_dict(weights)
    return theirs, model


def _parity_cases():
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

    return {
        "prompt-llama": (tiny_llama, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P),
                         peftlab.PromptTuning(num_virtual_tokens=P)),
        "prompt-bert-cls": (tiny_bert_classifier, PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=P),
                            peftlab.PromptTuning(num_virtual_tokens=P)),
        "p-tuning-llama": (tiny_llama, PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=P,
                                                           encoder_hidden_size=8),
                           peftlab.PromptTuning(num_virtual_tokens=P, encoder="mlp", encoder_hidden_size=8)),
        "p-tuning-bert-cls": (tiny_bert_classifier, PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=P,
                                                                        encoder_hidden_size=8),
                              peftlab.PromptTuning(num_virtual_tokens=P, encoder="mlp", encoder_hidden_size=8)),
        "prefix-llama": (tiny_llama, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P,
                                                        prefix_projection=True, encoder_hidden_size=8),
                         peftlab.PrefixTuning(num_virtual_tokens=P, encoder_hidden_size=8)),
        "p-tuning-v2-llama": (tiny_llama, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P),
                              peftlab.PTuningV2(num_virtual_tokens=P)),
    }


@pytest.mark.parametrize("case", ["prompt-llama", "prompt-bert-cls", "p-tuning-llama", "p-tuning-bert-cls",
                                  "prefix-llama", "p-tuning-v2-llama"])
def test_parity_with_peft(case):
    make_model, peft_config, ours = _parity_cases()[case]
    theirs, model = _peft_pair(make_model, peft_config, ours)
    batch = masked_batch()
    batch["attention_mask"][0, :2] = 0  # a left-padded row: the mask must be extended, not replaced
    with torch.no_grad():
        expected, got = theirs(**batch).logits, model(**batch).logits
        base = make_model()(**batch).logits
    # peft returns the prompt's positions too (causal LM); peftlab cuts them to the caller's tokens
    expected = expected[:, -got.shape[1]:] if expected.dim() == 3 else expected
    torch.testing.assert_close(got, expected, **TOL)
    assert (got - base).abs().max() > 1e-3  # the virtual tokens do change the output


def test_prefix_parity_on_bert_through_peft_cache():
    """peft's BERT prefix forward does not run on this transformers (it looks for past_key_values in the
    signature): build peft's prefix cache with its own get_prompt and run the BertModel with it."""
    from peft import PrefixTuningConfig

    theirs, model = _peft_pair(tiny_bert, PrefixTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=P, prefix_projection=True,
                                                             encoder_hidden_size=8),
                               peftlab.PrefixTuning(num_virtual_tokens=P, encoder_hidden_size=8))
    batch = masked_batch()
    mask = torch.cat([torch.ones(2, P, dtype=torch.long), batch["attention_mask"]], dim=1)
    with torch.no_grad():
        cache = theirs.get_prompt(batch_size=2)
        expected = theirs.get_base_model()(input_ids=batch["input_ids"], attention_mask=mask, cache=cache)
        got = model(**batch)
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, **TOL)


# ---- the peft format, both ways ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["prompt", "prefix", "p_tuning_v2"])
def test_peft_files_both_ways(name, tmp_path):
    from peft import PeftModel

    make_model = tiny_llama
    batch = masked_batch()
    model = peftlab.attach(make_model(), peftlab.config(name, num_virtual_tokens=P))
    with torch.no_grad():
        ours = model(**batch).logits
    peftlab.save(model, tmp_path / "out", format="peft")
    theirs = PeftModel.from_pretrained(make_model(), tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(**batch).logits[:, -ours.shape[1]:], ours, **TOL)
    theirs.save_pretrained(tmp_path / "back")  # peft's own file, read by peftlab
    loaded = peftlab.load(make_model(), tmp_path / "back")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, ours, **TOL)


# ---- bad input and merge ----------------------------------------------------------------------


def test_prompt_longer_than_position_limit_refused_before_any_change():
    model = tiny_bert()  # max_position_embeddings=64
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for name in ("prompt", "prefix", "p_tuning_v2"):
        with pytest.raises(peftlab.PeftlabError, match=r"num_virtual_tokens=64 .*position limit.*< 64"):
            peftlab.attach(model, peftlab.config(name, num_virtual_tokens=64))
    assert "_peftlab" not in model.__dict__ and not hasattr(model, "adapters")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert set(model.state_dict()) == set(before)


class NoAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.head = torch.nn.Linear(4, 2)


@pytest.mark.parametrize("name", ["prefix", "p_tuning_v2", "prompt"])
def test_model_without_attention_layout_refused(name):
    model = NoAttention()
    with pytest.raises(peftlab.PeftlabError, match="recognised attention layout"):
        peftlab.attach(model, peftlab.config(name))
    assert "_peftlab" not in model.__dict__ and "adapters" not in model._modules


def test_prefix_on_a_base_model_without_a_cache_refused():
    from transformers import DistilBertConfig, DistilBertModel

    model = DistilBertModel(DistilBertConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2, hidden_dim=32))
    with pytest.raises(peftlab.PeftlabError, match="key/value cache"):
        peftlab.attach(model, peftlab.PrefixTuning(num_virtual_tokens=2))
    assert "_peftlab" not in model.__dict__


@pytest.mark.parametrize("bad, match", [(dict(num_virtual_tokens=0), "num_virtual_tokens must be a positive"),
                                        (dict(init="text"), "init must be one of"),
                                        (dict(encoder="lstm"), "encoder must be one of")])
def test_bad_fields(bad, match):
    with pytest.raises(peftlab.PeftlabError, match=match):
        peftlab.PromptTuning(**bad)


@pytest.mark.parametrize("name", ["prompt", "prefix", "p_tuning_v2"])
def test_merge_refused_naming_the_method(name):
    model = peftlab.attach(tiny_llama(), peftlab.config(name, num_virtual_tokens=P))
    with pytest.raises(peftlab.PeftlabError, match=rf"{name}.*no weight form"):
        peftlab.merge(model)
    with pytest.raises(peftlab.PeftlabError, match="no weight form"):
        peftlab.detach(model, keep_merged=True)


def test_second_virtual_token_adapter_refused():
    model = peftlab.attach(tiny_llama(), peftlab.PromptTuning(num_virtual_tokens=P))
    with pytest.raises(peftlab.PeftlabError, match="already puts virtual tokens"):
        peftlab.attach(model, peftlab.PrefixTuning(num_virtual_tokens=P), name="second")


def test_vocab_init_copies_word_embeddings_and_only_the_prompt_trains():
    model = tiny_llama()
    peftlab.attach(model, peftlab.PromptTuning(num_virtual_tokens=P))
    prompt = peftlab.adapters(model, "default")[""].encoder.embedding.weight
    words = model.get_input_embeddings().weight
    assert all(any(torch.equal(row, w) for w in words) for row in prompt)
    assert list(peftlab.trainable_parameters(model)) == ["adapters.default.encoder.embedding.weight"]


# ---- MAM: a prefix and a parallel FFN adapter -------------------------------------------------

MAM_ROWS = [
    Case("mam-llama", lambda: peftlab.MAM(num_virtual_tokens=P, encoder_hidden_size=8, size=8), tiny_llama,
         masked_batch, peft_refusal="peft has no format"),
    Case("mam-bert", lambda: peftlab.MAM(num_virtual_tokens=P, size=8), tiny_bert, masked_batch,
         peft_refusal="peft has no format"),
]


@pytest.mark.parametrize("case", MAM_ROWS, ids=str)
def test_mam_contract(case, tmp_path):
    run_contract(case, tmp_path)


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_bert], ids=["llama", "bert"])
def test_mam_equals_its_two_parts(make_model):
    """MAM == prefix + parallel_adapter attached side by side with the same weights."""
    batch = masked_batch()
    mam = peftlab.attach(make_model(), peftlab.MAM(num_virtual_tokens=P, encoder_hidden_size=8, size=8))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # Up starts at 0: move every weight so both parts matter
        for p in peftlab.trainable_parameters(mam).values():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    whole = peftlab.adapters(mam, "default")[""]
    parts = make_model()
    peftlab.attach(parts, peftlab.PrefixTuning(num_virtual_tokens=P, encoder_hidden_size=8), name="prefix")
    peftlab.attach(parts, peftlab.ParallelAdapter(size=8, scale=4.0), name="ffn")
    peftlab.adapters(parts, "prefix")[""].load_state_dict(whole.prefix.state_dict())
    peftlab.adapters(parts, "ffn")[""].load_state_dict(whole.ffn.state_dict())
    with torch.no_grad():
        got, expected = output_of(mam, batch), output_of(parts, batch)
        peftlab.set_active(parts, "prefix")
        prefix_only = output_of(parts, batch)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert (got - prefix_only).abs().max() > 1e-3  # the FFN part is at work too
