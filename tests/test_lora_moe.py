"""LoRA-MoE: contract rows (no weight form: merge refused), the forward against the equation written per
token, one expert equals LoRA, the balance loss (0 when balanced, > 0 when not) through
peftlab.regularization, bad input."""
import pytest
import torch

import peftlab
from conftest import output_of, tiny_bert, tiny_gpt2, token_batch
from contract import Case, run_contract
from peftlab.methods.lora_moe import balance_term

QV = ["query", "value"]

ROWS = [
    Case("lora_moe-linear", lambda: peftlab.LoRAMoE(num_experts=4, top_k=2, r=2, targets=QV), tiny_bert,
         token_batch),
    Case("lora_moe-top1-dropout-all-linear",
         lambda: peftlab.config("lora_moe", num_experts=3, top_k=1, r=2, dropout=0.1, targets="all-linear"),
         tiny_bert, token_batch),
    Case("lora_moe-conv1d", lambda: peftlab.LoRAMoE(num_experts=2, r=2, targets=["c_attn", "c_fc"]), tiny_gpt2,
         token_batch),
]


@pytest.mark.parametrize("case", ROWS, ids=str)
def test_contract(case, tmp_path):
    run_contract(case, tmp_path)


def test_forward_is_the_gated_sum_of_the_top_k_experts():
    model = peftlab.attach(tiny_bert(), peftlab.LoRAMoE(num_experts=4, top_k=2, r=3, alpha=6.0, targets=["value"]))
    site = "encoder.layer.0.attention.self.value"
    a, host = peftlab.adapters(model, "default")[site], model.get_submodule(site)
    with torch.no_grad():
        a.B.normal_()
        a.router.normal_()
    x = torch.randn(7, 32)
    expected = []
    for token in x:  # per token: softmax over all experts, keep the top 2, renormalise
        probs = torch.softmax(a.router.detach() @ token, dim=0)
        top = probs.topk(2)
        y = host.weight.detach() @ token + host.bias.detach()
        for p, e in zip(top.values / top.values.sum(), top.indices.tolist()):
            A_e, B_e = a.A.detach()[3 * e:3 * e + 3], a.B.detach()[:, 3 * e:3 * e + 3]
            y = y + p * 2.0 * (B_e @ (A_e @ token))
        expected.append(y)
    with torch.no_grad():
        torch.testing.assert_close(host(x), torch.stack(expected), atol=1e-5, rtol=1e-5)


def test_one_expert_is_lora():
    lora = peftlab.attach(tiny_bert(), peftlab.LoRA(r=4, alpha=8.0, targets=QV))
    moe = peftlab.attach(tiny_bert(), peftlab.LoRAMoE(num_experts=1, top_k=1, r=4, alpha=8.0, targets=QV))
    theirs = peftlab.adapters(lora, "default")
    with torch.no_grad():
        for site, a in peftlab.adapters(moe, "default").items():
            theirs[site].B.normal_()
            a.A.copy_(theirs[site].A)
            a.B.copy_(theirs[site].B)
            a.router.normal_()  # any router: one expert always gets weight 1
    batch = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(output_of(moe, batch), output_of(lora, batch), atol=0, rtol=0)


def _switch(probs: torch.Tensor, chosen: torch.Tensor, experts: int) -> float:
    """N * sum_e f_e P_e - 1, written out: f_e share of assignments to e, P_e mean probability of e."""
    f = [sum(int(c == e) for c in chosen.reshape(-1)) / chosen.numel() for e in range(experts)]
    P = probs.reshape(-1, experts).mean(0)
    return experts * sum(f[e] * float(P[e]) for e in range(experts)) - 1


def test_balance_is_zero_when_balanced_and_positive_when_not():
    balanced = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1], [0.1, 0.1, 0.7, 0.1], [0.1, 0.1, 0.1, 0.7]])
    chosen = balanced.argmax(-1, keepdim=True)
    assert float(balance_term(balanced, chosen, 4)) == pytest.approx(0.0, abs=1e-7)
    assert _switch(balanced, chosen, 4) == pytest.approx(0.0, abs=1e-7)
    collapsed = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.6, 0.2, 0.1, 0.1], [0.5, 0.3, 0.1, 0.1], [0.4, 0.3, 0.2, 0.1]])
    chosen = collapsed.topk(2, -1).indices  # top-2: experts 0 and 1 take every assignment
    value = float(balance_term(collapsed, chosen, 4))
    assert value > 0.3
    assert value == pytest.approx(_switch(collapsed, chosen, 4), rel=1e-6)


def test_regularization_adds_the_balance_loss_once_per_forward():
    config = peftlab.LoRAMoE(num_experts=4, top_k=1, r=2, balance_coef=0.5, targets=QV)
    model = peftlab.attach(tiny_bert(), config)
    sites = peftlab.adapters(model, "default")
    with torch.no_grad():
        for a in sites.values():
            a.router.zero_()
            a.router[0, 0] = 1.0  # a router that prefers expert 0 for inputs with x_0 > 0
    model.train()
    output_of(model, token_batch())
    terms = [float(a.balance.detach()) for a in sites.values()]
    assert all(t > 0 for t in terms)
    extra = peftlab.regularization(model)
    assert float(extra.detach()) == pytest.approx(0.5 * sum(terms) / len(terms), rel=1e-6)
    extra.backward()
    assert all(a.router.grad is not None and a.router.grad.abs().sum() > 0 for a in sites.values())
    assert peftlab.regularization(model) is None, "read once: the next step's forward sets it again"


def test_bad_input():
    with pytest.raises(peftlab.PeftlabError, match="top_k=3 is larger than num_experts=2"):
        peftlab.LoRAMoE(num_experts=2, top_k=3)
    with pytest.raises(peftlab.PeftlabError, match="num_experts must be a positive integer"):
        peftlab.LoRAMoE(num_experts=0)
    model = tiny_bert()
    with pytest.raises(peftlab.PeftlabError, match="rank r=64 is larger than"):
        peftlab.attach(model, peftlab.LoRAMoE(r=64, targets=QV))
    assert "_peftlab" not in model.__dict__
