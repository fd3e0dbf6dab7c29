"""Symmetric cross entropy (Wang et al. 2019, "Symmetric Cross Entropy for Robust Learning with
Noisy Labels"; official code YisenWang/symmetric_cross_entropy_for_noisy_labels).

    loss = alpha CE + beta RCE          RCE = -sum_k p_k log q_k = -A (1 - p_y)

q is the one-hot label, whose log 0 is taken as A (`log_zero`). The official code clamps the
one-hot label at 1e-4, so A = log(1e-4) = -9.21 (the paper's text says A = -4); alpha = 0.1,
beta = 1.0 are the paper's CIFAR-10 values.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from .registry import LossConfig, register_loss, rce


@register_loss("sce")
@dataclass
class SCE(LossConfig):
    alpha: float = 0.1  # weight of cross entropy
    beta: float = 1.0  # weight of reverse cross entropy
    log_zero: float = math.log(1e-4)  # A: log 0 in the reverse cross entropy

    formula = "alpha CE - beta A (1 - p_y)"

    def validate(self) -> None:
        self.check_range("alpha", 0, math.inf)
        self.check_range("beta", 0, math.inf)
        self.check_range("log_zero", -math.inf, 0, high_open=True)

    def per_example(self, logits: Tensor, labels: Tensor, **batch) -> Tensor:
        return self.alpha * F.cross_entropy(logits, labels, reduction="none") + self.beta * rce(logits, labels, self.log_zero)
