"""LDR-KL: the label-distributionally robust loss with a KL regulariser (Zhu, Ying & Yang, ICML
2023, "Label Distributionally Robust Losses for Multi-class Classification: Consistency,
Robustness and Adaptivity"; official code Optimization-AI/ICML2023_LDR, loss.py LDRLoss_V1).

    z   = softplus(f) / mean_k softplus(f)              scores, normalised per row (n, K)
    d_k = c [k != y] + z_k - z_y                        margin-augmented score gaps
    loss = lambda log( (1/K) sum_k exp(d_k / lambda) )

The loss is the worst case over label distributions within a KL ball around uniform: lambda is
the strength of that ball. With c = 0 it is lambda-scaled temperature cross entropy up to a
constant, lambda CE(z / lambda, y) - lambda log K; lambda -> 0 gives the Crammer-Singer hinge
max_k d_k, lambda -> infinity the mean of d_k (a symmetric, noise-robust loss). Defaults are the
official experiments' (margin c = 0.1, lambda = 10). `softplus: false` normalises the raw logits
by their mean absolute value instead (the official ALDR-KL code's default outside CIFAR-100).
Nothing trains but the model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .registry import LossConfig, register_loss, true_class


def normalised_scores(logits: Tensor, softplus: bool) -> Tensor:
    """z: each row of (softplus of) the logits divided by its mean absolute value. (n, K)"""
    scores = F.softplus(logits) if softplus else logits
    scale = scores.abs().mean(dim=1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)
    return scores / scale


def ldr(scores: Tensor, labels: Tensor, margin: float, lam: Tensor | float) -> Tensor:
    """lambda log mean_k exp(d_k / lambda) per row; `lam` a number or one per row (n,). (n,)"""
    lam = torch.as_tensor(lam, dtype=scores.dtype, device=scores.device).reshape(-1, 1)  # (n or 1, 1)
    others = torch.ones_like(scores).scatter(1, labels[:, None], 0.0)  # [k != y]
    gaps = margin * others + scores - true_class(scores, labels)[:, None]  # d (n, K)
    return lam.squeeze(1) * (torch.logsumexp(gaps / lam, dim=1) - math.log(scores.shape[1]))


@register_loss("ldr_kl")
@dataclass
class LDRKL(LossConfig):
    margin: float = 0.1  # c: the margin added to every wrong class's gap
    lam: float = 10.0  # lambda: the KL regularisation strength (a temperature)
    softplus: bool = True  # scores from softplus(f) (true) or from f itself

    formula = "lambda log mean_k exp((c [k != y] + z_k - z_y) / lambda)"

    def validate(self) -> None:
        self.check_range("margin", 0, math.inf)
        self.check_range("lam", 0, math.inf, low_open=True)

    def per_example(self, logits: Tensor, labels: Tensor, **batch) -> Tensor:
        return ldr(normalised_scores(logits, self.softplus), labels, self.margin, self.lam)
