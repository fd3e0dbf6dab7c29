"""AdaLoRA: adaptive rank budget allocation (Zhang et al. 2023, ICLR, arXiv 2303.10512).

Zhang, Chen, Bukharin, Karampatziakis, He, Cheng, Chen, Zhao, "AdaLoRA: Adaptive Budget
Allocation for Parameter-Efficient Fine-Tuning".

The update is parametrised like an SVD, and its singular values are pruned during training
toward a total rank budget, by an importance score:

    h = W0 x + s * P diag(lam) Q dropout(x)       dW = s * P diag(lam) Q       s = alpha / init_r
    P: (out, r) left vectors    lam: (r,) singular values    Q: (r, in) right vectors
    R(P, Q) = ||P^T P - I||_F + ||Q Q^T - I||_F   (mean over matrices, times orth_reg_weight)

Trained: P, lam, Q. Init: lam = 0 (output unchanged), P, Q ~ N(0, 0.02^2) (as `peft`).

Pruning (the training loop calls peftlab.step(model, step) after optimizer.step() and BEFORE
optimizer.zero_grad(): the sensitivity needs this step's gradients):
  - sensitivity of each entry w: I = |w * dL/dw|; smoothed  I_bar <- b1 I_bar + (1-b1) I;
    uncertainty U_bar <- b2 U_bar + (1-b2) |I - I_bar|; score s(w) = I_bar * U_bar
  - score of triplet i: s(lam_i) + mean_j s(Q_ij) + mean_k s(P_ki)
  - budget b(t): init_r * sites until tinit; then cubic decay
        b(t) = target + (init - target) * (1 - (t - tinit) / (T - tfinal - tinit))^3
    to target_r * sites at T - tfinal (T = total_steps); every delta_t steps the lam_i with the
    lowest scores are set to 0 until b(t) remain (they keep training and may come back at the next
    allocation); from T - tfinal on the final mask is frozen and re-applied after each step.
With transformers' Trainer that is a TrainerCallback's on_optimizer_step (its on_step_end comes
after zero_grad, when the gradients are gone; the hook then raises a PeftlabError saying so).
Steps are numbered as the training loop numbers them (the schedule compares `step` with tinit,
T - tfinal; `peft`'s update_and_allocate(global_step) reads it the same way).

The kept-rank mask is a buffer saved with the adapter; the smoothed scores are training state and
are not saved (a resumed run restarts them from zero). Names map to `peft`'s AdaLoraConfig:
total_steps = total_step, delta_t = deltaT, P/lam/Q = lora_B/lora_E/lora_A. One difference: `peft`
divides by (ranknum + 1e-5) where this divides by init_r (relative difference 1e-5 / init_r).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core import Adapter
from ..errors import PeftlabError
from ..hosts import HostKind
from ..registry import MethodConfig, Site, register

FACTORS = ("P", "lam", "Q")


class AdaLoRAAdapter(Adapter):
    def __init__(self, kind: HostKind, in_features: int, out_features: int, r: int, scale: float,
                 dropout: float, dtype: torch.dtype):
        super().__init__(kind)
        self.scale = scale
        self.P = nn.Parameter(torch.zeros(out_features, r, dtype=dtype))  # (out, r)
        self.lam = nn.Parameter(torch.zeros(r, dtype=dtype))  # (r,)
        self.Q = nn.Parameter(torch.zeros(r, in_features, dtype=dtype))  # (r, in)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.register_buffer("kept", torch.ones(r, dtype=torch.bool))  # ranks the last allocation kept
        for name in FACTORS:  # smoothed sensitivity and uncertainty: training state, not saved
            shape = getattr(self, name).shape
            self.register_buffer(f"{name}_importance", torch.zeros(shape), persistent=False)
            self.register_buffer(f"{name}_uncertainty", torch.zeros(shape), persistent=False)

    def forward(self, host: nn.Module, x: Tensor, base) -> Tensor:
        h = self.kind.apply_in(host, self.dropout(x), self.Q * self.lam[:, None])  # (..., r)
        return base(x) + self.kind.apply_out(host, h, self.P) * self.scale

    def delta_weight(self) -> Tensor:
        return self.scale * (self.P @ (self.Q * self.lam[:, None]))  # (out, in)

    def lora_factors(self) -> tuple[Tensor, Tensor]:
        return self.Q * self.lam[:, None], self.scale * self.P  # pruned triplets give zero rows

    def orthogonality(self) -> list[Tensor]:
        """||P^T P - I||_F and ||Q Q^T - I||_F."""
        eye = torch.eye(self.lam.shape[0], dtype=self.P.dtype, device=self.P.device)
        return [torch.linalg.matrix_norm(self.P.T @ self.P - eye), torch.linalg.matrix_norm(self.Q @ self.Q.T - eye)]

    @torch.no_grad()
    def update_sensitivity(self, beta1: float, beta2: float) -> None:
        for name in FACTORS:
            param = getattr(self, name)
            if param.grad is None:
                raise PeftlabError(
                    "AdaLoRA's step hook needs this step's gradients: call peftlab.step(model, step) after "
                    "optimizer.step() and before optimizer.zero_grad()"
                )
            importance = (param * param.grad).abs()
            smoothed = getattr(self, f"{name}_importance").mul_(beta1).add_((1 - beta1) * importance)
            getattr(self, f"{name}_uncertainty").mul_(beta2).add_((1 - beta2) * (importance - smoothed).abs())

    def reset_sensitivity(self) -> None:
        for name in FACTORS:
            getattr(self, f"{name}_importance").zero_()
            getattr(self, f"{name}_uncertainty").zero_()

    def triplet_scores(self) -> Tensor:
        """(r,): the score of each (P[:, i], lam_i, Q[i]) triplet."""
        score = {name: getattr(self, f"{name}_importance") * getattr(self, f"{name}_uncertainty") for name in FACTORS}
        return score["lam"] + (score["Q"].mean(1) + score["P"].mean(0))

    @torch.no_grad()
    def apply_mask(self) -> None:
        self.lam.masked_fill_(~self.kept, 0.0)


@register("adalora")
@dataclass
class AdaLoRA(MethodConfig):
    init_r: int = 12
    target_r: int = 8  # the average rank per site at the end
    alpha: float = 8.0
    dropout: float = 0.0
    total_steps: int = 0  # required: the training length T
    tinit: int = 0  # steps at the full budget before pruning starts
    tfinal: int = 0  # steps at the final budget (the mask is frozen) at the end
    delta_t: int = 1  # steps between two allocations
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5

    hosts = ("linear", "conv1d", "conv2d")
    step_hook = True
    adds_loss = True
    run_fields = ("total_steps",)  # filled by the training recipe when unset
    trainable_formula = "init_r * (in + out + 1) per site (ranks pruned by zeroing lam, not removed)"

    def validate(self) -> None:
        self.check_positive_int("init_r", "target_r", "delta_t")
        if self.target_r > self.init_r:
            raise PeftlabError(f"AdaLoRA prunes from init_r={self.init_r} down to target_r={self.target_r}: "
                               "target_r must be <= init_r")
        if not isinstance(self.total_steps, int) or self.total_steps <= 0:
            raise PeftlabError("AdaLoRA needs total_steps (the number of training steps) to schedule its budget: "
                               "e.g. peftlab.AdaLoRA(total_steps=1000, ...)")
        if self.tinit < 0 or self.tfinal < 0 or self.tinit >= self.total_steps - self.tfinal:
            raise PeftlabError(f"AdaLoRA schedule leaves no pruning phase: need 0 <= tinit < total_steps - tfinal "
                               f"(tinit={self.tinit}, tfinal={self.tfinal}, total_steps={self.total_steps})")
        if not (0 < self.beta1 < 1 and 0 < self.beta2 < 1):
            raise PeftlabError(f"AdaLoRA beta1, beta2 must be in (0, 1), got {self.beta1}, {self.beta2}")
        if self.orth_reg_weight < 0:
            raise PeftlabError(f"AdaLoRA orth_reg_weight must be >= 0, got {self.orth_reg_weight}")
        self.check_dropout()

    def validate_site(self, site: Site) -> None:
        site.check_rank(self.init_r, field="init_r")

    def build(self, site: Site, stats=None, initialize: bool = True) -> AdaLoRAAdapter:
        adapter = AdaLoRAAdapter(site.kind, site.in_features, site.out_features, self.init_r, self.alpha / self.init_r,
                                 self.dropout, site.weight.dtype)
        if initialize:
            with torch.no_grad():
                nn.init.normal_(adapter.Q, std=0.02)
                nn.init.normal_(adapter.P, std=0.02)
        return adapter

    # ---- training-time behaviour -------------------------------------------------------------

    def loss(self, adapters: dict[str, AdaLoRAAdapter]) -> Tensor:
        norms = [n for a in adapters.values() for n in a.orthogonality()]
        return self.orth_reg_weight * torch.stack(norms).mean()

    def budget(self, step: int, initial: int, target: int) -> tuple[int, bool]:
        """(total rank budget at this step, whether to re-allocate now)."""
        end = self.total_steps - self.tfinal
        if step <= self.tinit:
            return initial, False
        if step > end:
            return target, True
        remaining = 1 - (step - self.tinit) / (end - self.tinit)
        return int((initial - target) * remaining**3 + target), step % self.delta_t == 0

    def after_step(self, adapters: dict[str, AdaLoRAAdapter], step: int) -> None:
        sites = list(adapters.values())
        initial = sum(a.lam.shape[0] for a in sites)
        target = self.target_r * len(sites)
        end = self.total_steps - self.tfinal
        if step < end:
            for a in sites:
                a.update_sensitivity(self.beta1, self.beta2)
            budget, due = self.budget(step, initial, target)
            if due:
                self._keep_best(sites, initial - budget)
        elif step == end:  # the final allocation; from here on the mask is fixed
            self._keep_best(sites, initial - target)
            for a in sites:
                a.reset_sensitivity()
        else:
            for a in sites:
                a.apply_mask()

    @staticmethod
    @torch.no_grad()
    def _keep_best(sites: list[AdaLoRAAdapter], n_pruned: int) -> None:
        """Zero the n_pruned triplets with the lowest scores over all sites (ties at the cut go too)."""
        scores = [a.triplet_scores() for a in sites]
        threshold = torch.kthvalue(torch.cat(scores), n_pruned).values if n_pruned > 0 else None
        for a, s in zip(sites, scores):
            a.kept.copy_(s > threshold if threshold is not None else torch.ones_like(a.kept))
            a.apply_mask()
