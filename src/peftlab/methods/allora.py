"""ALLoRA: Adaptive Learning Rate Mitigates LoRA Fatal Flaws (Huang & Balestriero 2024, arXiv 2410.09692).

The model is LoRA without dropout and without a scaling factor (s = 1):

    h = W0 x + B A x                    W' = W0 + B @ A
    A: (r, in) kaiming-uniform, B: (out, r) = 0. Trained: A and B. W0 is frozen.

What changes is the training dynamics. The paper scales each parameter's gradient by a
coefficient inversely proportional to that parameter's l2 norm, so B, which starts at 0,
escapes from 0 fast, and parameters that have grown large move slowly. Its exact coefficient
(and how parameters are grouped) is not in any text reachable when this was written: only the
abstract was found ("scaling the per sample and per parameter gradients with a coefficient
inversely proportional to parameters' l2 norm"). This file implements the family

    c(theta_g) = 1 / sqrt(||theta_g||^2 + 1/eta^2)      form="sqrt"   (default)
    c(theta_g) = 1 / (||theta_g|| + 1/eta)              form="linear"

for each group g: a row of A and a column of B (granularity="vector", the default: one group
per rank component and factor), or the whole of A and the whole of B (granularity="matrix").
Both forms give c = eta at theta_g = 0 and c ~ 1 / ||theta_g|| for large norms; eta caps the
rate at which a zero group can start.

Where the rate acts. Scaling the *gradient* does nothing under Adam-like optimizers, whose
m / sqrt(v) normalises any per-parameter constant away. So the coefficient scales the *update*
the optimizer made, after it made it:

    theta <- theta_prev + c(theta_prev) * (theta - theta_prev)

in `after_step`, which `peftlab.step(model, step)` calls after each optimizer step (the
training recipe does; a transformers TrainerCallback or a custom loop can). theta_prev is a
non-persistent buffer refreshed each step, and set to the loaded values by load_state_dict.
Under SGD without momentum this equals scaling the gradient, as the paper does. A loop that
never calls peftlab.step trains plain LoRA with s = 1 and no dropout: nothing else differs.

The whole step the optimizer made is rescaled, AdamW's decoupled weight decay included. A
loop that skips peftlab.step for some steps gets those updates rescaled together at its next
call; after editing A or B by hand, call the adapter's `remember()`.

Default eta = 4, from a quick run: MiniLM-L6 + linear head on movie sentiment, r = 8 on
query/value, AdamW lr 5e-4, batch 16, 100 steps. Mean training loss over the last 50 steps
(seed 0):

    eta          1      2      4      8      16   |  LoRA s=1   LoRA s=2 (alpha 16)
    loss       0.679  0.635  0.614  0.608  0.607  |   0.674      0.643

The gain flattens past eta = 4, and held-out accuracy (600 examples) was highest at 4 on both
seeds tried (0.768 and 0.773; eta = 16: 0.753 and 0.762; LoRA s=1: 0.743 and 0.767). 4 is
the smallest eta with most of the gain, and keeps B's first steps at 4x the optimizer's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import PeftlabError
from ..hosts import ALL_KINDS, HostKind
from ..registry import MethodConfig, Site, register
from .lora import LoRAAdapter, initialise

GRANULARITIES = ("vector", "matrix")
FORMS = ("sqrt", "linear")


def rate(norms: Tensor, eta: float, form: str) -> Tensor:
    """The coefficient c for groups with these l2 norms (any shape)."""
    if form == "sqrt":
        return torch.rsqrt(norms.square() + 1 / eta**2)
    return 1 / (norms + 1 / eta)


def _remember_after_load(adapter: "ALLoRAAdapter", incompatible_keys) -> None:
    adapter.remember()  # the loaded values, not the ones built before loading, are the reference


class ALLoRAAdapter(LoRAAdapter):
    """LoRA with s = 1 and no dropout, plus the parameters as the last optimizer step left them."""

    def __init__(self, kind: HostKind, in_features: int, out_features: int, r: int, dtype: torch.dtype):
        super().__init__(kind, in_features, out_features, r, scale=1.0, dropout=0.0, dtype=dtype)
        # Not saved: a loaded adapter takes its loaded values as the reference (the hook below).
        self.register_buffer("A_prev", torch.zeros_like(self.A), persistent=False)  # (r, in)
        self.register_buffer("B_prev", torch.zeros_like(self.B), persistent=False)  # (out, r)
        self.register_load_state_dict_post_hook(_remember_after_load)

    @torch.no_grad()
    def remember(self) -> None:
        """Take the current A and B as the reference of the next update."""
        self.A_prev.copy_(self.A)
        self.B_prev.copy_(self.B)

    @torch.no_grad()
    def rescale_update(self, eta: float, form: str, granularity: str) -> None:
        """theta <- theta_prev + c(theta_prev) * (theta - theta_prev), for A and for B."""
        # The dimension each group spans: a row of A runs over `in` (dim 1), a column of B over `out` (dim 0).
        for theta, prev, group_dim in ((self.A, self.A_prev, 1), (self.B, self.B_prev, 0)):
            if granularity == "vector":
                norms = torch.linalg.vector_norm(prev.float(), dim=group_dim, keepdim=True)  # (r, 1) or (1, r)
            else:
                norms = torch.linalg.vector_norm(prev.float())  # ()
            c = rate(norms, eta, form).to(theta.dtype)
            theta.sub_(prev).mul_(c).add_(prev)
            prev.copy_(theta)


@register("allora")
@dataclass
class ALLoRA(MethodConfig):
    r: int = 8
    eta: float = 4.0  # c(0): a zero group (B at init) moves eta times the optimizer's step; see above
    granularity: str = "vector"  # "vector": each row of A, each column of B; "matrix": A, B whole
    form: str = "sqrt"  # "sqrt": 1 / sqrt(||theta||^2 + 1/eta^2); "linear": 1 / (||theta|| + 1/eta)

    hosts = ALL_KINDS
    step_hook = True
    trainable_formula = "r * (in + out) per site"

    def validate(self) -> None:
        self.check_positive_int("r")
        if not isinstance(self.eta, (int, float)) or not math.isfinite(self.eta) or self.eta <= 0:
            raise PeftlabError(f"ALLoRA eta must be a positive finite number (the rate of a zero group), "
                               f"got {self.eta!r}")
        if self.granularity not in GRANULARITIES:
            raise PeftlabError(f"ALLoRA granularity {self.granularity!r} is unknown; choose one of {GRANULARITIES}")
        if self.form not in FORMS:
            raise PeftlabError(f"ALLoRA form {self.form!r} is unknown; choose one of {FORMS}")

    def validate_site(self, site: Site) -> None:
        site.check_rank(self.r)

    def build(self, site: Site, stats=None, initialize: bool = True) -> ALLoRAAdapter:
        weight = site.weight
        adapter = ALLoRAAdapter(site.kind, site.in_features, site.out_features, self.r, weight.dtype)
        if initialize:
            initialise(adapter, "kaiming", weight, None)
            adapter.remember()
        return adapter

    def after_step(self, adapters: dict[str, nn.Module], step: int) -> None:
        for adapter in adapters.values():
            adapter.rescale_update(self.eta, self.form, self.granularity)
