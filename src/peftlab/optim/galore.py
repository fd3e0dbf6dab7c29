"""GaLore: Gradient Low-Rank Projection (Zhao et al. 2024, "GaLore: Memory-Efficient LLM Training by
Gradient Low-Rank Projection", arXiv 2403.03507; official code jiaweizzhao/GaLore, `galore-torch`).

For a weight W (m, n) with gradient G, every `update_proj_gap` steps (from step 0) take the SVD
G = U S V^T and keep a projector of rank r on the smaller side:

    m >= n: Q = V[:, :r]^T (r, n)   R = G Q^T (m, r)     back(N) = N Q
    m <  n: P = U[:, :r]   (m, r)   R = P^T G (r, n)     back(N) = P N

Adam runs on the projected gradient R (its moments have R's shape, so the state of a matrix is
2 r max(m, n) + r min(m, n) numbers instead of 2 m n), and the step is

    W <- W - lr_t * scale * back(M / (sqrt(V) + eps)) - lr * weight_decay * W

with lr_t = lr sqrt(1 - b2^t) / (1 - b1^t): the official AdamW's arithmetic (eps added to
sqrt(V) before the bias correction; decoupled weight decay after the step). `proj_type` left or
right forces a side. What trains: every parameter; what is projected: 2-d parameters in groups
without `project: False`; the rest takes the same Adam step unprojected.
Defaults: rank 128, gap 200, scale 0.25 (the paper's pre-training); for fine-tuning the paper
uses rank 4..8, gap 500, scale 4.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import Tensor

from .registry import OptimizerConfig, check_ranks, is_projected, register_optimizer

PROJ_TYPES = ("std", "left", "right")


def projects_left(shape: torch.Size, proj_type: str) -> bool:
    """P (m, r) on the left for a wide matrix (m < n), Q (r, n) on the right otherwise."""
    return proj_type == "left" or (proj_type == "std" and shape[0] < shape[1])


def projector(grad: Tensor, rank: int, left: bool) -> Tensor:
    """The orthonormal basis of the top-`rank` singular subspace: U[:, :r] (m, r) or V^T[:r] (r, n)."""
    U, _, Vh = torch.linalg.svd(grad.float(), full_matrices=False)
    basis = U[:, :rank] if left else Vh[:rank, :]
    return basis.to(grad.dtype).contiguous()


def project(grad: Tensor, basis: Tensor, left: bool) -> Tensor:
    return basis.t() @ grad if left else grad @ basis.t()


def project_back(low: Tensor, basis: Tensor, left: bool) -> Tensor:
    return basis @ low if left else low @ basis


def adam_direction(state: dict, grad: Tensor, betas: tuple[float, float], eps: float) -> tuple[Tensor, float]:
    """(M / (sqrt(V) + eps), sqrt(1 - b2^t) / (1 - b1^t)): one Adam moment update on `grad`, in place
    in `state` (exp_avg, exp_avg_sq, step), and the bias correction of the step size."""
    if "exp_avg" not in state:
        state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(grad), torch.zeros_like(grad)
    beta1, beta2 = betas
    state["step"] = state.get("step", 0) + 1
    state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
    state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    correction = math.sqrt(1 - beta2 ** state["step"]) / (1 - beta1 ** state["step"])
    return state["exp_avg"] / (state["exp_avg_sq"].sqrt() + eps), correction


def refresh_projector(state: dict, grad: Tensor, rank: int, gap: int, proj_type: str) -> bool:
    """Recompute state['ortho'] at steps 0, gap, 2 gap, ... (counted before this step); the side."""
    left = projects_left(grad.shape, proj_type)
    if "ortho" not in state or state.get("step", 0) % gap == 0:
        state["ortho"] = projector(grad, rank, left)
    return left


def decay(p: Tensor, group: dict) -> None:
    if group["weight_decay"] > 0:
        p.add_(p, alpha=-group["lr"] * group["weight_decay"])


def run_closure(closure: Callable | None):
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class GaLore(torch.optim.Optimizer):
    """Adam on the gradient's top-r singular subspace for 2-d parameters (module docstring)."""

    def __init__(self, params: Iterable, lr: float = 1e-3, rank: int = 128, update_proj_gap: int = 200,
                 scale: float = 0.25, proj_type: str = "std", betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0):
        defaults = dict(lr=lr, rank=rank, update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type,
                        betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        check_ranks(self, lambda group: group["rank"], "GaLore")

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = run_closure(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state, grad = self.state[p], p.grad
                if is_projected(p, group):
                    left = refresh_projector(state, grad, group["rank"], group["update_proj_gap"], group["proj_type"])
                    low = project(grad, state["ortho"], left)  # (m, r) or (r, n)
                    direction, correction = adam_direction(state, low, group["betas"], group["eps"])
                    update = project_back(direction, state["ortho"], left) * group["scale"]
                else:
                    update, correction = adam_direction(state, grad, group["betas"], group["eps"])
                p.add_(update, alpha=-group["lr"] * correction)
                decay(p, group)
        return loss


@register_optimizer("galore")
@dataclass
class GaLoreConfig(OptimizerConfig):
    """GaLore's fields (module docstring)."""

    rank: int = 128
    update_proj_gap: int = 200
    scale: float = 0.25
    proj_type: str = "std"
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-6
    weight_decay: float = 0.0

    description = "Adam on the gradient's top-r SVD subspace per matrix, refreshed every update_proj_gap steps"

    def validate(self) -> None:
        self.check_positive("rank", "update_proj_gap", "scale")
        self.check_positive("eps", "weight_decay", allow_zero=True)
        self.check_betas()
        self.check_choice("proj_type", PROJ_TYPES)

    def build(self, params: Iterable) -> GaLore:
        return GaLore(params, **self.kwargs())
