"""NCE + RCE, an active-passive loss (Ma et al. 2020, "Normalized Loss Functions for Deep Learning
with Noisy Labels"; official code HanxunH/Active-Passive-Losses).

    loss = alpha NCE + beta RCE
    NCE  = (-log p_y) / (-sum_k log p_k)          cross entropy normalised over all labels
    RCE  = -A (1 - p_y)                           reverse cross entropy, log 0 taken as A

Both parts are robust (normalised losses are); NCE fits actively, RCE passively. As in the
official code, A = log(1e-4) (the one-hot label clamped at 1e-4) and alpha = beta = 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .registry import LossConfig, register_loss, rce, true_class


@register_loss("nce_rce")
@dataclass
class NCERCE(LossConfig):
    alpha: float = 1.0  # weight of the normalised cross entropy
    beta: float = 1.0  # weight of the reverse cross entropy
    log_zero: float = math.log(1e-4)  # A: log 0 in the reverse cross entropy

    formula = "alpha (-log p_y) / (-sum_k log p_k) - beta A (1 - p_y)"

    def validate(self) -> None:
        self.check_range("alpha", 0, math.inf)
        self.check_range("beta", 0, math.inf)
        self.check_range("log_zero", -math.inf, 0, high_open=True)

    def per_example(self, logits: Tensor, labels: Tensor, **batch) -> Tensor:
        log_p = torch.log_softmax(logits, dim=1)  # (n, K)
        nce = true_class(log_p, labels) / log_p.sum(dim=1)
        return self.alpha * nce + self.beta * rce(logits, labels, self.log_zero)
