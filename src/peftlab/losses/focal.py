"""Focal loss (Lin et al. 2017, "Focal Loss for Dense Object Detection").

    loss = -(1 - p_y)^gamma log p_y          p = softmax(f)

gamma = 0 is cross entropy; a larger gamma turns down well-classified examples. The paper's
default is gamma = 2 (its class weight alpha is left out: weigh classes in the data instead).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .registry import LossConfig, register_loss, true_class


@register_loss("focal")
@dataclass
class Focal(LossConfig):
    gamma: float = 2.0

    formula = "-(1 - p_y)^gamma log p_y"

    def validate(self) -> None:
        self.check_range("gamma", 0, math.inf)

    def per_example(self, logits: Tensor, labels: Tensor, **batch) -> Tensor:
        log_p_y = true_class(torch.log_softmax(logits, dim=1), labels)  # (n,)
        return -((1 - log_p_y.exp()) ** self.gamma) * log_p_y
