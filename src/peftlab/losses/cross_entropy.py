"""Cross entropy with label smoothing (Szegedy et al. 2016, "Rethinking the Inception Architecture").

    loss = (1 - eps) (-log p_y) + eps mean_k (-log p_k)          p = softmax(f)

The target puts 1 - eps on the label and eps spread evenly over all K classes (the label too),
as torch.nn.functional.cross_entropy(label_smoothing=eps) does; eps = 0 is plain cross entropy.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from .registry import LossConfig, register_loss


@register_loss("cross_entropy")
@dataclass
class CrossEntropy(LossConfig):
    label_smoothing: float = 0.0  # eps in [0, 1]

    formula = "(1 - eps) CE + eps mean_k(-log p_k)"

    def validate(self) -> None:
        self.check_range("label_smoothing", 0, 1)

    def per_example(self, logits: Tensor, labels: Tensor, **batch) -> Tensor:
        return F.cross_entropy(logits, labels, reduction="none", label_smoothing=self.label_smoothing)
