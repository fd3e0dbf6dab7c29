"""Adam-atan2: Adam without epsilon (Everett et al. 2024, "Scaling Exponents Across
Parameterizations and Optimizers", arXiv 2407.05872, appendix C).

Adam divides by sqrt(v_hat) + eps, and eps matters: too small and tiny second moments blow the
step up, too large and it silently becomes SGD. atan2 is bounded and scale-invariant, so the
division needs no epsilon:

    m_t = b1 m + (1 - b1) g          v_t = b2 v + (1 - b2) g^2
    m_hat = m_t / (1 - b1^t)         v_hat = v_t / (1 - b2^t)
    W <- W (1 - lr * weight_decay) - lr * a * atan2(m_hat, b * sqrt(v_hat))

For small ratios atan2(x, y) ~ x / y, so with a = b = 1 it is Adam at eps = 0; a = 1.27, b = 1
(the paper's defaults) make the update's scale match Adam's. Every parameter trains; the state
is Adam's (two moments per parameter).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from .galore import run_closure
from .registry import OptimizerConfig, register_optimizer


class AdamAtan2(torch.optim.Optimizer):
    """Adam with atan2 in place of the division by sqrt(v) + eps (module docstring)."""

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 weight_decay: float = 0.0, a: float = 1.27, b: float = 1.0):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, a=a, b=b))

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = run_closure(closure)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                state["step"] += 1
                state["exp_avg"].mul_(beta1).add_(p.grad, alpha=1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                m_hat = state["exp_avg"] / (1 - beta1 ** state["step"])
                v_hat = state["exp_avg_sq"] / (1 - beta2 ** state["step"])
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(torch.atan2(m_hat, group["b"] * v_hat.sqrt()), alpha=-group["lr"] * group["a"])
        return loss


@register_optimizer("adam_atan2")
@dataclass
class AdamAtan2Config(OptimizerConfig):
    """Adam-atan2's fields (module docstring)."""

    betas: tuple = (0.9, 0.999)
    weight_decay: float = 0.0
    a: float = 1.27
    b: float = 1.0

    description = "Adam with atan2(m, b sqrt(v)) in place of m / (sqrt(v) + eps): no epsilon to tune"

    def validate(self) -> None:
        self.check_positive("a", "b")
        self.check_positive("weight_decay", allow_zero=True)
        self.check_betas()

    def build(self, params: Iterable) -> AdamAtan2:
        return AdamAtan2(params, **self.kwargs())
