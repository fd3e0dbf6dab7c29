"""Delta: a dense change of each chosen weight, held beside it (a task vector per matrix).

Ilharco et al. 2023, "Editing Models with Task Arithmetic" (arXiv 2212.04089), call the change
fine-tuning makes, tau = theta_ft - theta_pre, a task vector; this method holds that change for
each chosen matrix as an adapter:

    h = W0 x + Delta x          W' = W0 + Delta          Delta: (out, in), starts at 0

Trained: Delta (every entry: full fine-tuning of the chosen matrices, kept apart from W0, so it
can be switched off, unmerged, saved alone). `peftlab.combine` attaches its dense results (task
arithmetic, TIES, DARE, magnitude pruning) as this method. The layer's own operation applies
Delta, so Linear, Conv1D, Embedding (a lookup in Delta) and Conv2d (a convolution with Delta as
the kernel) are all hosts.

The `peft` format holds it as a LoRA of rank k = min(out, in): B @ A = Delta with A = Delta,
B = I (out <= in) or A = I, B = Delta (out > in); exact, though as large as the matrix.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core import Adapter
from ..hosts import ALL_KINDS, HostKind
from ..registry import MethodConfig, Site, register


class DeltaAdapter(Adapter):
    def __init__(self, kind: HostKind, in_features: int, out_features: int, dtype: torch.dtype):
        super().__init__(kind)
        self.delta = nn.Parameter(torch.zeros(out_features, in_features, dtype=dtype))  # (out, in)

    def forward(self, host: nn.Module, x: Tensor, base) -> Tensor:
        # The layer's own operation with Delta as its weight, no bias: (..., out) or (N, out, H, W)
        return base(x) + self.kind.apply_in(host, x, self.delta)

    def delta_weight(self) -> Tensor:
        return self.delta

    def lora_factors(self) -> tuple[Tensor, Tensor]:
        out_features, in_features = self.delta.shape
        if out_features <= in_features:  # A = Delta (out, in), B = I (out, out)
            return self.delta, torch.eye(out_features, dtype=self.delta.dtype, device=self.delta.device)
        return torch.eye(in_features, dtype=self.delta.dtype, device=self.delta.device), self.delta  # A = I, B = Delta


@register("delta")
@dataclass
class Delta(MethodConfig):
    hosts = ALL_KINDS
    trainable_formula = "out * in per site (the whole matrix)"

    def build(self, site: Site, stats=None, initialize: bool = True) -> DeltaAdapter:
        return DeltaAdapter(site.kind, site.in_features, site.out_features, site.weight.dtype)
