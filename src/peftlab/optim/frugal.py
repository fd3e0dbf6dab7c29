"""FRUGAL: gradient splitting, state-full AdamW in a subspace and state-free signSGD outside it
(Zmushko et al. 2024, "FRUGAL: Memory-Efficient Optimization by Reducing State Overhead for
Scalable Training", arXiv 2411.17466).

The gradient G of each projected parameter (2-d, in a group without `project: False`) splits into
a state-full part, updated by AdamW whose moments live only there, and the rest, updated by
sign descent with no state at all:

    W <- W - lr_t * Adam(G_full) - lr * free_lr_scale * sign(G - G_full) - lr * weight_decay * W

The subspace (`projection`) is chosen anew every `update_gap` steps, and the moments are reset
then (the paper's choice; old moments describe another subspace):

    block        a `density` share of the projected parameters (random, seeded), whole: those take
                 AdamW, the others sign descent (BAdam-style blocks)
    svd          the top r = round(density * min(m, n)) singular subspace of G, GaLore's projector:
                 G_full = P P^T G, moments of the projected shape
    coordinates  a random `density` share of each matrix's entries (RandK); their indices are kept
                 in the state with the moments

Unprojected parameters (embeddings, norms, heads) always take AdamW, as in the paper. The AdamW
arithmetic is galore.py's (lr_t = lr sqrt(1 - b2^t) / (1 - b1^t), eps added to sqrt(V)). Defaults: density 0.25,
update_gap 200, block projection, free_lr_scale 0.1 (the paper's fine-tuning setting;
pre-training uses 1), seed 0 for the random choices.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import Tensor

from .galore import adam_direction, decay, project, project_back, projector, projects_left, run_closure
from .registry import OptimizerConfig, is_projected, register_optimizer

PROJECTIONS = ("block", "svd", "coordinates")


def svd_rank(p: Tensor, density: float) -> int:
    return max(1, round(density * min(p.shape)))


class Frugal(torch.optim.Optimizer):
    """State-full AdamW in a switching subspace, signSGD elsewhere (module docstring)."""

    def __init__(self, params: Iterable, lr: float = 1e-3, density: float = 0.25, update_gap: int = 200,
                 projection: str = "block", free_lr_scale: float = 0.1, seed: int = 0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        defaults = dict(lr=lr, density=density, update_gap=update_gap, projection=projection,
                        free_lr_scale=free_lr_scale, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.seed = seed
        self._blocks: dict[int, set[int]] = {}  # switch index -> positions of the state-full blocks

    def _projected(self) -> list[tuple[Tensor, dict]]:
        return [(p, g) for g in self.param_groups for p in g["params"] if is_projected(p, g)]

    def _block_is_full(self, position: int, switch: int) -> bool:
        """Whether the projected parameter at `position` is state-full in this period (seeded, so a
        resumed run chooses the same blocks)."""
        if switch not in self._blocks:
            projected = self._projected()
            count = max(1, round(projected[0][1]["density"] * len(projected)))
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + switch)
            self._blocks = {switch: set(torch.randperm(len(projected), generator=generator)[:count].tolist())}
        return position in self._blocks[switch]

    def _coordinates(self, state: dict, p: Tensor, position: int, switch: int, density: float) -> Tensor:
        """The flat indices of this period's state-full entries of `p` (kept in the state)."""
        if state.get("switch") != switch or "coordinates" not in state:
            generator = torch.Generator().manual_seed((self.seed * 1_000_003 + switch) * 7919 + position)
            count = max(1, round(density * p.numel()))
            state["coordinates"] = torch.randperm(p.numel(), generator=generator)[:count].sort().values.to(p.device)
        # torch's load_state_dict casts every state tensor to the parameter's dtype: back to indices
        return state["coordinates"].long()

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = run_closure(closure)
        position = -1
        for group in self.param_groups:
            for p in group["params"]:
                projected = is_projected(p, group)
                position += projected
                if p.grad is None:
                    continue
                state = self.state[p]
                if not projected:
                    update, correction = adam_direction(state, p.grad, group["betas"], group["eps"])
                    p.add_(update, alpha=-group["lr"] * correction)
                else:
                    self._split_step(p, group, state, position)
                decay(p, group)
        return loss

    def _split_step(self, p: Tensor, group: dict, state: dict, position: int) -> None:
        steps_done = state.get("frugal_step", 0)
        switch = steps_done // group["update_gap"]
        state["frugal_step"] = steps_done + 1
        if state.get("switch") != switch:  # a new subspace: the old moments describe another one
            for key in ("exp_avg", "exp_avg_sq", "step", "ortho"):
                state.pop(key, None)
        stateful, free = self._split(p, group, state, position, switch)
        state["switch"] = switch
        if free is not None:
            p.add_(free.sign(), alpha=-group["lr"] * group["free_lr_scale"])
        if stateful is not None:
            update, correction = stateful
            p.add_(update, alpha=-group["lr"] * correction)

    def _split(self, p: Tensor, group: dict, state: dict, position: int,
               switch: int) -> tuple[tuple[Tensor, float] | None, Tensor | None]:
        """((AdamW direction, step correction) of the state-full part or None, the state-free part or None)."""
        grad, betas, eps = p.grad, group["betas"], group["eps"]
        kind = group["projection"]
        if kind == "block":
            if self._block_is_full(position, switch):
                return adam_direction(state, grad, betas, eps), None
            return None, grad
        if kind == "svd":
            left = projects_left(grad.shape, "std")
            if "ortho" not in state:
                state["ortho"] = projector(grad, svd_rank(p, group["density"]), left)
            low = project(grad, state["ortho"], left)  # (r, n) or (m, r)
            direction, correction = adam_direction(state, low, betas, eps)
            free = grad - project_back(low, state["ortho"], left)
            return (project_back(direction, state["ortho"], left), correction), free
        chosen = self._coordinates(state, p, position, switch, group["density"])  # (k,) flat indices
        direction, correction = adam_direction(state, grad.reshape(-1)[chosen], betas, eps)
        update = torch.zeros_like(grad).reshape(-1).index_copy_(0, chosen, direction).view_as(grad)
        free = grad.clone().reshape(-1).index_fill_(0, chosen, 0).view_as(grad)
        return (update, correction), free


@register_optimizer("frugal")
@dataclass
class FrugalConfig(OptimizerConfig):
    """FRUGAL's fields (module docstring)."""

    density: float = 0.25
    update_gap: int = 200
    projection: str = "block"
    free_lr_scale: float = 0.1
    seed: int = 0
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0

    description = "AdamW on a switching share of each matrix (blocks, SVD or coordinates), state-free signSGD elsewhere"

    def validate(self) -> None:
        if not 0 < self.density <= 1:
            self._fail("density", "in (0, 1]: the state-full share, e.g. 0.25")
        self.check_positive("update_gap")
        self.check_positive("free_lr_scale", "eps", "weight_decay", allow_zero=True)
        self.check_betas()
        self.check_choice("projection", PROJECTIONS)

    def build(self, params: Iterable) -> Frugal:
        return Frugal(params, **self.kwargs())
