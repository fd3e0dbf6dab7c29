"""FLoRA: a Tucker-form update with a small trained core, for linear and conv2d weights.

FLoRA: Low-Rank Core Space for N-dimension (Si, Wang, Yang, Xu, Li, Dai, Qiao, Yang & Shen
2024, arXiv 2405.14739; official code Chongjie-Si/FLoRA `layers.py`, and the NLP version in
Chongjie-Si/Subspace-Tuning `peft/tuners/flora.py`).

The update keeps the weight's own shape and is a Tucker decomposition: a small core G times
one factor matrix per dimension (mode-n products, ×_n):

    linear (2-d):  ΔW = s * G ×_1 U_out ×_2 U_in                   = s * U_out G U_in^T
    conv2d (4-d):  ΔW = s * G ×_1 U_out ×_2 U_in ×_3 U_h ×_4 U_w
                   ΔW[o,i,h,w] = s * sum_{a,b,c,d} G[a,b,c,d] U_out[o,a] U_in[i,b] U_h[h,c] U_w[w,d]

    G: (r, r) or (r, r, r_k, r_k)          U_out: (out, r)  U_in: (in, r)  U_h: (kh, r_k)  U_w: (kw, r_k)
    s = alpha / r

Each mode's rank is capped at that dimension's size (a larger Tucker rank adds nothing), so
one config serves, e.g., a first convolution with 3 input channels: r_in = min(r, in),
r_out = min(r, out), r_k = min(kernel_r, kernel size). The official conv example uses
r = [16, 16, 2, 2]. s uses the nominal r.

Trained: the core and every factor. The core starts at 0 (both official codes), so the
output is unchanged at attach. Factors, as the official code for each layer kind:
    linear: U_in^T (r, in) and U_out (out, r) ~ kaiming-uniform(a=sqrt(5)) like nn.Linear weights
            (Subspace-Tuning flora.py)
    conv2d: every factor (dim, rank) ~ kaiming-normal(a=sqrt(3)) over its rank (FLoRA layers.py)
Scale: the vision code multiplies by a plain `scale` (4.0 in its example), the NLP code by
alpha / r; here alpha / r for both, default alpha = 2 r as LoRA's.

Learning rate: the core starts at 0 and the factors receive no gradient until it grows, so
FLoRA wants a larger rate than LoRA. MiniLM-L6 on movie sentiment, q/v, r = 8, 150 steps of
32: lr 5e-4 gave 0.679 test accuracy, lr 5e-3 gave 0.817 (LoRA at 5e-4: 0.747).

Conv2d fast path: the kernel ΔW (out, in, kh, kw) is small, so it is rebuilt each forward
and applied as one extra convolution with the host's stride, padding and dilation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core import Adapter
from ..hosts import HostKind
from ..registry import MethodConfig, Site, register


class FLoRAAdapter(Adapter):
    def __init__(self, kind: HostKind, out_features: int, in_channels: int, kernel: tuple[int, ...], r: int,
                 kernel_r: int, scale: float, dropout: float, dtype: torch.dtype):
        super().__init__(kind)
        self.scale, self.kernel = scale, kernel
        r_out, r_in = min(r, out_features), min(r, in_channels)
        kernel_ranks = [min(kernel_r, k) for k in kernel]  # () for linear hosts
        self.core = nn.Parameter(torch.zeros(r_out, r_in, *kernel_ranks, dtype=dtype))  # G
        self.factor_out = nn.Parameter(torch.zeros(out_features, r_out, dtype=dtype))  # U_out (out, r_out)
        self.factor_in = nn.Parameter(torch.zeros(in_channels, r_in, dtype=dtype))  # U_in (in, r_in)
        # One factor per kernel dimension: U_h (kh, r_k), U_w (kw, r_k).
        self.factor_kernel = nn.ParameterList(
            [nn.Parameter(torch.zeros(k, rk, dtype=dtype)) for k, rk in zip(kernel, kernel_ranks)]
        )
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def initialise(self) -> None:
        with torch.no_grad():
            self.core.zero_()
            if not self.kernel:  # linear: as nn.Linear weights, U_in^T (r, in) and U_out (out, r)
                nn.init.kaiming_uniform_(self.factor_in.T, a=math.sqrt(5))
                nn.init.kaiming_uniform_(self.factor_out, a=math.sqrt(5))
            else:  # conv: every (dim, rank) factor over its rank
                for factor in (self.factor_out, self.factor_in, *self.factor_kernel):
                    nn.init.kaiming_normal_(factor, a=math.sqrt(3))

    def delta_tensor(self) -> Tensor:
        """ΔW in the host's own shape: (out, in) or (out, in, kh, kw)."""
        if not self.kernel:
            return self.scale * (self.factor_out @ self.core @ self.factor_in.T)
        U_h, U_w = self.factor_kernel
        return self.scale * torch.einsum("abcd,oa,ib,hc,wd->oihw", self.core, self.factor_out, self.factor_in, U_h, U_w)

    def forward(self, host: nn.Module, x: Tensor, base) -> Tensor:
        x_in = self.dropout(x)
        if not self.kernel:  # x -> U_in^T x (r) -> G (r) -> U_out (out); never builds ΔW
            h = self.kind.apply_in(host, x_in, self.factor_in.T) @ self.core.T
            return base(x) + self.kind.apply_out(host, h, self.factor_out) * self.scale
        return base(x) + self.kind.apply_in(host, x_in, self.delta_weight())  # one conv with kernel ΔW

    def delta_weight(self) -> Tensor:
        return self.delta_tensor().flatten(1)  # (out, in * kh * kw), the host's matrix view

    def lora_factors(self) -> tuple[Tensor, Tensor]:
        # ΔW = s U_out @ M with M (r_out, in * kh * kw): every mode but the output one, contracted
        if not self.kernel:
            return self.core @ self.factor_in.T, self.scale * self.factor_out
        U_h, U_w = self.factor_kernel
        return torch.einsum("abcd,ib,hc,wd->aihw", self.core, self.factor_in, U_h, U_w).flatten(1), \
            self.scale * self.factor_out


@register("flora")
@dataclass
class FLoRA(MethodConfig):
    r: int = 8  # rank of the output and input modes
    kernel_r: int = 2  # rank of each kernel mode (conv2d), capped at the kernel size
    alpha: float = 16.0
    dropout: float = 0.0

    hosts = ("linear", "conv1d", "conv2d")
    trainable_formula = "linear: r^2 + r*(in + out); conv2d: r^2*rk^2 + r*(cin + out) + rk*(kh + kw) per site"

    def validate(self) -> None:
        self.check_positive_int("r", "kernel_r")
        self.check_dropout()

    def _dims(self, site: Site) -> tuple[int, int, tuple[int, ...]]:
        """(out, in channels, kernel size) of a host; kernel () for linear hosts."""
        if site.kind.name == "conv2d":
            return site.host.out_channels, site.host.in_channels, tuple(site.host.kernel_size)
        return site.out_features, site.in_features, ()

    def build(self, site: Site, stats=None, initialize: bool = True) -> FLoRAAdapter:
        out_features, in_channels, kernel = self._dims(site)
        adapter = FLoRAAdapter(site.kind, out_features, in_channels, kernel, self.r, self.kernel_r, self.alpha / self.r,
                               self.dropout, site.weight.dtype)
        if initialize:
            adapter.initialise()
        return adapter
