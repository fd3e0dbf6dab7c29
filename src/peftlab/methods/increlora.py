"""IncreLoRA: add rank where it matters, up to a budget (Zhang et al. 2023, arXiv 2308.12043).

Paper: Feiyu Zhang, Liangzhi Li, Junhao Chen, Zhouqiang Jiang, Bowen Wang, Yiming Qian,
"IncreLoRA: Incremental Parameter Allocation Method for Parameter-Efficient Fine-tuning",
2023, arXiv 2308.12043. Official code: FeiyuZhang98/IncreLoRA (`loralib/loralib/increlora.py`,
the orthogonality term in `NLU/src/transformers/trainer.py`).

    h = W0 x + s * B (e * (A dropout(x)))       W' = W0 + s * (B * e) @ A       s = alpha / rank
    A: (k, in), B: (out, k), e: (k,), k = the ranks in use. Trained: A, B, e.

Initialisation (official): rank r (default 1) per site, A, B ~ N(0, 0.02), e = 0, so the
output is unchanged at attach. s = alpha / rank uses the current rank.

Growth, after each optimizer step (`peftlab.step(model, step)`, `step` = optimizer steps done):
  - sensitivity of a site: I = sum|dW * dL/d(dW)| / sqrt(numel(dW)), measured on each backward
    pass (dL/d(dW) = grad_out^T x, the weight gradient of the adapter's update);
  - smoothed: I_bar <- b1 I_bar + (1 - b1) I,  U_bar <- b2 U_bar + (1 - b2) |I - I_bar|;
    score = I_bar * U_bar (b1 = b2 = 0.85);
  - every `interval` steps after `warmup`, the `top_h` sites with the highest score each get
    `rank_step` more ranks, until the total rank reaches the budget (target_rank per site on
    average, or target_total_rank);
  - "advance learning": each site keeps `rank_step` reserve ranks whose A, B already train,
    with e fixed at 1e-5; a site that is chosen turns its reserve into trained ranks (e starts
    at 1e-5) and opens a fresh reserve (A, B ~ N(0, 0.02)). When the budget is reached the
    reserves are closed and growth stops.
Loss (`peftlab.regularization(model)`): orth_reg * mean over sites of ||A A^T - I||_F and
||B^T B - I||_F, over the ranks in use and in reserve.

Choices and deviations:
  - Shapes never change: each site holds storage for `max_rank` ranks (default 3 x target_rank)
    and a persistent `rank` / `reserve` count says how many are in use, so optimizers keep
    their parameters and a saved adapter loads with its current ranks. Storage beyond the used
    ranks gets no gradient (e = 0 there). A site whose storage is full is skipped when ranks
    are handed out (the official code has no per-site cap).
  - The official code opens reserves before the first step; here they open after it, so the
    adapter is exactly the identity at attach.
  - The last allocation is trimmed so the total lands exactly on the budget (the official
    code can overshoot it when rank_step > 1).
  - With gradient accumulation the sensitivities of the micro-batches are summed (the official
    code keeps the last one).
  - rank_step defaults to the official table {2: 1, 4: 2, 6: 3, 8: 4} by target_rank, else
    target_rank // 2. Defaults warmup = interval = 100, top_h = 6, alpha = 16, orth_reg = 0.1
    follow the official GLUE scripts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from ..core import Adapter
from ..errors import PeftlabError
from ..hosts import HostKind
from ..registry import MethodConfig, Site, register

RESERVE_GATE = 1e-5  # e of reserve ranks (official)
INIT_STD = 0.02  # A, B ~ N(0, 0.02) (official)
OFFICIAL_RANK_STEP = {2: 1, 4: 2, 6: 3, 8: 4}


class IncreLoRAAdapter(Adapter):
    def __init__(self, kind: HostKind, in_features: int, out_features: int, r: int, capacity: int,
                 alpha: float, dropout: float, dtype: torch.dtype):
        super().__init__(kind)
        self.alpha = alpha
        self.A = nn.Parameter(torch.zeros(capacity, in_features, dtype=dtype))  # (capacity, in)
        self.B = nn.Parameter(torch.zeros(out_features, capacity, dtype=dtype))  # (out, capacity)
        self.E = nn.Parameter(torch.zeros(capacity, dtype=dtype))  # (capacity,)
        self.register_buffer("rank", torch.tensor(r))  # trained ranks: rows [0, rank)
        self.register_buffer("reserve", torch.tensor(0))  # reserve ranks: rows [rank, rank + reserve)
        self.register_buffer("importance", torch.zeros((), dtype=torch.float32))  # I_bar
        self.register_buffer("uncertainty", torch.zeros((), dtype=torch.float32))  # U_bar
        self.register_buffer("row", torch.arange(capacity), persistent=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.sensitivity: Tensor | None = None  # summed over this step's backward passes
        self.growing = True  # measure sensitivities while ranks are still handed out

    def initialise(self) -> None:
        self.fill_rows(0, int(self.rank))

    @torch.no_grad()
    def fill_rows(self, start: int, stop: int) -> None:
        nn.init.normal_(self.A[start:stop], std=INIT_STD)
        nn.init.normal_(self.B[:, start:stop], std=INIT_STD)

    # ---- the update ------------------------------------------------------------------------

    def gates(self) -> Tensor:
        """e over the storage: trained values, then the fixed reserve value, then 0. (capacity,)"""
        reserve = torch.where(self.row < self.rank + self.reserve, RESERVE_GATE, 0.0).to(self.E.dtype)
        return torch.where(self.row < self.rank, self.E, reserve)

    def scale(self) -> Tensor:
        return self.alpha / self.rank.clamp_min(1)

    def forward(self, host: nn.Module, x: Tensor, base) -> Tensor:
        x_in = self.dropout(x)
        h = self.kind.apply_in(host, x_in, self.A) * (self.gates() * self.scale())  # (..., capacity)
        if not (self.growing and self.training and torch.is_grad_enabled()):
            return self.kind.add_out(host, base(x), h, self.B)
        # While ranks are handed out, the update's own output gradient gives the sensitivity.
        delta = self.kind.apply_out(host, h, self.B)  # (..., out)
        if delta.requires_grad:
            delta.register_hook(partial(self._record_sensitivity, x_in.detach()))
        return base(x) + delta

    def delta_weight(self) -> Tensor:
        return self.scale() * (self.B * self.gates()) @ self.A  # (out, in)

    def lora_factors(self) -> tuple[Tensor, Tensor]:
        return self.A, self.scale() * (self.B * self.gates())

    def _record_sensitivity(self, x: Tensor, grad_out: Tensor) -> None:
        # y = x dW^T, so dL/d(dW) = grad_out^T x: (out, N) @ (N, in)
        grad_weight = grad_out.reshape(-1, grad_out.shape[-1]).T @ x.reshape(-1, x.shape[-1])
        delta = self.delta_weight().detach()
        value = (delta * grad_weight).abs().sum().float() / math.sqrt(delta.numel())
        self.sensitivity = value if self.sensitivity is None else self.sensitivity + value

    # ---- growth ----------------------------------------------------------------------------

    @torch.no_grad()
    def update_score(self, beta1: float, beta2: float) -> None:
        if self.sensitivity is None:
            return
        self.importance.mul_(beta1).add_((1 - beta1) * self.sensitivity)
        self.uncertainty.mul_(beta2).add_((1 - beta2) * (self.sensitivity - self.importance).abs())
        self.sensitivity = None

    def score(self) -> float:
        return float(self.importance * self.uncertainty)

    @torch.no_grad()
    def open_reserve(self, count: int) -> None:
        """Top the reserve up to `count` ranks, as far as the storage allows."""
        used = int(self.rank + self.reserve)
        extra = min(count - int(self.reserve), self.A.shape[0] - used)
        if extra > 0:
            self.fill_rows(used, used + extra)
            self.E[used:used + extra] = 0
            self.reserve += extra

    @torch.no_grad()
    def grow(self, count: int) -> None:
        """Turn `count` reserve ranks into trained ranks; their e starts at the reserve value."""
        rank = int(self.rank)
        self.E[rank:rank + count] = RESERVE_GATE
        self.rank += count
        self.reserve -= count

    def stop_growing(self) -> None:
        self.reserve.zero_()
        self.growing = False
        self.sensitivity = None

    def used_factors(self) -> tuple[Tensor, Tensor]:
        """A and B over the ranks in use and in reserve: (k, in), (out, k)."""
        used = int(self.rank + self.reserve)
        return self.A[:used], self.B[:, :used]


@register("increlora")
@dataclass
class IncreLoRA(MethodConfig):
    r: int = 1  # initial rank per site
    target_rank: int = 8  # average rank per site at the end
    target_total_rank: int | None = None  # the budget over all sites; default target_rank * sites
    max_rank: int | None = None  # storage per site; default 3 * target_rank
    rank_step: int | None = None  # ranks added per chosen site; default from the official table
    alpha: float = 16.0
    dropout: float = 0.0
    warmup: int = 100  # no growth during the first `warmup` steps
    interval: int = 100  # steps between two allocations
    top_h: int = 6  # sites chosen per allocation
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg: float = 0.1
    total_steps: int | None = None  # optional: checks that the budget is reached within the run

    step_hook = True
    adds_loss = True
    run_fields = ("total_steps",)  # filled by the training recipe when unset
    trainable_formula = "rank * (in + out + 1) per site in use; max_rank * (in + out + 1) stored"

    def validate(self) -> None:
        for field in ("r", "target_rank", "warmup", "interval", "top_h"):
            value, least = getattr(self, field), 0 if field == "warmup" else 1
            if not isinstance(value, int) or value < least:
                raise PeftlabError(f"IncreLoRA {field} must be an integer >= {least}, got {value!r}")
        if self.target_total_rank is None and self.target_rank < self.r:
            raise PeftlabError(f"IncreLoRA grows ranks: target_rank={self.target_rank} must be >= "
                               f"the initial r={self.r}")
        if self.capacity < self.r + self.increment:
            raise PeftlabError(f"IncreLoRA max_rank={self.capacity} leaves no room to grow from r={self.r} by "
                               f"rank_step={self.increment}: raise max_rank")
        if not (0 < self.beta1 < 1 and 0 < self.beta2 < 1):
            raise PeftlabError(f"IncreLoRA beta1 and beta2 must be in (0, 1), got {self.beta1!r}, {self.beta2!r}")
        self.check_dropout()

    @property
    def capacity(self) -> int:
        return self.max_rank if self.max_rank is not None else 3 * self.target_rank

    @property
    def increment(self) -> int:
        """Ranks added to a chosen site per allocation."""
        if self.rank_step is not None:
            return self.rank_step
        return OFFICIAL_RANK_STEP.get(self.target_rank, max(1, self.target_rank // 2))

    def validate_site(self, site: Site) -> None:
        site.check_rank(self.capacity, "IncreLoRA", field="max_rank", fix="or a smaller target_rank")

    def build(self, site: Site, stats=None, initialize: bool = True) -> IncreLoRAAdapter:
        adapter = IncreLoRAAdapter(site.kind, site.in_features, site.out_features, self.r, self.capacity, self.alpha,
                                   self.dropout, site.weight.dtype)
        if initialize:
            adapter.initialise()
        return adapter

    # ---- the schedule ----------------------------------------------------------------------

    def budget(self, sites: int) -> int:
        return self.target_total_rank if self.target_total_rank is not None else self.target_rank * sites

    def check_budget(self, adapters: list[IncreLoRAAdapter]) -> None:
        budget, start = self.budget(len(adapters)), sum(int(a.rank) for a in adapters)
        room = sum(a.A.shape[0] for a in adapters)
        if not start <= budget <= room:
            raise PeftlabError(f"IncreLoRA budget {budget} must lie between the starting total rank {start} and "
                               f"the storage {room}: change target_rank / target_total_rank or max_rank")
        if self.total_steps is not None:
            rounds = math.ceil((budget - start) / (self.top_h * self.increment))
            last = (self.warmup // self.interval + rounds) * self.interval
            if last > self.total_steps:
                raise PeftlabError(f"IncreLoRA would reach its budget at step ~{last}, after the run's "
                                   f"{self.total_steps} steps: lower warmup/interval or raise top_h")

    def after_step(self, adapters: dict[str, Adapter], step: int) -> None:
        sites = list(adapters.values())
        if not any(a.growing for a in sites):
            return
        if step <= 1:
            self.check_budget(sites)
        budget, total = self.budget(len(sites)), sum(int(a.rank) for a in sites)
        if total < budget:
            for a in sites:
                a.update_score(self.beta1, self.beta2)
            if step > self.warmup and step % self.interval == 0:
                total = self.allocate(sites, total, budget)
        if total >= budget:
            for a in sites:
                a.stop_growing()
            return
        for a in sites:
            a.open_reserve(self.increment)

    def allocate(self, sites: list[IncreLoRAAdapter], total: int, budget: int) -> int:
        """Give rank_step more ranks to each of the top_h highest-scoring sites; returns the new total."""
        candidates = sorted((a for a in sites if int(a.reserve) > 0), key=lambda a: a.score(), reverse=True)
        for a in candidates[:self.top_h]:
            count = min(int(a.reserve), budget - total)
            if count <= 0:
                break
            a.grow(count)
            total += count
        return total

    def loss(self, adapters: dict[str, Adapter]) -> Tensor | None:
        if self.orth_reg == 0:
            return None
        terms = []
        for a in adapters.values():
            A, B = a.used_factors()
            eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
            terms += [torch.linalg.matrix_norm(A @ A.T - eye), torch.linalg.matrix_norm(B.T @ B - eye)]
        return self.orth_reg * torch.stack(terms).mean()


def ranks(adapters: dict[str, Adapter]) -> dict[str, int]:
    """Site name -> trained rank, e.g. ranks(peftlab.adapters(model, "default"))."""
    return {site: int(a.rank) for site, a in adapters.items()}
