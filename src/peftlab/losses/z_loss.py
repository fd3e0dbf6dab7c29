"""Cross entropy plus the Z-loss (Chowdhery et al. 2022, PaLM, section 5; also ST-MoE, Zoph et al. 2022).

    loss = -log p_y + z_weight (log Z)^2          log Z = logsumexp_k f_k

The auxiliary term keeps the softmax normaliser log Z near 0, which PaLM found to stabilise
training; it leaves the predicted distribution free. PaLM's weight is 1e-4.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .registry import LossConfig, register_loss


@register_loss("z_loss")
@dataclass
class ZLoss(LossConfig):
    z_weight: float = 1.0e-4

    formula = "CE + z_weight (logsumexp f)^2"

    def validate(self) -> None:
        self.check_range("z_weight", 0, math.inf)

    def per_example(self, logits: Tensor, labels: Tensor, **batch) -> Tensor:
        log_z = torch.logsumexp(logits, dim=1)  # (n,)
        return F.cross_entropy(logits, labels, reduction="none") + self.z_weight * log_z ** 2
