"""IncreLoRA: add rank where it matters, up to a budget (Zhang et al. 2023, arXiv 2308.12043).

Paper: Feiyu Zhang, Liangzhi Li, Junhao Chen, Zhouqiang Jiang, Bowen Wang, Yiming Qian,
"IncreLoRA: Incremental Parameter Allocation Method for Parameter-Efficient Fine-tuning",
2023, arXiv 2308.12043. Official code: FeiyuZhang98/IncreLoRA (`loralib/loralib/increlora.py`,
the orthogonality term in `NLU/src/transformers/trainer.py`, the restart warmup `Multi_LambdaLR`
in `NLU/src/transformers/optimization.py`).

    h = W0 x + s * B (e * (A dropout(x)))       W' = W0 + s * (B * e) @ A       s = alpha / rank
    A: (k, in), B: (out, k), e: (k,), k = the ranks in use. Trained: A, B, e.

Initialisation (official): rank r (default 1) per site, A, B ~ N(0, 0.02), e = 0, so the
output is unchanged at attach. s = alpha / rank uses the current rank.

Growth, after each optimizer step (`peftlab.step(model, step, optimizer=...)`, `step` =
optimizer steps done):
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

Restart warmup (on by default, as every official script runs it, `--multi_lr True`; the paper
lists it as a stability component): what joins training at step t (a fresh reserve's A and B,
a grown rank's e) starts with fresh optimizer state and a learning rate that is 0 at its first
step (t + 1) and climbs linearly to the full rate over `restart_warmup` steps (full from step
t + 1 + restart_warmup). Without it, new ranks would share the Adam step counter of the ranks
already training, and its bias correction, long finished, would give a new rank a first step
of 1x to 3x the learning rate at once. How:
  - storage is split into blocks, one per allocation: block 0 holds the initial r ranks, each
    later block rank_step ranks (A.<b>, B.<b>, E.<b>), so the optimizer keeps separate state per
    block. A block takes part in the forward only once it opens, so it has no optimizer state
    before; a grown rank's e (which took zero gradients while in reserve) has its state dropped
    from the optimizer (`step_needs_optimizer`: the step hook gets `optimizer=`);
  - the warmup scales the update the optimizer made to a warming block, p <- p_before +
    m * (p - p_before), with m the warmup fraction. For SGD, Adam and AdamW the update is
    proportional to the learning rate and their moments do not depend on it, so this is the
    update at learning rate m * lr, under any scheduler the run uses. p_before is copied at the
    first training forward after the previous step (so a resumed run continues its warmups).
  - "full" is the rate the run's schedule gives every other parameter at that step. The
    official restart instead gives the new group its own linear schedule: warmup to the peak
    rate, then a linear decay to 0 at the end of the run, above the main schedule's rate.
  - restart_warmup defaults to `interval` (both are 100 in every official script);
    restart_warmup = 0 keeps the fresh state and skips the warmup.

Choices and deviations:
  - Shapes never change: each site holds storage for `max_rank` ranks (default 3 x target_rank)
    and a persistent `rank` / `reserve` count says how many are in use, so optimizers keep
    their parameters and a saved adapter loads with its current ranks. Storage beyond the used
    ranks gets no gradient. A site whose storage is full is skipped when ranks are handed out
    (the official code has no per-site cap).
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
from itertools import accumulate
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from ..core import Adapter
from ..errors import PeftlabError
from ..hosts import HostKind
from ..registry import MethodConfig, Site, register

RESERVE_GATE = 1e-5  # e of reserve ranks (official)
INIT_STD = 0.02  # A, B ~ N(0, 0.02) (official)
OFFICIAL_RANK_STEP = {2: 1, 4: 2, 6: 3, 8: 4}


def block_sizes(r: int, capacity: int, rank_step: int) -> list[int]:
    """Ranks per storage block: the initial r, then rank_step per allocation (the last may be smaller)."""
    sizes = [r]
    while sum(sizes) < capacity:
        sizes.append(min(rank_step, capacity - sum(sizes)))
    return sizes


def forget(optimizer: Any, params: tuple[nn.Parameter, ...]) -> None:
    """Drop the optimizer's state of `params`: their next step starts from fresh moments."""
    for p in params:
        optimizer.state.pop(p, None)


class IncreLoRAAdapter(Adapter):
    def __init__(self, kind: HostKind, in_features: int, out_features: int, blocks: list[int], alpha: float,
                 dropout: float, restart_warmup: int, dtype: torch.dtype):
        super().__init__(kind)
        self.alpha, self.restart_warmup = alpha, restart_warmup
        # One (A, B, e) block per allocation, so the optimizer keeps each block's state apart.
        self.A = nn.ParameterList([nn.Parameter(torch.zeros(k, in_features, dtype=dtype)) for k in blocks])  # (k, in)
        self.B = nn.ParameterList([nn.Parameter(torch.zeros(out_features, k, dtype=dtype)) for k in blocks])  # (out, k)
        self.E = nn.ParameterList([nn.Parameter(torch.zeros(k, dtype=dtype)) for k in blocks])  # (k,)
        self.starts = [0, *accumulate(blocks)][:-1]  # first row of each block
        self.capacity = sum(blocks)
        self.register_buffer("rank", torch.tensor(blocks[0]))  # trained ranks: rows [0, rank)
        self.register_buffer("reserve", torch.tensor(0))  # reserve ranks: rows [rank, rank + reserve)
        self.register_buffer("importance", torch.zeros((), dtype=torch.float32))  # I_bar
        self.register_buffer("uncertainty", torch.zeros((), dtype=torch.float32))  # U_bar
        self.register_buffer("step", torch.tensor(0))  # the last optimizer step seen by after_step
        # Step at which a block's A, B (opened) and its e (grown) joined training; 0: from the start.
        self.register_buffer("opened_at", torch.zeros(len(blocks), dtype=torch.long))
        self.register_buffer("grown_at", torch.zeros(len(blocks), dtype=torch.long))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.sensitivity: Tensor | None = None  # summed over this step's backward passes
        self.growing = True  # measure sensitivities while ranks are still handed out
        self.before_step: dict[nn.Parameter, Tensor] = {}  # warming parameters before the optimizer step

    def initialise(self) -> None:
        self.fill_block(0)

    @torch.no_grad()
    def fill_block(self, block: int) -> None:
        nn.init.normal_(self.A[block], std=INIT_STD)
        nn.init.normal_(self.B[block], std=INIT_STD)
        self.E[block].zero_()

    def blocks_in_use(self, rows: int) -> int:
        """How many blocks hold the first `rows` rows."""
        return sum(start < rows for start in self.starts)

    def block_of(self, row: int) -> int:
        return self.blocks_in_use(row + 1) - 1

    # ---- the update ------------------------------------------------------------------------

    def factors(self, rows: int) -> tuple[Tensor, Tensor, Tensor]:
        """A (k, in), B (out, k) and the gates e (k,) over the blocks holding the first `rows` rows.

        e: trained values, then the fixed reserve value, then 0 (rows past rank + reserve)."""
        n = self.blocks_in_use(rows)
        A, B, E = torch.cat(list(self.A[:n])), torch.cat(list(self.B[:n]), dim=1), torch.cat(list(self.E[:n]))
        row = torch.arange(E.shape[0], device=E.device)
        reserve = torch.where(row < self.rank + self.reserve, RESERVE_GATE, 0.0).to(E.dtype)
        return A, B, torch.where(row < self.rank, E, reserve)

    def used(self) -> int:
        return int(self.rank + self.reserve)

    def scale(self) -> Tensor:
        return self.alpha / self.rank.clamp_min(1)

    def forward(self, host: nn.Module, x: Tensor, base) -> Tensor:
        if self.training and torch.is_grad_enabled():
            self.remember_warming()
        A, B, gates = self.factors(self.used())
        x_in = self.dropout(x)
        h = self.kind.apply_in(host, x_in, A) * (gates * self.scale())  # (..., k)
        if not (self.growing and self.training and torch.is_grad_enabled()):
            return self.kind.add_out(host, base(x), h, B)
        # While ranks are handed out, the update's own output gradient gives the sensitivity.
        delta = self.kind.apply_out(host, h, B)  # (..., out)
        if delta.requires_grad:
            delta.register_hook(partial(self._record_sensitivity, x_in.detach()))
        return base(x) + delta

    def delta_weight(self) -> Tensor:
        A, B, gates = self.factors(self.used())
        return self.scale() * (B * gates) @ A  # (out, in)

    def lora_factors(self) -> tuple[Tensor, Tensor]:
        A, B, gates = self.factors(self.capacity)  # every site exports the same rank: its storage
        return A, self.scale() * (B * gates)

    def _record_sensitivity(self, x: Tensor, grad_out: Tensor) -> None:
        # y = x dW^T, so dL/d(dW) = grad_out^T x: (out, N) @ (N, in)
        grad_weight = grad_out.reshape(-1, grad_out.shape[-1]).T @ x.reshape(-1, x.shape[-1])
        delta = self.delta_weight().detach()
        value = (delta * grad_weight).abs().sum().float() / math.sqrt(delta.numel())
        self.sensitivity = value if self.sensitivity is None else self.sensitivity + value

    # ---- the restart warmup ------------------------------------------------------------------

    def warmup_fraction(self, joined: int, step: int) -> float:
        """The learning-rate multiplier at optimizer step `step` of what joined at step `joined`:
        0 at its first step, then linear to 1 over restart_warmup steps (joined 0: no warmup)."""
        if joined == 0 or self.restart_warmup == 0:
            return 1.0
        return min(1.0, max(0.0, (step - joined - 1) / self.restart_warmup))

    def warming(self, step: int) -> Iterator[tuple[nn.Parameter, float]]:
        """(parameter, multiplier < 1) of the blocks in use that are still warming up at `step`."""
        for b in range(self.blocks_in_use(self.used())):
            for params, joined in (((self.A[b], self.B[b]), self.opened_at[b]), ((self.E[b],), self.grown_at[b])):
                fraction = self.warmup_fraction(int(joined), step)
                if fraction < 1:
                    yield from ((p, fraction) for p in params)

    @torch.no_grad()
    def remember_warming(self) -> None:
        for p, _ in self.warming(int(self.step) + 1):
            if p not in self.before_step:
                self.before_step[p] = p.detach().clone()

    @torch.no_grad()
    def finish_warming(self, step: int) -> None:
        """Scale the update optimizer step `step` made to warming parameters by their multiplier."""
        for p, fraction in self.warming(step):
            before = self.before_step.get(p)
            if before is not None:
                p.copy_(before + fraction * (p - before))
        self.before_step.clear()

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
    def open_reserve(self, step: int, optimizer: Any) -> None:
        """Open the next block as the reserve, unless one is open or the storage is full."""
        used = self.used()
        if int(self.reserve) > 0 or used >= self.capacity:
            return
        block = self.block_of(used)
        self.fill_block(block)
        forget(optimizer, (self.A[block], self.B[block], self.E[block]))
        self.opened_at[block] = step
        self.reserve += self.A[block].shape[0]

    @torch.no_grad()
    def grow(self, count: int, step: int, optimizer: Any) -> None:
        """Turn `count` reserve ranks into trained ranks; their e starts at the reserve value."""
        rank = int(self.rank)
        block = self.block_of(rank)
        first = rank - self.starts[block]
        self.E[block][first:first + count] = RESERVE_GATE
        forget(optimizer, (self.E[block],))  # it took zero gradients while in reserve
        self.grown_at[block] = step
        self.rank += count
        self.reserve -= count

    def stop_growing(self) -> None:
        self.reserve.zero_()
        self.growing = False
        self.sensitivity = None

    def used_factors(self) -> tuple[Tensor, Tensor]:
        """A and B over the ranks in use and in reserve: (k, in), (out, k)."""
        used = self.used()
        A, B, _ = self.factors(used)
        return A[:used], B[:, :used]


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
    restart_warmup: int | None = None  # steps over which new ranks' learning rate climbs from 0; default interval
    total_steps: int | None = None  # optional: checks that the budget is reached within the run

    step_hook = True
    step_needs_optimizer = True  # new ranks start from fresh optimizer state
    adds_loss = True
    # The forward reads the rank it grows (a buffer) to pick its blocks and, in training, which
    # parameters are still warming up: Python reads of tensors, graph breaks under torch.compile.
    compile_fullgraph = False
    run_fields = ("total_steps",)  # filled by the training recipe when unset
    trainable_formula = "rank * (in + out + 1) per site in use; max_rank * (in + out + 1) stored"

    def validate(self) -> None:
        for field in ("r", "target_rank", "warmup", "interval", "top_h"):
            value, least = getattr(self, field), 0 if field == "warmup" else 1
            if not isinstance(value, int) or value < least:
                raise PeftlabError(f"IncreLoRA {field} must be an integer >= {least}, got {value!r}")
        if self.restart_warmup is not None and self.restart_warmup < 0:
            raise PeftlabError(f"IncreLoRA restart_warmup must be >= 0 steps (0: no warmup) or None (= interval), "
                               f"got {self.restart_warmup!r}")
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
        restart = self.restart_warmup if self.restart_warmup is not None else self.interval
        adapter = IncreLoRAAdapter(site.kind, site.in_features, site.out_features,
                                   block_sizes(self.r, self.capacity, self.increment), self.alpha, self.dropout,
                                   restart, site.weight.dtype)
        if initialize:
            adapter.initialise()
        return adapter

    # ---- the schedule ----------------------------------------------------------------------

    def budget(self, sites: int) -> int:
        return self.target_total_rank if self.target_total_rank is not None else self.target_rank * sites

    def check_budget(self, adapters: list[IncreLoRAAdapter]) -> None:
        budget, start = self.budget(len(adapters)), sum(int(a.rank) for a in adapters)
        room = sum(a.capacity for a in adapters)
        if not start <= budget <= room:
            raise PeftlabError(f"IncreLoRA budget {budget} must lie between the starting total rank {start} and "
                               f"the storage {room}: change target_rank / target_total_rank or max_rank")
        if self.total_steps is not None:
            rounds = math.ceil((budget - start) / (self.top_h * self.increment))
            last = (self.warmup // self.interval + rounds) * self.interval
            if last > self.total_steps:
                raise PeftlabError(f"IncreLoRA would reach its budget at step ~{last}, after the run's "
                                   f"{self.total_steps} steps: lower warmup/interval or raise top_h")

    def after_step(self, adapters: dict[str, Adapter], step: int, optimizer: Any = None) -> None:
        sites = list(adapters.values())
        for a in sites:  # first this step's update of the ranks still warming up
            a.finish_warming(step)
        if any(a.growing for a in sites):
            self.hand_out(sites, step, optimizer)
        for a in sites:
            a.step.fill_(step)

    def hand_out(self, sites: list[IncreLoRAAdapter], step: int, optimizer: Any) -> None:
        """Score the sites, give ranks out on schedule, keep a reserve open at every site."""
        if step <= 1:
            self.check_budget(sites)
        budget, total = self.budget(len(sites)), sum(int(a.rank) for a in sites)
        if total < budget:
            for a in sites:
                a.update_score(self.beta1, self.beta2)
            if step > self.warmup and step % self.interval == 0:
                total = self.allocate(sites, total, budget, step, optimizer)
        if total >= budget:
            for a in sites:
                a.stop_growing()
            return
        for a in sites:
            a.open_reserve(step, optimizer)

    def allocate(self, sites: list[IncreLoRAAdapter], total: int, budget: int, step: int, optimizer: Any) -> int:
        """Give rank_step more ranks to each of the top_h highest-scoring sites; returns the new total."""
        candidates = sorted((a for a in sites if int(a.reserve) > 0), key=lambda a: a.score(), reverse=True)
        for a in candidates[:self.top_h]:
            count = min(int(a.reserve), budget - total)
            if count <= 0:
                break
            a.grow(count, step, optimizer)
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
