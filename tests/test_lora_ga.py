"""LoRA-GA: contract rows, the gradient-SVD initialisation, and parity with `peft`.

The calibration batches carry labels; the loss is the model output's `.loss`.
Parity: `peft` 0.21 draws a randomised `svd_lowrank` from the global random state in the middle of
building its layers, which no seed outside can line up; this implementation takes the exact SVD.
So (1) with `peft`'s `svd_lowrank` replaced by the exact SVD, initial A, B, W_res agree within
atol 1e-6 (measured: bitwise) and outputs within 1e-5; (2) with `peft` unchanged, every row of A and
column of B agrees up to sign, |cosine| >= 0.995 (measured >= 0.9994 on MiniLM-L6).
"""
import copy

import pytest
import torch

import peftlab
from conftest import output_of, tiny_gpt2, token_batch
from contract import Case, run_contract


def tiny_classifier(seed: int = 0):
    """A 2-layer random BERT with a classification head and no dropout (its loss needs labels)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, num_labels=3,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).eval()


def classification_batches(n=3):
    batches = [token_batch(seed=30 + i, batch=4, length=10) for i in range(n)]
    for i, b in enumerate(batches):
        b["labels"] = torch.tensor([0, 1, 2, i % 3])
    return batches


def lm_batches(n=2):
    batches = [token_batch(seed=40 + i, batch=2, length=12) for i in range(n)]
    for b in batches:
        b["labels"] = b["input_ids"].clone()
    return batches


ROWS = [
    Case("lora_ga-linear", lambda: peftlab.LoRAGA(r=2, targets=["query", "value", "intermediate.dense"]),
         tiny_classifier, token_batch, classification_batches),
    Case("lora_ga-conv1d-A2rBr", lambda: peftlab.config("lora_ga", r=3, direction="A2rBr", targets=["c_attn", "c_fc"]),
         tiny_gpt2, token_batch, lm_batches),
]


@pytest.mark.parametrize("case", ROWS, ids=str)
def test_contract(case, tmp_path):
    run_contract(case, tmp_path)


def test_init_spans_the_gradients_top_singular_directions():
    model = tiny_classifier()
    site = "bert.encoder.layer.0.attention.self.query"
    batches = classification_batches()
    # The reference gradient: plain autograd on a copy, averaged over batches.
    reference = copy.deepcopy(model).train()
    weight = reference.get_submodule(site).weight
    grad = sum(torch.autograd.grad(reference(**b).loss, weight)[0] for b in batches) / len(batches)
    U, S, Vh = torch.linalg.svd(grad.double())

    cfg = peftlab.LoRAGA(r=2, alpha=4, scale_mode="unit", targets=[site])
    peftlab.attach(model, cfg, calibration=batches)
    adapter = peftlab.adapters(model, "default")[site]
    # ArB2r: A = the top-r right vectors, B = the next r left vectors times their singular values.
    cos_a = torch.nn.functional.cosine_similarity(adapter.A.double(), Vh[:2], dim=1).abs()
    cos_b = torch.nn.functional.cosine_similarity(adapter.B.double().T, U[:, 2:4].T, dim=1).abs()
    assert cos_a.min() > 1 - 1e-5 and cos_b.min() > 1 - 1e-5
    torch.testing.assert_close(adapter.B.double().norm(dim=0), S[2:4], rtol=1e-4, atol=1e-8)
    # Nothing was left behind: no .grad anywhere, and the model's flags are the adapter's.
    assert all(p.grad is None for p in model.parameters())
    assert set(peftlab.trainable_parameters(model)) == {f"{site}.adapters.default.A", f"{site}.adapters.default.B"}


def test_batches_without_labels_are_refused():
    with pytest.raises(peftlab.PeftlabError, match="labels"):
        peftlab.attach(tiny_classifier(), peftlab.LoRAGA(r=2, targets=["query"]), calibration=[token_batch()])
    with pytest.raises(peftlab.PeftlabError, match="direction"):
        peftlab.LoRAGA(direction="BA")
    with pytest.raises(peftlab.PeftlabError, match="2r"):
        peftlab.attach(tiny_classifier(), peftlab.LoRAGA(r=20, targets=["query"]), calibration=classification_batches())


# ---- parity with peft ----------------------------------------------------------------------------


def _exact_svd(A, q=6, niter=2, M=None):
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    return U[:, :q], S[:q], Vh[:q].mT


def _peft_lora_ga(model, batches, targets, r, alpha, **options):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraGAConfig, preprocess_loraga

    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights="lora_ga",
                        lora_ga_config=LoraGAConfig(**options))

    def train_step():  # gradients accumulate; peft divides by the number of backward passes
        for b in batches:
            model(**b).loss.backward()

    preprocess_loraga(model, config, train_step)
    return get_peft_model(model, config).eval()


def _compare(ours, theirs, batch, atol=1e-6):
    for site, adapter in peftlab.adapters(ours, "default").items():
        layer = theirs.base_model.model.get_submodule(site)
        torch.testing.assert_close(adapter.A, layer.lora_A["default"].weight, atol=atol, rtol=0)
        torch.testing.assert_close(adapter.B, layer.lora_B["default"].weight, atol=atol, rtol=0)
        torch.testing.assert_close(ours.get_submodule(site).weight, layer.base_layer.weight, atol=atol, rtol=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # move B off its initial value identically in both, then compare outputs
        for site, adapter in peftlab.adapters(ours, "default").items():
            b = adapter.B + 0.05 * torch.randn(adapter.B.shape, generator=g)
            adapter.B.copy_(b)
            theirs.base_model.model.get_submodule(site).lora_B["default"].weight.copy_(b)
        torch.testing.assert_close(output_of(ours, batch), output_of(theirs, batch), atol=1e-5, rtol=1e-5)


OPTIONS = [dict(), dict(direction="ArBr", scale="weight_svd"), dict(direction="A2rBr", scale="gd_scale"),
           dict(direction="ArB2r", scale="unit")]


@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_parity_with_peft_on_a_tiny_classifier(options, monkeypatch):
    batches = classification_batches()
    targets = ["query", "value", "output.dense"]
    ours = tiny_classifier()
    ours_options = {"scale_mode" if k == "scale" else k: v for k, v in options.items()}
    peftlab.attach(ours, peftlab.LoRAGA(r=2, alpha=4, targets=targets, **ours_options), calibration=batches)
    monkeypatch.setattr(torch, "svd_lowrank", _exact_svd)
    theirs = _peft_lora_ga(tiny_classifier(), batches, targets, 2, 4, **options)
    _compare(ours, theirs, token_batch())


def _minilm_classifier():
    from transformers import AutoModelForSequenceClassification

    from conftest import _MINILM, load_minilm

    load_minilm()
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(
        _MINILM["path"], num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).eval()


TEXTS = ["a gripping, beautifully shot film", "dull and far too long", "not bad at all, honestly",
         "the actors seem bored and so was I", "a small miracle of a movie", "too clever by half, and twice as long",
         "funny, warm and surprisingly wise", "an utter mess from start to finish"]


def test_parity_with_peft_on_minilm(minilm, minilm_batch, monkeypatch):
    _, tok = minilm
    batches = []
    for i in range(0, 8, 4):
        batches.append({**tok(TEXTS[i:i + 4], padding=True, return_tensors="pt"), "labels": torch.tensor([1, 0, 1, 0])})
    targets = ["query", "value"]
    ours = _minilm_classifier()
    fresh = copy.deepcopy(ours)  # the same head, for both references
    peftlab.attach(ours, peftlab.LoRAGA(r=4, alpha=8, targets=targets), calibration=batches)

    # (2) peft as it is: a randomised SVD -> the same factors up to sign and its own accuracy
    theirs = _peft_lora_ga(copy.deepcopy(fresh), batches, targets, 4, 8)
    for site, adapter in peftlab.adapters(ours, "default").items():
        layer = theirs.base_model.model.get_submodule(site)
        cos_a = torch.nn.functional.cosine_similarity(adapter.A, layer.lora_A["default"].weight, dim=1).abs()
        cos_b = torch.nn.functional.cosine_similarity(adapter.B.T, layer.lora_B["default"].weight.T, dim=1).abs()
        assert cos_a.min() > 0.995 and cos_b.min() > 0.995, site

    # (1) peft with an exact SVD -> the same adapter, residual and outputs
    monkeypatch.setattr(torch, "svd_lowrank", _exact_svd)
    theirs = _peft_lora_ga(fresh, batches, targets, 4, 8)
    _compare(ours, theirs, minilm_batch)
