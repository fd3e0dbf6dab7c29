"""LoRA+: the parameter groups, the first AdamW steps they predict, and parity with `peft`."""
import pytest
import torch

import peftlab
from conftest import output_of, tiny_bert, token_batch
from peftlab.optim import loraplus_param_groups


def lora_model(**fields):
    model = tiny_bert()
    peftlab.attach(model, peftlab.LoRA(r=4, **{"targets": ["query", "value"], **fields}))
    return model


def loss_of(model, batch):
    # Not a function of the LayerNorm'd output's norm (that one has ~zero gradient): a fixed projection.
    out = output_of(model, batch)
    return (out * torch.linspace(-1, 1, out.shape[-1])).sum()


def test_b_gets_ratio_times_lr_and_every_trainable_parameter_is_in_one_group():
    model = lora_model(also_train=["pooler"])
    groups = loraplus_param_groups(model, lr=1e-3, ratio=16, weight_decay=0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    by_lr = {g["lr"]: sorted(names[id(p)] for p in g["params"]) for g in groups}
    assert set(by_lr) == {1e-3, 16e-3} and all(g["weight_decay"] == 0.01 for g in groups)
    assert by_lr[16e-3] and all(n.endswith(".adapters.default.B") for n in by_lr[16e-3])
    assert all(n.endswith(".adapters.default.A") or n.startswith("pooler.") for n in by_lr[1e-3])
    assert sorted(by_lr[1e-3] + by_lr[16e-3]) == sorted(peftlab.trainable_parameters(model))


def test_embedding_sites_get_their_own_rate():
    model = lora_model(targets=["word_embeddings", "query"])
    groups = loraplus_param_groups(model, lr=1e-3, lr_embedding=1e-6)
    embedding = [g for g in groups if g["lr"] == 1e-6]
    assert len(embedding) == 1 and len(embedding[0]["params"]) == 2  # that site's A and B


def test_first_adamw_steps_move_b_ratio_times_faster():
    """B starts at 0, so step 1 moves only B, each entry by lr_B (Adam's first step is +-lr)."""
    lr, ratio = 1e-3, 16.0
    model = lora_model()
    B = [p for n, p in model.named_parameters() if n.endswith(".B")]
    A = [p for n, p in model.named_parameters() if n.endswith(".A")]
    optimizer = torch.optim.AdamW(loraplus_param_groups(model, lr, ratio), weight_decay=0.0)
    before = [p.detach().clone() for p in A + B]
    loss_of(model, token_batch()).backward()
    optimizer.step()
    moved = [(p - q).abs() for p, q in zip(A + B, before)]
    assert all(m.max() == 0 for m in moved[: len(A)])  # dL/dA = 0 while B = 0
    step_b = torch.cat([m.flatten() for m in moved[len(A):]])
    torch.testing.assert_close(step_b.max(), torch.tensor(ratio * lr), rtol=1e-3, atol=0)


def test_refuses_a_model_without_b_factors():
    with pytest.raises(peftlab.PeftlabError, match="attach"):
        loraplus_param_groups(tiny_bert(), lr=1e-3)
    with pytest.raises(peftlab.PeftlabError, match="b_names"):
        loraplus_param_groups(lora_model(), lr=1e-3, b_names=("up",))


def test_parity_with_peft_create_loraplus_optimizer():
    from peft import LoraConfig, get_peft_model
    from peft.optimizers import create_loraplus_optimizer

    theirs = get_peft_model(tiny_bert(), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    ours = tiny_bert()
    peftlab.attach(ours, peftlab.LoRA(r=4, alpha=8, targets=["query", "value"]))
    sites = peftlab.adapters(ours, "default")
    with torch.no_grad():
        for site, a in sites.items():
            a.A.copy_(theirs.base_model.model.get_submodule(site).lora_A["default"].weight)
    opt_theirs = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16)
    opt_ours = torch.optim.AdamW(loraplus_param_groups(ours, lr=1e-3, ratio=16))
    for step in range(3):
        batch = token_batch(seed=step)
        loss_of(theirs, batch).backward()
        loss_of(ours, batch).backward()
        opt_theirs.step(), opt_ours.step(), opt_theirs.zero_grad(), opt_ours.zero_grad()
    for site, a in sites.items():
        layer = theirs.base_model.model.get_submodule(site)
        torch.testing.assert_close(a.A, layer.lora_A["default"].weight, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(a.B, layer.lora_B["default"].weight, atol=1e-6, rtol=1e-5)
