"""Generalized cross entropy (Zhang & Sabuncu 2018, "Generalized Cross Entropy Loss for Training
Deep Neural Networks with Noisy Labels").

    loss = (1 - p_y^q) / q          p = softmax(f), q in (0, 1]

q -> 0 gives cross entropy (-log p_y), q = 1 gives half the MAE (1 - p_y): the larger q, the
less a confidently wrong (noisy) label pulls. The paper's default is q = 0.7.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .registry import LossConfig, register_loss, true_class


@register_loss("gce")
@dataclass
class GCE(LossConfig):
    q: float = 0.7

    formula = "(1 - p_y^q) / q"

    def validate(self) -> None:
        self.check_range("q", 0, 1, low_open=True)

    def per_example(self, logits: Tensor, labels: Tensor, **batch) -> Tensor:
        log_p_y = true_class(torch.log_softmax(logits, dim=1), labels)  # (n,): p_y^q = exp(q log p_y), stable
        return (1 - torch.exp(self.q * log_p_y)) / self.q
