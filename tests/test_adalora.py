"""AdaLoRA: contract rows, the budget schedule, parity with `peft`, and a short MiniLM training run.

Parity: from the same initial P, lam, Q (copied from `peft`'s lora_B, lora_E, lora_A) and the same
batches, both train 12 SGD steps with their own regulariser and rank allocation; after every step
the pruned triplets are the same and the weights agree within 1e-5 (the only difference: `peft`
divides by init_r + 1e-5 where this divides by init_r).
Training loop order, as AdaLoRA needs it: loss.backward(); optimizer.step();
peftlab.step(model, step) (reads this step's gradients); optimizer.zero_grad().
"""
import pytest
import torch

import peftlab
from conftest import image_batch, output_of, tiny_bert, tiny_cnn, tiny_gpt2, token_batch
from contract import Case, run_contract


def adalora(**fields):
    return peftlab.AdaLoRA(**{"init_r": 4, "target_r": 2, "total_steps": 100, **fields})


ROWS = [
    Case("adalora-linear", lambda: adalora(targets=["query", "value"]), tiny_bert, token_batch),
    Case("adalora-conv1d", lambda: peftlab.config("adalora", init_r=3, target_r=1, total_steps=10, dropout=0.1,
                                                  targets=["c_attn"]), tiny_gpt2, token_batch),
    Case("adalora-conv2d", lambda: adalora(init_r=2, target_r=1, targets=["conv1", "conv2"]), tiny_cnn, image_batch),
]


@pytest.mark.parametrize("case", ROWS, ids=str)
def test_contract(case, tmp_path):
    run_contract(case, tmp_path)


def test_config_errors_name_the_fix():
    with pytest.raises(peftlab.PeftlabError, match="total_steps"):
        peftlab.AdaLoRA()
    with pytest.raises(peftlab.PeftlabError, match="tinit < total_steps - tfinal"):
        adalora(total_steps=10, tinit=5, tfinal=5)
    with pytest.raises(peftlab.PeftlabError, match="target_r must be <= init_r"):
        adalora(init_r=2, target_r=3)
    assert type(peftlab.config("adalora", total_steps=5)) is peftlab.AdaLoRA


def test_budget_schedule_is_cubic_between_tinit_and_the_final_phase():
    cfg = adalora(total_steps=100, tinit=10, tfinal=20, delta_t=5)
    assert cfg.budget(10, 120, 40) == (120, False)  # warm-up: the full budget, no allocation
    assert cfg.budget(45, 120, 40) == (int(80 * (1 - 35 / 70) ** 3 + 40), True)
    assert cfg.budget(46, 120, 40)[1] is False  # allocations every delta_t steps
    assert cfg.budget(80, 120, 40) == (40, True)
    assert cfg.budget(81, 120, 40) == (40, True)


def test_step_hook_needs_this_steps_gradients():
    model = tiny_bert()
    peftlab.attach(model, adalora(targets=["query"]))
    output_of(model, token_batch()).pow(2).mean().backward()
    for p in peftlab.trainable_parameters(model).values():
        p.grad = None  # optimizer.zero_grad() before peftlab.step: the sensitivity cannot be computed
    with pytest.raises(peftlab.PeftlabError, match="before optimizer.zero_grad"):
        peftlab.step(model, 1)


# ---- parity with peft ----------------------------------------------------------------------------


def tiny_classifier():
    from test_lora_ga import tiny_classifier as make

    return make()


def test_parity_with_peft_masks_and_weights():
    from peft import AdaLoraConfig, get_peft_model

    targets = ["query", "value"]
    schedule = dict(init_r=4, target_r=2, tinit=2, tfinal=3, orth_reg_weight=0.5)
    theirs = get_peft_model(tiny_classifier(), AdaLoraConfig(
        task_type="SEQ_CLS", lora_alpha=8, target_modules=targets, deltaT=2, total_step=12, **schedule))
    ours = tiny_classifier()
    peftlab.attach(ours, peftlab.AdaLoRA(alpha=8, targets=targets, delta_t=2, total_steps=12,
                                         also_train=["classifier"], **schedule))
    sites = peftlab.adapters(ours, "default")
    layers = {s: theirs.base_model.model.get_submodule(s) for s in sites}
    with torch.no_grad():
        for site, a in sites.items():
            a.P.copy_(layers[site].lora_B["default"])
            a.lam.copy_(layers[site].lora_E["default"].view(-1))
            a.Q.copy_(layers[site].lora_A["default"])

    theirs_params = [p for p in theirs.parameters() if p.requires_grad]
    ours_params = list(peftlab.trainable_parameters(ours).values())
    assert len(theirs_params) == len(ours_params)  # P, lam, Q per site and the head (weight, bias)
    opt_theirs, opt_ours = torch.optim.SGD(theirs_params, lr=0.5), torch.optim.SGD(ours_params, lr=0.5)
    batches = [token_batch(seed=50 + i, batch=6, length=8) for i in range(4)]
    for i, b in enumerate(batches):
        b["labels"] = torch.tensor([0, 1, 2, 0, 1, i % 3])

    pruned_any = False
    for step in range(1, 13):
        batch = batches[step % 4]
        theirs(**batch).loss.backward()  # peft adds the orthogonality regulariser to .loss itself
        (ours(**batch).loss + peftlab.regularization(ours)).backward()
        opt_theirs.step()
        opt_ours.step()
        theirs.base_model.update_and_allocate(step)
        peftlab.step(ours, step)
        opt_theirs.zero_grad()
        opt_ours.zero_grad()
        for site, a in sites.items():
            their_lam = layers[site].lora_E["default"].view(-1)
            assert torch.equal(a.lam == 0, their_lam == 0), (step, site)
            torch.testing.assert_close(a.lam, their_lam, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(a.P, layers[site].lora_B["default"], atol=1e-5, rtol=1e-4)
            pruned_any |= bool((a.lam == 0).any())
    assert pruned_any
    # The final masks: the same ranks kept, at the target budget (2 per site on average).
    kept = {s: a.kept.tolist() for s, a in sites.items()}
    their_pattern = theirs.peft_config["default"].rank_pattern  # {"<site>.lora_E.default": [kept, ...]}
    assert kept == {s: their_pattern[f"{s}.lora_E.default"] for s in sites}
    assert sum(sum(k) for k in kept.values()) <= 2 * len(sites)
    with torch.no_grad():
        batch = token_batch()
        torch.testing.assert_close(output_of(ours, batch), output_of(theirs, batch), atol=1e-5, rtol=1e-4)


# ---- a short training run on MiniLM --------------------------------------------------------------

TEXTS = [("a gripping, beautifully shot film", 1), ("dull and far too long", 0), ("not bad at all, honestly", 1),
         ("the actors seem bored and so was I", 0), ("a small miracle of a movie", 1),
         ("too clever by half, and twice as long", 0), ("funny, warm and surprisingly wise", 1),
         ("an utter mess from start to finish", 0), ("I laughed, I cried, I bought popcorn again", 1),
         ("the plot holes could swallow a truck", 0), ("quietly devastating and beautifully acted", 1),
         ("a sequel nobody asked for", 0), ("sharp writing and a terrific cast", 1), ("it drags, then it stops", 0),
         ("the best thing about it is the soundtrack", 0), ("a joy from the first frame to the last", 1)]


def test_budget_schedule_happens_while_training_minilm(minilm):
    model, tok = minilm
    total, tinit, tfinal, delta_t = 50, 5, 10, 5
    cfg = peftlab.AdaLoRA(init_r=6, target_r=2, total_steps=total, tinit=tinit, tfinal=tfinal, delta_t=delta_t,
                          targets=["query", "value"])
    peftlab.attach(model, cfg)
    sites = list(peftlab.adapters(model, "default").values())
    initial, target = 6 * len(sites), 2 * len(sites)
    torch.manual_seed(0)
    head = torch.nn.Linear(384, 2)
    optimizer = torch.optim.AdamW([*peftlab.trainable_parameters(model).values(), *head.parameters()], lr=5e-3)
    batches = []
    for i in range(0, 16, 8):
        texts, labels = zip(*TEXTS[i:i + 8])
        batches.append((dict(tok(list(texts), padding=True, return_tensors="pt")), torch.tensor(labels)))

    model.train()
    kept_counts, regularizers = {}, []
    for step in range(1, total + 1):
        inputs, labels = batches[step % 2]
        pooled = model(**inputs).last_hidden_state[:, 0]
        regularizer = peftlab.regularization(model)
        loss = torch.nn.functional.cross_entropy(head(pooled), labels) + regularizer
        loss.backward()
        optimizer.step()
        peftlab.step(model, step)
        optimizer.zero_grad()
        kept_counts[step] = sum(int(a.kept.sum()) for a in sites)
        regularizers.append(regularizer.item())

    end = total - tfinal
    for step, count in kept_counts.items():
        budget, due = cfg.budget(step, initial, target)
        if step <= tinit:
            assert count == initial, step  # warm-up: nothing pruned
        elif due and step < end:
            assert count == budget, step  # each allocation keeps exactly the scheduled budget
    assert kept_counts[tinit + delta_t] < initial
    assert kept_counts[end] == kept_counts[total] == target  # the final budget, then frozen
    for a in sites:
        assert torch.all(a.lam[~a.kept] == 0) and torch.all(a.lam[a.kept] != 0)
    assert len({tuple(a.kept.tolist()) for a in sites}) > 1  # ranks differ between sites
    assert regularizers[-1] < regularizers[0]  # the orthogonality penalty was minimised
