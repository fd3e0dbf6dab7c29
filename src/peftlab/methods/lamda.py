"""LaMDA: an r x r core between a frozen A and a gradually frozen B (Azizi et al. 2024, arXiv 2406.12832).

Paper: Seyedarmin Azizi, Souvik Kundu, Massoud Pedram, "LaMDA: Large Model Fine-Tuning via
Spectrally Decomposed Low-Dimensional Adaptation", EMNLP Findings 2024, arXiv 2406.12832.
Official code: ArminAzizi98/LaMDA (`lamda.py`, and `gradual_freeze_B` in `custom_trainer.py`).

    h  = W0 x + s * B Sigma A dropout(x)         W' = W0 + s * B @ Sigma @ A        s = alpha / r
    A: (r, in) frozen.  Sigma: (r, r) trained.  B: (out, r) trained, its columns frozen one by one.

Initialisation (as the official code, which builds LaMDA on a default `peft` LoRA layer):
A ~ kaiming-uniform(a=sqrt(5)), B = 0, Sigma ~ kaiming-uniform(a=sqrt(5)) (nn.Linear(r, r)'s
default). B = 0 keeps the output unchanged at attach.

Freezing schedule (after each optimizer step, `peftlab.step(model, step)`, `step` = optimizer
steps done so far): the first

    t(step) = min(r, floor(step / (eta * total_steps)))

columns of B are frozen, one more every eta * total_steps steps, as the official trainer does
(eta = 0.3 there, so three columns freeze within one run; to freeze all of B within the first
fraction f of training, set eta = f / r). A frozen column keeps the value it had when frozen
exactly (it is read from a buffer, so neither momentum nor weight decay can move it); once all
r columns are frozen B stops taking gradients. `total_steps` is required for the schedule.

Not implemented: LaMDA++'s rank allocation and the SVD-based initialisation the paper describes
(neither is in the official code, and their details are not in any text reachable here).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core import Adapter
from ..errors import PeftlabError
from ..hosts import HostKind
from ..registry import MethodConfig, Site, register


class LaMDAAdapter(Adapter):
    def __init__(self, kind: HostKind, in_features: int, out_features: int, r: int, scale: float,
                 dropout: float, dtype: torch.dtype):
        super().__init__(kind)
        self.scale = scale
        self.register_buffer("A", torch.zeros(r, in_features, dtype=dtype))  # frozen, (r, in)
        self.Sigma = nn.Parameter(torch.zeros(r, r, dtype=dtype))  # (r, r), applied as h @ Sigma^T
        self.B = nn.Parameter(torch.zeros(out_features, r, dtype=dtype))  # (out, r)
        self.register_buffer("B_frozen", torch.zeros(out_features, r, dtype=dtype))  # values of frozen columns
        self.register_buffer("frozen_columns", torch.zeros((), dtype=torch.long))
        self.register_buffer("column", torch.arange(r), persistent=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def initialise(self) -> None:
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.Sigma, a=math.sqrt(5))
            self.B.zero_()

    def effective_B(self) -> Tensor:
        """B with its frozen columns read from the frozen copy. (out, r)"""
        return torch.where(self.column < self.frozen_columns, self.B_frozen, self.B)

    def forward(self, host: nn.Module, x: Tensor, base) -> Tensor:
        h = self.kind.apply_in(host, self.dropout(x), self.A)  # (..., r)
        h = self.kind.apply_out(host, h, self.Sigma) * self.scale  # (..., r)
        return self.kind.add_out(host, base(x), h, self.effective_B())

    def delta_weight(self) -> Tensor:
        return self.scale * (self.effective_B() @ self.Sigma @ self.A)  # (out, in)

    def lora_factors(self) -> tuple[Tensor, Tensor]:
        return self.Sigma @ self.A, self.scale * self.effective_B()

    @torch.no_grad()
    def freeze_columns(self, count: int) -> None:
        """Freeze the first `count` columns of B (never unfreezes)."""
        r = self.B.shape[1]
        count, done = min(count, r), int(self.frozen_columns)
        if count > done:
            self.B_frozen[:, done:count] = self.B[:, done:count]
            self.frozen_columns.fill_(count)
        if count == r:
            self.B.requires_grad_(False)


@register("lamda")
@dataclass
class LaMDA(MethodConfig):
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    eta: float = 0.3  # one more column of B freezes every eta * total_steps optimizer steps
    total_steps: int | None = None  # the run's optimizer steps; needed by the freezing schedule

    step_hook = True
    run_fields = ("total_steps",)  # filled by the training recipe when unset
    trainable_formula = "r * r + out * r per site (B's columns freeze during training)"

    def validate(self) -> None:
        self.check_positive_int("r")
        self.check_dropout()
        if not self.eta > 0:
            raise PeftlabError(f"LaMDA eta must be > 0 (a fraction of total_steps, e.g. 0.3), got {self.eta!r}")
        self.check_positive_int("total_steps", optional=True)

    def validate_site(self, site: Site) -> None:
        site.check_rank(self.r, "LaMDA")

    def build(self, site: Site, stats=None, initialize: bool = True) -> LaMDAAdapter:
        adapter = LaMDAAdapter(site.kind, site.in_features, site.out_features, self.r, self.alpha / self.r,
                               self.dropout, site.weight.dtype)
        if initialize:
            adapter.initialise()
        return adapter

    def frozen_columns_at(self, step: int) -> int:
        """How many columns of B the schedule has frozen after `step` optimizer steps (each site caps it at its r)."""
        if self.total_steps is None:
            raise PeftlabError("LaMDA freezes B on a schedule over the run: set LaMDA(total_steps=<optimizer steps>)")
        return int(step / (self.eta * self.total_steps))

    def after_step(self, adapters: dict[str, Adapter], step: int) -> None:
        count = self.frozen_columns_at(step)
        for adapter in adapters.values():
            adapter.freeze_columns(count)
