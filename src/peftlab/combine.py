"""Combining adapters: one new adapter built from several attached ones.

    peftlab.combine(model, {"a": 0.6, "b": 0.4}, method="ties", name="ab", density=0.5)

Every input adapter i changes the weight of a site by Delta_i = f_i(W0) - W0, its weight form
applied to the original weight (a residual init's part included: PiSSA's change is
s (B A - B0 A0)). A method maps the changes and the weights w_i to one change per site, and the
result is attached as a new adapter under `name`, which becomes active in place of its inputs
(they stay attached, switched off):

  name              change                                                   result adapter
  task_arithmetic   sum_i w_i Delta_i                                        delta (dense), exact
  ties              trim, elect sign, disjoint mean (see `ties`)             delta (dense)
  dare_linear       sum_i w_i drop(Delta_i)                                  delta (dense)
  dare_ties         TIES' elect and disjoint mean of drop(Delta_i)           delta (dense)
  magnitude_prune   sum_i w_i trim(Delta_i)                                  delta (dense)
  cat               sum_i w_i Delta_i, factors side by side: ranks add up    lora, exact
  svd, ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd
                    the change above truncated to rank `rank` by its SVD     lora of rank `rank`
  linear            `peft`'s factor-wise sum (see `linear`): NOT the sum     lora, same rank
                    of the changes

Everything but `cat` and `linear` works on the changes themselves, so any method with a
weight form joins (LoRA with VeRA, DoRA with PiSSA, ...). `peft`'s add_weighted_adapter runs
ties, dare_* and magnitude_prune on A and on B separately, so the product gains cross terms
B_i A_j; here they run on the changes. `cat`, `svd` and `linear` give what `peft` gives.

The dense result is the `delta` method (peftlab.methods.delta), the low-rank one a `lora` at
scale 1 (alpha = r); both save, load, merge and export like any adapter. DARE's drops are
seeded: `seed` and the site's name fix them (see `drop`).
"""
from __future__ import annotations

import math
import numbers
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from .core import ADAPTERS, PeftLoRA, adapter_names, attach, set_active, state_of
from .errors import PeftlabError
from .io.peft import exact_pattern
from .methods.delta import Delta
from .methods.lora import LoRA
from .registry import MethodConfig
from .targets import overrides_for

# ---- the element-wise parts: each acts on stacked changes (n, out, in) ----------------------------


def trim(changes: Tensor, density: float) -> Tensor:
    """TIES' trim (Yadav et al. 2023): each Delta_i keeps its k = floor(density * out * in) entries of
    largest magnitude, the rest become 0 (per matrix, as `peft` does). (n, out, in) -> (n, out, in)."""
    flat = changes.flatten(1)  # (n, out * in)
    k = int(density * flat.shape[1])
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep.scatter_(1, flat.abs().topk(k, dim=1).indices, True)
    return changes * keep.view_as(changes)


def drop(changes: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """DARE's drop and rescale (Yu et al. 2024, arXiv 2311.03099): each entry stays with probability
    `density`, and what stays is divided by it, so E[drop(Delta)] = Delta. The mask is
    torch.rand(n, out, in, generator=generator) < density, on the CPU, in adapter order."""
    keep = torch.rand(changes.shape, generator=generator) < density
    return changes * keep.to(changes.device) / density


def elect_and_average(changes: Tensor, weights: Tensor) -> Tensor:
    """TIES' elect and disjoint merge: gamma = sign(sum_i Delta_i) (+ where the sum is 0); each entry
    is the mean of w_i Delta_i over the i whose Delta_i has sign gamma (0 where none has), as in
    `peft`'s ties: the sign is elected on the unweighted changes. (n, out, in) -> (out, in)."""
    elected = torch.where(changes.sum(0) >= 0, 1.0, -1.0).to(changes.dtype)
    agree = changes.sign() == elected  # (n, out, in); a trimmed 0 never agrees
    total = (weights.view(-1, 1, 1) * changes * agree).sum(0)
    return total / agree.sum(0).clamp(min=1)


def weighted_sum(changes: Tensor, weights: Tensor) -> Tensor:
    return torch.einsum("n,noi->oi", weights, changes)


# ---- the methods on changes: (changes (n, out, in), weights (n,), density, generator) -> (out, in) --


def task_arithmetic(changes: Tensor, weights: Tensor, density: float | None, generator) -> Tensor:
    """Task arithmetic (Ilharco et al. 2023, arXiv 2212.04089): Delta = sum_i w_i Delta_i."""
    return weighted_sum(changes, weights)


def ties(changes: Tensor, weights: Tensor, density: float | None, generator) -> Tensor:
    """TIES-merging (Yadav et al. 2023, arXiv 2306.01708): Delta = elect_and_average(trim(Delta_i), w)."""
    return elect_and_average(trim(changes, density), weights)


def dare_linear(changes: Tensor, weights: Tensor, density: float | None, generator) -> Tensor:
    """DARE (Yu et al. 2024, arXiv 2311.03099) with task arithmetic: Delta = sum_i w_i drop(Delta_i)."""
    return weighted_sum(drop(changes, density, generator), weights)


def dare_ties(changes: Tensor, weights: Tensor, density: float | None, generator) -> Tensor:
    """DARE with TIES' sign election: Delta = elect_and_average(drop(Delta_i), w)."""
    return elect_and_average(drop(changes, density, generator), weights)


def magnitude_prune(changes: Tensor, weights: Tensor, density: float | None, generator) -> Tensor:
    """Magnitude pruning then task arithmetic (`peft`'s magnitude_prune): Delta = sum_i w_i trim(Delta_i)."""
    return weighted_sum(trim(changes, density), weights)


@dataclass(frozen=True)
class Combiner:
    """One registry name: how the change is made and what the result is."""

    change: Callable[..., Tensor] | None  # on stacked changes; None: the method works on factors
    result: str  # "delta" (dense), "svd" (truncated lora), "cat" or "linear" (lora from factors)
    needs_density: bool = False


COMBINERS: dict[str, Combiner] = {
    "task_arithmetic": Combiner(task_arithmetic, "delta"),
    "ties": Combiner(ties, "delta", True),
    "dare_linear": Combiner(dare_linear, "delta", True),
    "dare_ties": Combiner(dare_ties, "delta", True),
    "magnitude_prune": Combiner(magnitude_prune, "delta", True),
    "svd": Combiner(task_arithmetic, "svd"),
    "ties_svd": Combiner(ties, "svd", True),
    "dare_linear_svd": Combiner(dare_linear, "svd", True),
    "dare_ties_svd": Combiner(dare_ties, "svd", True),
    "magnitude_prune_svd": Combiner(magnitude_prune, "svd", True),
    "cat": Combiner(None, "cat"),
    "linear": Combiner(None, "linear"),
}


# ---- the methods on factors ---------------------------------------------------------------------


@dataclass
class Factors:
    """One input at one site as `peft` holds it: the change is scale * B @ A. A (k, in), B (out, k)."""

    A: Tensor
    B: Tensor
    scale: float
    plain: bool  # the whole change is scale * B @ A (False: DoRA's rescaling, ...)


def cat(factors: list[Factors], weights: list[float]) -> tuple[Tensor, Tensor]:
    """Concatenation (`peft`'s cat): A = [w_1 s_1 A_1; ...; w_n s_n A_n], B = [B_1, ..., B_n], so
    B @ A = sum_i w_i s_i B_i A_i = sum_i w_i Delta_i exactly, at rank sum_i k_i. -> (A, B)"""
    A = torch.cat([w * f.scale * f.A for f, w in zip(factors, weights)])
    return A, torch.cat([f.B for f in factors], dim=1)


def linear(factors: list[Factors], weights: list[float]) -> tuple[Tensor, Tensor]:
    """`peft`'s linear, kept for compatibility: with c_i = w_i s_i,
    A = sum_i sign(c_i) sqrt|c_i| A_i and B = sum_i sqrt|c_i| B_i, each factor summed on its own.
    B @ A = sum_i c_i B_i A_i + sum_{i != j} ... B_i A_j: the cross terms make it differ from the
    weighted sum of the changes (use task_arithmetic, cat or svd for that). -> (A, B)"""
    roots = [math.sqrt(abs(w * f.scale)) for f, w in zip(factors, weights)]
    A = sum(math.copysign(r, w * f.scale) * f.A for f, w, r in zip(factors, weights, roots))
    B = sum(r * f.B for f, r in zip(factors, roots))
    return A, B


def truncate(change: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """The best rank-`rank` approximation of `change` (out, in): B = U_r S_r, A = V_r^T, as `peft`'s svd."""
    U, S, Vh = torch.linalg.svd(change, full_matrices=False)
    return Vh[:rank], U[:, :rank] * S[:rank]


# ---- combine ------------------------------------------------------------------------------------


def combine(model: nn.Module, weights: dict[str, float], method: str = "task_arithmetic", name: str = "combined",
            *, density: float | None = None, rank: int | None = None, seed: int = 0) -> nn.Module:
    """Attach under `name` one adapter combining the attached adapters `weights` names, by `method`.

    density: the share of each change kept (ties, dare_*, magnitude_prune and their _svd); rank:
    the rank of svd results (default: the largest input rank at each site); seed: DARE's drops.
    The new adapter is active instead of its inputs. Everything is checked before anything is
    attached; on an error the model is unchanged.
    """
    state = state_of(model)
    combiner = _combiner(method, density, rank)
    names, values = _check_weights(state, weights)
    if name in state.groups or not isinstance(name, str) or not name or "." in name:
        raise PeftlabError(f"name={name!r}: the combined adapter needs a new name without '.' (attached: "
                           f"{list(state.groups)})")
    sites = _common_sites(model, state, names)
    results = {site: _site_result(model, state, names, values, site, method, combiner, density, rank, seed)
               for site in sites}
    config, tensors = _result_adapter(model, name, results)
    attach(model, config, name, state_dict=tensors)
    set_active(model, [n for n in state.active if n not in names] + [name])
    return model


def _combiner(method: str, density: float | None, rank: int | None) -> Combiner:
    if method not in COMBINERS:
        raise PeftlabError(f"method={method!r} is not a way to combine adapters; choose one of {', '.join(COMBINERS)}")
    combiner = COMBINERS[method]
    if combiner.needs_density:
        if isinstance(density, bool) or not isinstance(density, numbers.Real) or not 0 < density <= 1:
            raise PeftlabError(f"density={density!r}: method {method!r} keeps a share of each change; give "
                               "density in (0, 1], e.g. density=0.5 (--density 0.5)")
    elif density is not None:
        raise PeftlabError(f"density={density!r}: method {method!r} keeps every entry; leave density out, or "
                           "use ties, dare_linear, dare_ties or magnitude_prune (or their _svd variants)")
    if combiner.result == "svd":
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise PeftlabError(f"rank={rank!r}: give a positive integer (or leave it out: the largest input rank)")
    elif rank is not None:
        raise PeftlabError(f"rank={rank!r}: method {method!r} does not truncate; leave rank out, or use svd or a "
                           "*_svd method")
    return combiner


def _check_weights(state, weights: dict[str, float]) -> tuple[list[str], list[float]]:
    """(names, weights) of a mapping of attached adapter names to finite numbers."""
    if not isinstance(weights, dict) or not weights:
        raise PeftlabError(f"weights={weights!r}: give a mapping of attached adapter names to weights, "
                           f"e.g. {{'a': 0.6, 'b': 0.4}}; attached: {list(state.groups)}")
    names = adapter_names(state, list(weights))
    for n, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
            raise PeftlabError(f"weights[{n!r}] = {w!r} must be a finite number")
    return names, [float(weights[n]) for n in names]


def _common_sites(model: nn.Module, state, names: list[str]) -> list[str]:
    """The sites every input changes (the same for all), each input checked to have a weight form."""
    for n in names:
        group = state.groups[n]
        if group.model is not None or not all(a.weight_form for a in group.sites.values()):
            raise PeftlabError(f"adapter {n!r} ({group.config.method}) has no weight form per layer (it acts "
                               "through hooks or on the model's own parameters), so it cannot be combined: "
                               "combine adapters that change layer weights (lora, dora, vera, ...)")
        shifted = [s for s, a in group.sites.items() if a.changes_bias]
        if shifted:
            raise PeftlabError(f"adapter {n!r} ({group.config.method}) also shifts the bias of {shifted[0]}; "
                               "combine works on weight changes: leave it out")
    first = list(state.groups[names[0]].sites)
    for n in names[1:]:
        other = state.groups[n].sites
        if set(other) != set(first):
            odd = sorted(set(first) ^ set(other))[0]
            raise PeftlabError(f"adapters {names[0]!r} and {n!r} change different layers (e.g. {odd}): combine "
                               "adapters attached to the same sites of the same model")
    for site in first:
        slot = getattr(model.get_submodule(site), ADAPTERS)
        if slot.merged:
            raise PeftlabError(f"{site} has merged adapters ({slot.merged}): call peftlab.unmerge(model) first")
    return first


def weight_change(slot, adapter) -> Tensor:
    """Delta of one adapter on its slot's host: its weight form on the ORIGINAL weight, minus that weight.
    While attached the host holds W0 minus every residual init's part. (out, in), float32."""
    held = slot.kind.matrix(slot.host).float()
    original = held + sum((a.residual().float() for a in slot.values() if a.has_residual), torch.zeros_like(held))
    own_residual = adapter.residual().float() if adapter.has_residual else 0
    if adapter.additive:  # without the subtraction of W0: exact for low-rank changes
        return adapter.delta_weight().float() - own_residual
    return adapter.merged_weight(original - own_residual).float() - original


def _factors(config: MethodConfig, site: str, host: nn.Module, adapter) -> Factors | None:
    """The input's change at `site` as scaled factors (as it is written to `peft`), None without them."""
    form = config.at_site(overrides_for(site, host, config.overrides)).peft_lora(adapter)
    if form is None:
        pair = adapter.lora_factors() if adapter.additive else None
        form = None if pair is None else PeftLoRA(*pair)
    if form is None:
        return None
    scale = form.alpha / (math.sqrt(form.rank) if form.rslora else form.rank)
    plain = adapter.additive and not form.tensors
    return Factors(form.A.detach().float(), form.B.detach().float(), scale, plain)


def _site_result(model: nn.Module, state, names: list[str], weights: list[float], site: str, method: str,
                 combiner: Combiner, density: float | None, rank: int | None, seed: int) -> tuple[Tensor, ...]:
    """(Delta,) for a dense result, (A, B) for a low-rank one, at one site."""
    host = model.get_submodule(site)
    slot = getattr(host, ADAPTERS)
    inputs = [slot[n] for n in names]
    factors = [_factors(state.groups[n].config, site, host, a) for n, a in zip(names, inputs)]
    if combiner.change is None:  # cat, linear: on the factors
        lacking = [n for n, f in zip(names, factors) if f is None or not f.plain]
        if lacking:
            raise PeftlabError(f"method {method!r} works on low-rank factors, but adapter {lacking[0]!r} "
                               f"({state.groups[lacking[0]].config.method}) has none at {site}: use "
                               "task_arithmetic (exact, dense) or svd (low rank)")
        if method == "linear" and len({f.A.shape[0] for f in factors}) > 1:
            raise PeftlabError(f"method 'linear' sums factors of one rank, but the inputs' ranks at {site} are "
                               f"{[f.A.shape[0] for f in factors]}: use cat or svd")
        A, B = (cat if method == "cat" else linear)(factors, weights)
        if A.shape[0] > min(B.shape[0], A.shape[1]):
            raise PeftlabError(f"method 'cat' gives rank {A.shape[0]} at {site}, more than its {B.shape[0]} x "
                               f"{A.shape[1]} matrix holds: use svd with rank <= {min(B.shape[0], A.shape[1])}")
        return A, B
    changes = torch.stack([weight_change(slot, a) for a in inputs])  # (n, out, in)
    generator = torch.Generator().manual_seed(seed + zlib.crc32(site.encode()))
    change = combiner.change(changes, torch.tensor(weights, device=changes.device), density, generator)
    if combiner.result == "delta":
        return (change,)
    return truncate(change, _svd_rank(site, slot.kind.matrix(host).shape, factors, rank))


def _svd_rank(site: str, shape: torch.Size, factors: list[Factors | None], rank: int | None) -> int:
    """The asked rank, or the largest rank among the inputs (as `peft`'s svd), checked against the layer."""
    if rank is None:
        ranks = [f.A.shape[0] for f in factors if f is not None]
        if not ranks:
            raise PeftlabError(f"no input has a rank at {site} (their changes are dense): give rank=, e.g. rank=8")
        rank = max(ranks)
    if rank > min(shape):
        raise PeftlabError(f"rank={rank} is larger than {site} allows ({shape[0]} x {shape[1]}): use rank <= "
                           f"{min(shape)}")
    return rank


def _result_adapter(model: nn.Module, name: str, results: dict[str, tuple[Tensor, ...]]
                    ) -> tuple[MethodConfig, dict[str, Tensor]]:
    """The config and tensors of the combined adapter: delta (dense) or a lora at scale 1 (alpha = r)."""
    exact = {site: exact_pattern(model, site) for site in results}
    targets = [exact[s] for s in results]
    prefix = {site: f"{site}.{ADAPTERS}.{name}." for site in results}
    if all(len(r) == 1 for r in results.values()):
        return Delta(targets=targets), {prefix[s] + "delta": r[0] for s, r in results.items()}
    ranks = {site: A.shape[0] for site, (A, B) in results.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    overrides = {exact[s]: {"r": k, "alpha": float(k)} for s, k in ranks.items() if k != r}
    config = LoRA(r=r, alpha=float(r), targets=targets, overrides=overrides)
    tensors = {}
    for site, (A, B) in results.items():
        tensors.update({prefix[site] + "A": A, prefix[site] + "B": B})
    return config, tensors
