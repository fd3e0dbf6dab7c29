"""SpIEL: sparse fine-tuning with a fixed budget of trained entries (Ansell et al. 2024, arXiv 2401.16405).

Paper: Alan Ansell, Ivan Vulić, Hannah Sterz, Anna Korhonen, Edoardo M. Ponti, "Scaling Sparse
Fine-Tuning to Large Language Models", 2024, arXiv 2401.16405.
Official code: AlanAnsell/peft (`src/peft/tuners/sft/layer.py`, `trainer.py`, `optimizer.py`).

    W' = W0 + scatter(idx, v)            h = W0 x + scatter(idx, v) x
    idx: (budget,) flat positions in the (out, in) matrix, unique; v: (budget,) their deltas.
    Trained: v only. idx is a buffer the schedule below rewrites; both are saved (budget
    indices + budget values per site, never a dense matrix).

Budget per site: `budget` entries, or `lora_rank` * (in + out) (what a LoRA of that rank
trains), else `density` * out * in (official default 0.01).

Start: idx drawn uniformly at random (seeded by `seed` and the site name), v = 0, so the
output is unchanged at attach.

Update-prune-regrow, after optimizer steps (`peftlab.step(model, step, optimizer=...)`), every
R = `regrow_interval` steps (official 20):
  1. over the A = `accumulation_steps` steps before each multiple of R (official 5) the dense
     gradient of the (out, in) delta, G = dL/dW, is read in the backward pass; on the first of
     them the top-`budget` entries of |G| become candidates, and on every one their gradient
     and squared gradient are summed (so only budget-sized buffers are kept);
  2. at the multiple of R, n = fraction(step) * budget entries with the smallest |v| are
     dropped (their delta returns to 0: the weight is W0 there again), and the n candidates
     with the largest |mean gradient| that are not active replace them, starting from v = 0;
  3. the optimizer's moments of the changed entries are seeded from the gradient statistics
     (Adam: exp_avg = mean G, exp_avg_sq = mean G^2; any other per-entry state is zeroed), as
     the official trainer does, so a regrown entry does not start with a stale moment.
fraction(step) = `regrow_fraction` (official 0.2) x decay, decay = 1 - step / total_steps
("linear"), 0.5 (1 + cos(pi step / total_steps)) ("cosine") or 1 ("constant", and whenever
total_steps is unknown). An entry dropped in favour of a candidate that was itself being
dropped keeps its place and value, as in the official `select_rigl`.

Choices where the official code differs: its first selection (after 5 steps) replaces every
entry (fraction 1); here the decay schedule applies from the first selection on. Its CUDA
kernel avoids the dense delta; here a small autograd function rebuilds it in the forward and
backward instead of keeping it for backward, so memory holds no dense matrix per site. The
collection state (candidates, sums) lives in memory only: a run resumed inside a collection
window starts that window's sums afresh.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import Adapter
from ..errors import PeftlabError
from ..hosts import LINEAR_LIKE, HostKind
from ..registry import MethodConfig, Site, register

DECAYS = ("linear", "cosine", "constant")


class _SparseDelta(torch.autograd.Function):
    """x -> F.linear(x, D) with D = scatter(idx, v) (out, in), rebuilt in backward rather than saved."""

    @staticmethod
    def forward(ctx, x: Tensor, values: Tensor, adapter: "SpIELAdapter") -> Tensor:
        ctx.adapter = adapter
        ctx.save_for_backward(x, values)
        return F.linear(x, adapter.dense(values))

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, values = ctx.saved_tensors
        adapter = ctx.adapter
        grad_x = grad_out @ adapter.dense(values).to(grad_out.dtype) if ctx.needs_input_grad[0] else None
        # The dense gradient of the delta: G = sum over tokens of grad_out^T x, (out, in).
        dense = grad_out.reshape(-1, grad_out.shape[-1]).T @ x.reshape(-1, x.shape[-1])
        flat = dense.reshape(-1)
        if adapter.collecting:
            adapter.collect(flat.detach())
        return grad_x, flat[adapter.indices].to(values.dtype), None


class SpIELAdapter(Adapter):
    def __init__(self, kind: HostKind, in_features: int, out_features: int, budget: int, dtype: torch.dtype):
        super().__init__(kind)
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("indices", torch.zeros(budget, dtype=torch.int64))  # flat positions in (out, in)
        self.values = nn.Parameter(torch.zeros(budget, dtype=dtype))  # (budget,)
        self.collecting = False
        self.candidates: Tensor | None = None  # (budget,) flat positions, during a collection window
        self.grad_sum: Tensor | None = None  # (budget,) summed gradient of each candidate
        self.grad_sq_sum: Tensor | None = None
        self.samples = 0

    def draw_indices(self, seed: int, site_name: str) -> None:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(site_name.encode()))
        numel = self.in_features * self.out_features
        with torch.no_grad():
            self.indices.copy_(torch.randperm(numel, generator=generator)[: self.indices.numel()])

    def dense(self, values: Tensor) -> Tensor:
        """scatter(idx, values) as an (out, in) matrix."""
        flat = values.new_zeros(self.out_features * self.in_features)
        return flat.index_put((self.indices,), values).view(self.out_features, self.in_features)

    def forward(self, host: nn.Module, x: Tensor, base) -> Tensor:
        return base(x) + _SparseDelta.apply(x, self.values, self)

    def delta_weight(self) -> Tensor:
        return self.dense(self.values)

    # ---- the schedule's side: collect gradients, then drop and regrow -----------------------

    def collect(self, grad: Tensor) -> None:
        """One backward pass's dense gradient (out*in,): candidates on the first, sums on every one."""
        if self.candidates is None:
            self.candidates = grad.abs().topk(self.indices.numel(), sorted=False).indices
            self.grad_sum = torch.zeros(self.candidates.numel(), dtype=torch.float32, device=grad.device)
            self.grad_sq_sum = torch.zeros_like(self.grad_sum)
        picked = grad[self.candidates].float()
        self.grad_sum += picked
        self.grad_sq_sum += picked * picked
        self.samples += 1

    def end_collection(self) -> None:
        self.collecting = False
        self.candidates = self.grad_sum = self.grad_sq_sum = None
        self.samples = 0

    @torch.no_grad()
    def regrow(self, count: int, optimizer: Any) -> int:
        """Drop the `count` smallest |v|, grow the best collected candidates; returns how many moved."""
        if self.candidates is None or count <= 0:
            return 0
        numel = self.in_features * self.out_features
        outgoing = self.values.abs().topk(count, largest=False).indices  # positions in idx / v
        active = torch.zeros(numel, dtype=torch.bool, device=self.indices.device)
        active[self.indices] = True
        leaving = torch.zeros_like(active)
        leaving[self.indices[outgoing]] = True
        staying = active & ~leaving
        # Candidates that are not staying; the best |mean gradient| first.
        valid = ~staying[self.candidates]
        mean = self.grad_sum[valid] / self.samples
        mean_sq = self.grad_sq_sum[valid] / self.samples
        best = mean.abs().topk(min(count, int(valid.sum()))).indices
        grown, mean, mean_sq = self.candidates[valid][best], mean[best], mean_sq[best]
        # A leaving entry that would come straight back keeps its place and value.
        returning = leaving[grown]
        back = torch.zeros_like(active)
        back[grown[returning]] = True
        incoming, mean, mean_sq = grown[~returning], mean[~returning], mean_sq[~returning]
        changing = outgoing[~back[self.indices[outgoing]]][: incoming.numel()]
        self.indices[changing] = incoming
        self.values[changing] = 0.0
        seed_moments(optimizer, self.values, changing, mean, mean_sq)
        return int(changing.numel())


def seed_moments(optimizer: Any, param: Tensor, changing: Tensor, mean: Tensor, mean_sq: Tensor) -> None:
    """Start the optimizer state of the changed entries from the collected gradient statistics."""
    state = optimizer.state.get(param, {}) if optimizer is not None else {}
    for key, moment in state.items():
        if not isinstance(moment, Tensor) or moment.shape != param.shape:
            continue  # Adam's step count and other scalars are per tensor, not per entry
        if key == "exp_avg":
            moment[changing] = mean.to(moment.dtype)
        elif key in ("exp_avg_sq", "max_exp_avg_sq"):
            moment[changing] = mean_sq.to(moment.dtype)
        else:
            moment[changing] = 0


@register("spiel")
@dataclass
class SpIEL(MethodConfig):
    density: float = 0.01  # share of each layer's entries trained (official default)
    budget: int | None = None  # entries per site; overrides density
    lora_rank: int | None = None  # budget = lora_rank * (in + out): a rank-r LoRA's trainable count
    regrow_interval: int = 20  # R: steps between drop-and-regrow
    accumulation_steps: int = 5  # A: steps of gradient collected before each regrow
    regrow_fraction: float = 0.2  # share of the budget replaced at the first regrow
    decay: str = "linear"  # how that share shrinks over the run: linear, cosine or constant
    total_steps: int | None = None  # the run's optimizer steps, for the decay (the recipe fills it)
    seed: int = 0  # for the initial random indices

    hosts = LINEAR_LIKE
    step_hook = True
    step_needs_optimizer = True
    run_fields = ("total_steps",)
    trainable_formula = "budget per site (density * in * out, or lora_rank * (in + out)); indices re-chosen"

    def validate(self) -> None:
        name = type(self).__name__
        if not isinstance(self.density, (int, float)) or not 0 < self.density <= 1:
            raise PeftlabError(f"{name} density must be in (0, 1], got {self.density!r}")
        self.check_positive_int("budget", "lora_rank", "total_steps", optional=True)
        if self.budget is not None and self.lora_rank is not None:
            raise PeftlabError(f"{name} budget and lora_rank both size the budget: give one of them")
        self.check_positive_int("regrow_interval", "accumulation_steps")
        if self.accumulation_steps > self.regrow_interval:
            raise PeftlabError(f"{name} accumulation_steps={self.accumulation_steps} must be <= regrow_interval="
                               f"{self.regrow_interval}: gradients are collected within one interval")
        if not isinstance(self.regrow_fraction, (int, float)) or not 0 <= self.regrow_fraction <= 1:
            raise PeftlabError(f"{name} regrow_fraction must be in [0, 1], got {self.regrow_fraction!r}")
        if self.decay not in DECAYS:
            raise PeftlabError(f"{name} decay {self.decay!r} is unknown; choose one of {DECAYS}")

    def site_budget(self, site: Site) -> int:
        if self.budget is not None:
            return self.budget
        if self.lora_rank is not None:
            return self.lora_rank * (site.in_features + site.out_features)
        return max(1, round(self.density * site.in_features * site.out_features))

    def validate_site(self, site: Site) -> None:
        entries = site.in_features * site.out_features
        if self.site_budget(site) > entries:
            asked = f"budget={self.budget}" if self.budget is not None else f"lora_rank={self.lora_rank}"
            raise PeftlabError(f"SpIEL {asked} asks for {self.site_budget(site)} entries, more than {site.name} has "
                               f"({site.out_features} x {site.in_features} = {entries}): use a smaller budget "
                               "or an override for this site")

    def build(self, site: Site, stats=None, initialize: bool = True) -> SpIELAdapter:
        adapter = SpIELAdapter(site.kind, site.in_features, site.out_features, self.site_budget(site),
                               site.weight.dtype)
        if initialize:
            adapter.draw_indices(self.seed, site.name)
        adapter.collecting = self.accumulation_steps == self.regrow_interval  # the first window starts now
        return adapter

    def fraction(self, step: int) -> float:
        """The share of the budget replaced at `step`."""
        if self.decay == "constant" or self.total_steps is None:
            return self.regrow_fraction
        progress = min(step / self.total_steps, 1.0)
        if self.decay == "linear":
            return self.regrow_fraction * (1 - progress)
        return self.regrow_fraction * 0.5 * (1 + math.cos(math.pi * progress))

    def after_step(self, adapters: dict[str, Adapter], step: int, optimizer: Any = None) -> None:
        if step % self.regrow_interval == 0:
            for adapter in adapters.values():
                adapter.regrow(int(self.fraction(step) * adapter.values.numel()), optimizer)
                adapter.end_collection()
        if (step + self.accumulation_steps) % self.regrow_interval == 0:
            for adapter in adapters.values():
                adapter.collecting = True
