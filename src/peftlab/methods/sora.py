"""SoRA: a LoRA whose ranks are switched off by a sparse gate (Ding et al. 2023, arXiv 2311.11696).

Paper: Ning Ding, Xingtai Lv, Qiaosen Wang, Yulin Chen, Bowen Zhou, Zhiyuan Liu, Maosong Sun,
"Sparse Low-rank Adaptation of Pre-trained Language Models", EMNLP 2023, arXiv 2311.11696.
Official code: TsinghuaC3I/SoRA (`src/lora.py`, `src/sparse_optimizer.py`, `src/trainer.py`).

    h = W0 x + s * B (g * (A dropout(x)))        W' = W0 + s * (B * g) @ A        s = alpha / r
    A: (r, in), B: (out, r), gate g: (r,). Trained: A, B and g.

Initialisation (official): A ~ kaiming-uniform(a=sqrt(5)), B = 0, g ~ N(0, 1). B = 0 keeps the
output unchanged at attach.

Sparsity, after each optimizer step (`peftlab.step(model, step)`), a thresholding step on every
gate, chosen by `threshold`:

    "official" (default)  soft, then hard: g' = sign(g) * max(|g| - xi, 0), then g' = 0 where |g'| < xi.
                          Gates with |g| < 2 xi become 0, the others shrink by xi. This is what
                          the official optimizer (`SparseAdamW.step`) does: it subtracts xi from
                          entries above xi, adds it to those below -xi, then zeroes every entry
                          whose new value is below xi in magnitude.
    "soft"                the paper's proximal operator of xi * |g|_1: g' = sign(g) * max(|g| - xi, 0),
                          zeroing |g| <= xi only.

The official band is the default because the paper's results come from that code; it switches
ranks off at twice the paper's threshold. One point differs from the official code: a gate at
exactly |g| = xi is zeroed here (the official code leaves it, as it is neither shifted nor, at
|g| = xi, below the threshold). If `l1` > 0, `peftlab.regularization(model)` adds
l1 * mean(|g|) over all gates to the loss (the official trainer adds both). As in the official
code the threshold is xi itself, not xi times the learning rate, and gates get no weight decay
(`param_groups` puts them in their own group with weight_decay=0). Defaults xi = l1 = 1e-3 are
the official `run_glue.py` defaults.

When training ends, ranks whose gate is 0 contribute nothing: `to_lora(model, name)` turns the
adapter into a plain, smaller LoRA (per-site rank = kept gates, the gate folded into B, alpha
chosen so the scale s is unchanged) with the same outputs; `prune(model, name)` does that in
place. Not implemented: the official multi-stage xi schedule (a sequence of whole runs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core import ADAPTERS, Adapter, also_train_parameters, adapters as adapters_of, attach, adapter_configs, detach
from ..errors import PeftlabError
from ..hosts import HostKind
from ..registry import MethodConfig, Site, register
from .lora import LoRA, zero_factors

THRESHOLDS = ("official", "soft")


class SoRAAdapter(Adapter):
    def __init__(self, kind: HostKind, in_features: int, out_features: int, r: int, scale: float,
                 dropout: float, dtype: torch.dtype):
        super().__init__(kind)
        self.scale = scale
        self.A, self.B = zero_factors(r, in_features, out_features, dtype)  # (r, in), (out, r)
        self.gate = nn.Parameter(torch.zeros(r, dtype=dtype))  # (r,)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def initialise(self) -> None:
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
            self.B.zero_()
            nn.init.normal_(self.gate)

    def forward(self, host: nn.Module, x: Tensor, base) -> Tensor:
        h = self.kind.apply_in(host, self.dropout(x), self.A) * (self.gate * self.scale)  # (..., r)
        return self.kind.add_out(host, base(x), h, self.B)

    def delta_weight(self) -> Tensor:
        return self.scale * (self.B * self.gate) @ self.A  # (out, in)

    def lora_factors(self) -> tuple[Tensor, Tensor]:
        return self.A, self.scale * (self.B * self.gate)  # gates at 0 give zero columns

    @torch.no_grad()
    def proximal_step(self, xi: float, threshold: str) -> None:
        """Soft-threshold the gate (the proximal operator of xi * |g|_1); with the official band,
        then zero what is left below xi, so every |g| < 2 xi ends at 0."""
        shrunk = self.gate.sign() * (self.gate.abs() - xi).clamp_min(0)
        if threshold == "official":
            shrunk = torch.where(shrunk.abs() < xi, torch.zeros_like(shrunk), shrunk)
        self.gate.copy_(shrunk)

    def kept(self) -> Tensor:
        """Indices of the ranks whose gate is not zero."""
        return torch.nonzero(self.gate.detach() != 0).flatten()


@register("sora")
@dataclass
class SoRA(MethodConfig):
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    xi: float = 1e-3  # gate threshold applied after every optimizer step
    l1: float = 1e-3  # weight of mean(|g|) in the loss; 0 turns the term off
    threshold: str = "official"  # "official": zero |g| < 2 xi (soft, then hard); "soft": the paper's prox

    step_hook = True
    adds_loss = True
    trainable_formula = "r * (in + out + 1) per site (fewer after pruning: kept * (in + out))"

    def validate(self) -> None:
        self.check_positive_int("r")
        self.check_dropout()
        if self.xi < 0 or self.l1 < 0:
            raise PeftlabError(f"SoRA xi and l1 must be >= 0, got xi={self.xi!r}, l1={self.l1!r}")
        if self.threshold not in THRESHOLDS:
            raise PeftlabError(f"SoRA threshold {self.threshold!r} is unknown: use one of {THRESHOLDS}")

    def validate_site(self, site: Site) -> None:
        site.check_rank(self.r, "SoRA")

    def build(self, site: Site, stats=None, initialize: bool = True) -> SoRAAdapter:
        adapter = SoRAAdapter(site.kind, site.in_features, site.out_features, self.r, self.alpha / self.r,
                              self.dropout, site.weight.dtype)
        if initialize:
            adapter.initialise()
        return adapter

    def after_step(self, adapters: dict[str, Adapter], step: int) -> None:
        for adapter in adapters.values():
            adapter.proximal_step(self.xi, self.threshold)

    def loss(self, adapters: dict[str, Adapter]) -> Tensor | None:
        if self.l1 == 0:
            return None
        gates = torch.cat([a.gate for a in adapters.values()])
        return self.l1 * gates.abs().mean()

    def param_groups(self, adapters: dict[str, Adapter], lr: float) -> list[dict]:
        factors = [p for a in adapters.values() for p in (a.A, a.B) if p.requires_grad]
        gates = [a.gate for a in adapters.values() if a.gate.requires_grad]
        return [{"params": factors, "lr": lr}, {"params": gates, "lr": lr, "weight_decay": 0.0}]


def to_lora(model: nn.Module, name: str = "default") -> tuple[LoRA, dict[str, Tensor]]:
    """The plain LoRA equal to SoRA adapter `name`: its config and its adapter tensors.

    Per site only ranks with a non-zero gate are kept: A' = A[kept], B' = B[:, kept] * g[kept],
    r' = len(kept), alpha' = s * r' (so alpha'/r' = s). Sites with no gate left are dropped.
    The tensors are keyed as in the model, ready for `peftlab.attach(base, config, name,
    state_dict=tensors)` on a model without adapter `name`.
    """
    config, sites = adapter_configs(model).get(name), adapters_of(model, name)
    if not isinstance(config, SoRA):
        raise PeftlabError(f"adapter {name!r} is {config.method!r}, not SoRA: to_lora converts SoRA adapters only")
    targets, overrides, tensors = [], {}, {}
    for site, adapter in sites.items():
        kept = adapter.kept()
        if len(kept) == 0:
            continue
        targets.append(site)
        overrides[site] = {"r": len(kept), "alpha": adapter.scale * len(kept)}
        prefix = f"{site}.{ADAPTERS}.{name}."
        tensors[prefix + "A"] = adapter.A.detach()[kept].clone()
        tensors[prefix + "B"] = (adapter.B.detach()[:, kept] * adapter.gate.detach()[kept]).clone()
    if not targets:
        raise PeftlabError(f"every gate of SoRA adapter {name!r} is zero, so no rank is left to keep: "
                           "train with a smaller xi or l1")
    rank = max(o["r"] for o in overrides.values())
    lora = LoRA(r=rank, alpha=float(rank), dropout=config.dropout, targets=targets, overrides=overrides,
                also_train=list(config.also_train))
    return lora, tensors


def prune(model: nn.Module, name: str = "default") -> nn.Module:
    """Replace SoRA adapter `name` by its pruned plain LoRA (same name, same outputs). In place."""
    lora, tensors = to_lora(model, name)
    # detach puts also_train modules back to their base values; keep what training made of them.
    trained = {k: p.detach().clone() for k, p in also_train_parameters(model, list(lora.also_train)).items()}
    detach(model, name)
    attach(model, lora, name, state_dict=tensors)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, value in trained.items():
            params[k].copy_(value)
    return model
