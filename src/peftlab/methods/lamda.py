"""LaMDA: an r x r core between a frozen A and a gradually frozen B (Azizi et al. 2024, arXiv 2406.12832).

Paper: Seyedarmin Azizi, Souvik Kundu, Massoud Pedram, "LaMDA: Large Model Fine-Tuning via
Spectrally Decomposed Low-Dimensional Adaptation", EMNLP Findings 2024, arXiv 2406.12832.
Official code: ArminAzizi98/LaMDA (`lamda.py`, and `gradual_freeze_B` in `custom_trainer.py`).

    h  = W0 x + s * B Sigma A dropout(x)         W' = W0 + s * B @ Sigma @ A        s = alpha / r
    A: (r, in) frozen.  Sigma: (r, r) trained.  B: (out, r) trained, its columns frozen one by one.

Two variants; the official code's is the default, the paper's an option:

  official (default: init="random", eta=0.3)  as the released code, which builds LaMDA on a
      default `peft` LoRA layer: A ~ kaiming-uniform(a=sqrt(5)), B = 0, Sigma ~
      kaiming-uniform(a=sqrt(5)) (nn.Linear(r, r)'s default); B = 0 keeps the output unchanged.
      One more column of B freezes every eta * total_steps steps: t(step) = min(r,
      floor(step / (eta * total_steps))). With eta = 0.3 only 3 of r = 8 columns ever freeze.
  paper (init="svd", freeze_within=0.3)  the paper initialises the projections from W0's
      singular vectors and freezes B completely early in training ("after t_i iterations, PMB
      is completely frozen"). Here, with the top-r SVD W0 ~ U_r diag(S_r) V_r^T:
      A = V_r^T, B = U_r, Sigma = diag(S_r) / s, and the host holds W0 - U_r diag(S_r) V_r^T
      while attached (as PiSSA), so the output is unchanged at attach. All r columns freeze
      evenly within the first `freeze_within` of the run: t(step) = min(r, floor(step * r /
      (freeze_within * total_steps))); freeze_within replaces eta when set.

Why the official one is the default: it is the procedure that was released and runs; the
paper's own method section (how Sigma starts, when t_i falls) is not reachable here, only its
abstract and summaries of it, so the paper variant is our reading: the PiSSA-style split above
and freeze_within = 0.3 (the official eta reused as the share of the run by which all of B is
frozen). Columns freeze in index order, which with init="svd" is the order of the singular
values, largest first ("gradually freezes based on the singular values").

The freezing runs after each optimizer step (`peftlab.step(model, step)`, `step` = optimizer
steps done so far). A frozen column keeps the value it had when frozen exactly (it is read
from a buffer, so neither momentum nor weight decay can move it); once all r columns are
frozen B stops taking gradients. `total_steps` is required for the schedule.

Not implemented: LaMDA++'s rank allocation (not in the official code, details not reachable).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core import Adapter
from ..errors import PeftlabError
from ..hosts import HostKind
from ..linalg import top_r_svd
from ..registry import MethodConfig, Site, register

INITS = ("random", "svd")


class LaMDAAdapter(Adapter):
    def __init__(self, kind: HostKind, in_features: int, out_features: int, r: int, scale: float,
                 dropout: float, from_svd: bool, dtype: torch.dtype):
        super().__init__(kind)
        self.scale = scale
        self.register_buffer("A", torch.zeros(r, in_features, dtype=dtype))  # frozen, (r, in)
        self.Sigma = nn.Parameter(torch.zeros(r, r, dtype=dtype))  # (r, r), applied as h @ Sigma^T
        self.B = nn.Parameter(torch.zeros(out_features, r, dtype=dtype))  # (out, r)
        self.register_buffer("B_frozen", torch.zeros(out_features, r, dtype=dtype))  # values of frozen columns
        self.register_buffer("frozen_columns", torch.zeros((), dtype=torch.long))
        self.register_buffer("column", torch.arange(r), persistent=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.has_residual = from_svd
        if from_svd:  # the initial B and Sigma: the host gives up s * B0 @ Sigma0 @ A while attached
            self.register_buffer("B0", torch.zeros(out_features, r, dtype=dtype))
            self.register_buffer("Sigma0", torch.zeros(r, r, dtype=dtype))

    def initialise(self) -> None:
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.Sigma, a=math.sqrt(5))
            self.B.zero_()

    def initialise_from_svd(self, U: Tensor, S: Tensor, Vh: Tensor) -> None:
        """A = V_r^T, B = U_r, Sigma = diag(S_r) / s: s B Sigma A is W0's top-r part."""
        with torch.no_grad():
            self.A.copy_(Vh)
            self.B.copy_(U)
            self.Sigma.copy_(torch.diag(S) / self.scale)
            self.B0.copy_(self.B)
            self.Sigma0.copy_(self.Sigma)

    def effective_B(self) -> Tensor:
        """B with its frozen columns read from the frozen copy. (out, r)"""
        return torch.where(self.column < self.frozen_columns, self.B_frozen, self.B)

    def forward(self, host: nn.Module, x: Tensor, base) -> Tensor:
        h = self.kind.apply_in(host, self.dropout(x), self.A)  # (..., r)
        h = self.kind.apply_out(host, h, self.Sigma) * self.scale  # (..., r)
        return self.kind.add_out(host, base(x), h, self.effective_B())

    def delta_weight(self) -> Tensor:
        return self.scale * (self.effective_B() @ self.Sigma @ self.A)  # (out, in)

    def residual(self) -> Tensor:
        return self.scale * (self.B0 @ self.Sigma0 @ self.A)  # (out, in)

    def lora_factors(self) -> tuple[Tensor, Tensor]:
        if not self.has_residual:
            return self.Sigma @ self.A, self.scale * self.effective_B()
        # relative to the original W0: s (B Sigma - B0 Sigma0) A = [s B, -s B0] @ [Sigma A; Sigma0 A], rank 2r
        return (torch.cat([self.Sigma @ self.A, self.Sigma0 @ self.A]),
                self.scale * torch.cat([self.effective_B(), -self.B0], dim=1))

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
    init: str = "random"  # "random": the official code's; "svd": the paper's, from W0's singular vectors
    eta: float = 0.3  # one more column of B freezes every eta * total_steps optimizer steps
    freeze_within: float | None = None  # the paper's schedule: all of B frozen within this share of the run
    total_steps: int | None = None  # the run's optimizer steps; needed by the freezing schedule

    step_hook = True
    run_fields = ("total_steps",)  # filled by the training recipe when unset
    trainable_formula = "r * r + out * r per site (B's columns freeze during training)"

    def validate(self) -> None:
        self.check_positive_int("r")
        self.check_dropout()
        if self.init not in INITS:
            raise PeftlabError(f"LaMDA init {self.init!r} is unknown: use one of {INITS}")
        if not self.eta > 0:
            raise PeftlabError(f"LaMDA eta must be > 0 (a fraction of total_steps, e.g. 0.3), got {self.eta!r}")
        if self.freeze_within is not None and not 0 < self.freeze_within <= 1:
            raise PeftlabError(f"LaMDA freeze_within must be in (0, 1] (the share of the run by which all of B "
                               f"is frozen, e.g. 0.3), got {self.freeze_within!r}")
        self.check_positive_int("total_steps", optional=True)

    def validate_site(self, site: Site) -> None:
        site.check_rank(self.r, "LaMDA")

    def build(self, site: Site, stats=None, initialize: bool = True) -> LaMDAAdapter:
        from_svd = self.init == "svd"
        adapter = LaMDAAdapter(site.kind, site.in_features, site.out_features, self.r, self.alpha / self.r,
                               self.dropout, from_svd, site.weight.dtype)
        if initialize and from_svd:
            U, S, Vh = top_r_svd(site.weight.detach().float(), self.r)
            adapter.initialise_from_svd(U.to(site.weight.dtype), S.to(site.weight.dtype), Vh.to(site.weight.dtype))
        elif initialize:
            adapter.initialise()
        return adapter

    def frozen_columns_at(self, step: int, r: int) -> int:
        """How many of a site's r columns of B the schedule has frozen after `step` optimizer steps."""
        if self.total_steps is None:
            raise PeftlabError("LaMDA freezes B on a schedule over the run: set LaMDA(total_steps=<optimizer steps>)")
        if self.freeze_within is not None:
            return min(r, int(step * r / (self.freeze_within * self.total_steps)))
        return min(r, int(step / (self.eta * self.total_steps)))

    def after_step(self, adapters: dict[str, Adapter], step: int) -> None:
        for adapter in adapters.values():
            adapter.freeze_columns(self.frozen_columns_at(step, adapter.B.shape[1]))
