"""Mean absolute error on the probabilities (Ghosh, Kumar & Sastry 2017, "Robust Loss Functions
under Label Noise for Deep Neural Networks").

    loss = sum_k |onehot(y)_k - p_k| = 2 (1 - p_y)          p = softmax(f)

Symmetric (the sum over all labels is constant), hence robust to uniform noise, but slow to fit.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .registry import LossConfig, register_loss, true_class


@register_loss("mae")
@dataclass
class MAE(LossConfig):
    formula = "sum_k |onehot_k - p_k| = 2 (1 - p_y)"

    def per_example(self, logits: Tensor, labels: Tensor, **batch) -> Tensor:
        return 2 * (1 - true_class(torch.softmax(logits, dim=1), labels))
