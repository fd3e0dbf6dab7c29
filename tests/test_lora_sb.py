"""LoRA-SB: contract rows (the output changes at attach, by design); the initial update is the
truncated SVD of the estimated first update -lr_eff * sign(G); calibration leaves the model as it was."""
import pytest
import torch

import peftlab
from conftest import token_batch
from contract import Case, run_contract

QV = ["query", "value"]


def classifier(seed: int = 0):
    """A tiny BERT with a classification head (it returns a loss when given labels), no dropout."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, num_labels=3,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).eval()


def causal_lm(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()


def labelled_batches():
    batches = []
    for seed in (11, 12):
        batch = token_batch(seed=seed, batch=4)
        batch["labels"] = torch.tensor([0, 1, 2, 1]) if seed == 11 else torch.tensor([2, 2, 0, 1])
        batches.append(batch)
    return batches


def lm_batches():
    batch = token_batch(seed=13, batch=4)
    return [{**batch, "labels": batch["input_ids"]}]


# A large lr_eff = lr / (warmup_ratio * total_steps) so the change at attach is well above 1e-6.
ROWS = [
    Case("lora_sb-linear", lambda: peftlab.config("lora_sb", r=4, lr=1e-2, total_steps=10, targets=QV),
         classifier, token_batch, labelled_batches),
    Case("lora_sb-conv1d", lambda: peftlab.LoRASB(r=4, lr=1e-2, total_steps=10, targets=["c_attn", "c_fc"]),
         causal_lm, token_batch, lm_batches),
]


@pytest.mark.parametrize("case", ROWS, ids=str)
def test_contract(case, tmp_path):
    run_contract(case, tmp_path)


def test_initial_update_is_the_truncated_svd_of_the_estimated_first_step():
    config = peftlab.LoRASB(r=3, lr=2e-3, warmup_ratio=0.1, total_steps=40, targets=QV)
    lr_eff = 2e-3 / (0.1 * 40)
    # the full gradient, computed independently on an identical model
    reference = classifier()
    sites = [n for n, _ in reference.named_modules() if n.endswith(("query", "value"))]
    weights = [reference.get_submodule(n).weight for n in sites]
    G = [torch.zeros_like(w) for w in weights]
    reference.train()
    for batch in labelled_batches():
        for total, grad in zip(G, torch.autograd.grad(reference(**batch).loss, weights)):
            total += grad

    model = peftlab.attach(classifier(), config, calibration=labelled_batches())
    adapters = peftlab.adapters(model, "default")
    assert list(adapters) == sites
    for site, gradient in zip(sites, G):
        adapter = adapters[site]
        update = -lr_eff * torch.sign(gradient)
        U, S, Vh = torch.linalg.svd(update)
        best = U[:, :3] @ torch.diag(S[:3]) @ Vh[:3]
        torch.testing.assert_close(adapter.delta_weight().detach(), best, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(adapter.R.detach(), torch.diag(S[:3]), atol=1e-7, rtol=1e-5)
        # B and A are orthonormal frames; the error is exactly the discarded spectrum
        torch.testing.assert_close(adapter.B.T @ adapter.B, torch.eye(3), atol=1e-5, rtol=0)
        torch.testing.assert_close(adapter.A @ adapter.A.T, torch.eye(3), atol=1e-5, rtol=0)
        error = torch.linalg.matrix_norm(update - adapter.delta_weight().detach()) ** 2
        torch.testing.assert_close(error, S[3:].pow(2).sum(), atol=1e-8, rtol=1e-3)
    names = set(peftlab.trainable_parameters(model))
    assert names and all(n.endswith(".R") for n in names)
    assert sum(p.numel() for p in peftlab.trainable_parameters(model).values()) == 4 * 3 * 3


def test_calibration_leaves_the_model_as_it_was():
    model = classifier()
    model.classifier.weight.requires_grad_(True)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    peftlab.attach(model, peftlab.LoRASB(r=2, total_steps=10, targets=QV), calibration=labelled_batches())
    assert not model.training
    assert all(p.grad is None for p in model.parameters())
    peftlab.detach(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_bad_input():
    model = classifier()
    with pytest.raises(peftlab.PeftlabError, match="calibration"):
        peftlab.attach(model, peftlab.LoRASB(r=2, total_steps=10, targets=QV))
    with pytest.raises(peftlab.PeftlabError, match="labels"):
        peftlab.attach(model, peftlab.LoRASB(r=2, total_steps=10, targets=QV), calibration=[token_batch()])
    with pytest.raises(peftlab.PeftlabError, match="total_steps"):
        peftlab.attach(model, peftlab.LoRASB(r=2, targets=QV), calibration=labelled_batches())
    with pytest.raises(peftlab.PeftlabError, match="no batches"):
        peftlab.attach(model, peftlab.LoRASB(r=2, total_steps=10, targets=QV), calibration=[])
    assert "_peftlab" not in model.__dict__
    assert all(p.grad is None for p in model.parameters())
