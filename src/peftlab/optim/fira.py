"""Fira: full-rank training under a low-rank constraint (Chen et al. 2024, "Fira: Can We Achieve
Full-rank Training of LLMs Under Low-rank Constraint?", arXiv 2410.01623; official code
xichen-fy/Fira, optimizer_torch/fira_adamw.py).

GaLore (galore.py) keeps Adam's state for the projected gradient R = P^T G (or G Q^T) only, and
throws the rest of the gradient away. Fira adds that rest back, scaled the way Adam would have
scaled it:

    N     = M / (sqrt(V) + eps)                     Adam on R (shape of R)
    phi_j = ||N_j|| / (||R_j|| + 1e-8)              per column j of a (r, n) R, per row of an (m, r) R
    S     = (G - back(R)) * phi                     the residual, each column (row) scaled by phi
    limiter: when ||S_t|| > gamma ||S_{t-1}||, S_t <- S_t * gamma ||S_{t-1}|| / ||S_t||, and the
             norm remembered is the limited one (gamma = 1.01: the residual grows by <= 1% a step)
    W <- W - lr_t (scale * back(N) + S) - lr * weight_decay * W

with lr_t the bias-corrected step size of galore.py. The residual is G - P P^T G, the paper's
equation; the official code subtracts `scale` P P^T G instead (with scale 0.25 it keeps 3/4 of
the projected part in the residual too). Unprojected parameters take plain Adam.
Defaults: rank 128, gap 200, scale 0.25, gamma 1.01 (the paper's).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import Tensor

from .galore import (GaLoreConfig, adam_direction, decay, project, project_back, refresh_projector,
                     run_closure)
from .registry import check_ranks, is_projected, register_optimizer


def scaled_residual(grad: Tensor, low: Tensor, direction: Tensor, basis: Tensor, left: bool) -> Tensor:
    """(G - back(R)) * ||N_j|| / ||R_j||, the norms along the projected side (one per column or row)."""
    dim = 0 if left else 1  # (r, n): a norm per column; (m, r): a norm per row
    phi = direction.norm(dim=dim, keepdim=True) / (low.norm(dim=dim, keepdim=True) + 1e-8)  # (1, n) or (m, 1)
    return (grad - project_back(low, basis, left)) * phi


def limit_growth(state: dict, residual: Tensor, gamma: float) -> Tensor:
    """The residual with its norm at most gamma times the last (limited) one."""
    norm = residual.norm().item()
    previous = state.get("residual_norm")
    if previous is not None and norm > gamma * previous:
        factor = gamma * previous / norm
        residual, norm = residual * factor, norm * factor
    state["residual_norm"] = norm
    return residual


class Fira(torch.optim.Optimizer):
    """GaLore plus the norm-scaled residual and the norm-growth limiter (module docstring)."""

    def __init__(self, params: Iterable, lr: float = 1e-3, rank: int = 128, update_proj_gap: int = 200,
                 scale: float = 0.25, gamma: float = 1.01, proj_type: str = "std",
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0):
        defaults = dict(lr=lr, rank=rank, update_proj_gap=update_proj_gap, scale=scale, gamma=gamma,
                        proj_type=proj_type, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        check_ranks(self, lambda group: group["rank"], "Fira")

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = run_closure(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state, grad = self.state[p], p.grad
                if not is_projected(p, group):
                    update, correction = adam_direction(state, grad, group["betas"], group["eps"])
                else:
                    left = refresh_projector(state, grad, group["rank"], group["update_proj_gap"], group["proj_type"])
                    basis = state["ortho"]
                    low = project(grad, basis, left)
                    direction, correction = adam_direction(state, low, group["betas"], group["eps"])
                    residual = limit_growth(state, scaled_residual(grad, low, direction, basis, left), group["gamma"])
                    update = project_back(direction, basis, left) * group["scale"] + residual
                p.add_(update, alpha=-group["lr"] * correction)
                decay(p, group)
        return loss


@register_optimizer("fira")
@dataclass
class FiraConfig(GaLoreConfig):
    """Fira's fields: GaLore's, and the limiter's gamma (module docstring)."""

    gamma: float = 1.01

    description = "GaLore plus the rest of the gradient, scaled column-wise as Adam would, with a norm-growth limiter"

    def validate(self) -> None:
        super().validate()
        if self.gamma < 1:
            self._fail("gamma", ">= 1 (the largest growth of the residual's norm per step, e.g. 1.01)")

    def build(self, params: Iterable) -> Fira:
        return Fira(params, **self.kwargs())
