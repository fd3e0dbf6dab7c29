"""A mixture of LoRA experts behind a learned top-k router (MixLoRA, Li et al. 2024, arXiv 2404.15159;
LoRAMoE, Dou et al. 2023, arXiv 2312.09979).

Official code: TUDB-Labs/MixLoRA (`mixlora/model.py`: the router, top-k and the balance loss).

    g(x) = softmax over the top-k of the router logits R x      R: (E, in)
    h = W0 x + sum_{e in top-k(x)} g_e(x) * s * B_e A_e dropout(x)        s = alpha / r
    A_e: (r, in), B_e: (out, r) for each of E = `num_experts` experts; k = `top_k`.
    Trained: R, every A_e and B_e. W0 is frozen.

The top-k weights are renormalised to sum to 1 (MixLoRA and Mixtral), so with one expert
(E = k = 1) the gate is exactly 1 and the method is LoRA. Start: A_e ~ kaiming-uniform(a=sqrt(5)),
B_e = 0 (the output is unchanged at attach), R ~ N(0, `router_init_std`^2) (MixLoRA's 0.02).
The experts are computed together as one rank-E*r LoRA whose rank-r slices are weighted by
the (mostly zero) gates: exact, and cheap at these ranks.

Load balance (Switch Transformer / MixLoRA), added to the training loss through
`peftlab.regularization(model)`:

    balance = E * sum_e f_e P_e - 1       f_e: share of the batch's top-k assignments that went to e
                                          P_e: mean router probability of e over the batch's tokens
    loss = `balance_coef` * mean over sites of balance

The "- 1" makes a perfectly balanced router (f_e = P_e = 1/E) score 0; a router that sends
more tokens and more probability to some experts scores above 0. The constant changes no
gradient: it is Switch's and MixLoRA's loss. (As theirs, it is a product of two different
distributions, so a batch whose hard assignments disagree with its mean probabilities can dip
just below 0.)

There is no weight form: the router depends on the input, so the adapter cannot be merged
into W0, nor written as one LoRA.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core import Adapter
from ..errors import PeftlabError
from ..hosts import LINEAR_LIKE, HostKind
from ..registry import MethodConfig, Site, register


class LoRAMoEAdapter(Adapter):
    weight_form = False
    additive = False

    def __init__(self, kind: HostKind, in_features: int, out_features: int, experts: int, top_k: int, r: int,
                 scale: float, dropout: float, dtype: torch.dtype):
        super().__init__(kind)
        self.experts, self.top_k, self.r, self.scale = experts, top_k, r, scale
        self.router = nn.Parameter(torch.zeros(experts, in_features, dtype=dtype))  # (E, in)
        self.A = nn.Parameter(torch.zeros(experts * r, in_features, dtype=dtype))  # expert e: rows e*r:(e+1)*r
        self.B = nn.Parameter(torch.zeros(out_features, experts * r, dtype=dtype))  # expert e: columns likewise
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.balance: Tensor | None = None  # the last training forward's balance term

    def initialise(self, router_std: float) -> None:
        with torch.no_grad():
            for e in range(self.experts):  # each expert's A as LoRA's, fan-in = in
                nn.init.kaiming_uniform_(self.A[e * self.r:(e + 1) * self.r], a=math.sqrt(5))
            nn.init.normal_(self.router, std=router_std)

    def gates(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(gates (..., E): renormalised top-k weights, 0 elsewhere; probs (..., E); chosen (..., k))."""
        probs = torch.softmax(nn.functional.linear(x, self.router).float(), dim=-1)
        top, chosen = probs.topk(self.top_k, dim=-1)
        gates = torch.zeros_like(probs).scatter(-1, chosen, top / top.sum(-1, keepdim=True))
        return gates, probs, chosen

    def forward(self, host: nn.Module, x: Tensor, base) -> Tensor:
        gates, probs, chosen = self.gates(x)
        if torch.is_grad_enabled():
            self.balance = balance_term(probs, chosen, self.experts)
        h = self.kind.apply_in(host, self.dropout(x), self.A)  # (..., E*r)
        weights = (gates * self.scale).to(h.dtype).repeat_interleave(self.r, dim=-1)  # (..., E*r)
        return self.kind.add_out(host, base(x), h * weights, self.B)


def balance_term(probs: Tensor, chosen: Tensor, experts: int) -> Tensor:
    """E * sum_e f_e P_e - 1 over every token: probs (..., E), chosen (..., k) expert indices."""
    probs = probs.reshape(-1, experts)
    # a one-hot sum rather than bincount: same counts, but an (E,) shape torch.compile can trace
    counts = nn.functional.one_hot(chosen.reshape(-1), experts).sum(0).to(probs.dtype)  # (E,)
    share = counts / counts.sum()  # f_e: no gradient, as in Switch
    return experts * (share * probs.mean(0)).sum() - 1


@register("lora_moe")
@dataclass
class LoRAMoE(MethodConfig):
    num_experts: int = 8
    top_k: int = 2
    r: int = 8  # each expert's rank
    alpha: float = 16.0
    dropout: float = 0.0
    balance_coef: float = 0.01
    router_init_std: float = 0.02

    hosts = LINEAR_LIKE
    adds_loss = True
    trainable_formula = "num_experts * (r * (in + out) + in) per site"

    def validate(self) -> None:
        self.check_positive_int("num_experts", "top_k", "r")
        self.check_dropout()
        if self.top_k > self.num_experts:
            raise PeftlabError(f"LoRAMoE top_k={self.top_k} is larger than num_experts={self.num_experts}: "
                               f"use top_k <= {self.num_experts}")
        if self.balance_coef < 0 or self.router_init_std < 0:
            raise PeftlabError(f"LoRAMoE balance_coef and router_init_std must be >= 0, got {self.balance_coef!r} "
                               f"and {self.router_init_std!r}")

    def validate_site(self, site: Site) -> None:
        site.check_rank(self.r, "LoRAMoE")

    def build(self, site: Site, stats=None, initialize: bool = True) -> LoRAMoEAdapter:
        adapter = LoRAMoEAdapter(site.kind, site.in_features, site.out_features, self.num_experts, self.top_k,
                                 self.r, self.alpha / self.r, self.dropout, site.weight.dtype)
        if initialize:
            adapter.initialise(self.router_init_std)
        return adapter

    def loss(self, adapters: dict[str, Adapter]) -> Tensor | None:
        terms = [a.balance for a in adapters.values() if a.balance is not None]
        for a in adapters.values():
            a.balance = None  # read once: do not keep the graph alive past this step
        if not terms or self.balance_coef == 0:
            return None
        return self.balance_coef * torch.stack(terms).mean()
