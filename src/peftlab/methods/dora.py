"""DoRA: Weight-Decomposed Low-Rank Adaptation (Liu et al. 2024, arXiv 2402.09353).

DoRA splits each weight into a magnitude and a direction, trains the magnitude directly and
the direction through a LoRA update (Eq. 5 of the paper):

    V  = W0 + s * B @ A                 (out, in)   LoRA's weight, s = alpha / r (rsLoRA: alpha / sqrt(r))
    W' = m * V / ||V||                  ||V||[i] = sqrt(sum_j V[i, j]^2): one norm per output row
    h  = W' x + b

    A: (r, in), B: (out, r), m: (out,). Trained: A, B, m. W0 and the bias b are frozen.

Initialisation: A, B as LoRA's ("kaiming" or "gaussian": B = 0), and m = ||W0 + s B A|| per
row, so W' = W0 and the output is unchanged at init.

Choices, all as in `peft` 0.21 (tuners/lora/dora.py and variants.py), whose numbers this file
reproduces:
  * ||V|| is treated as a constant in the backward pass (the paper's section 4.3): it follows
    A and B in the forward pass but sends no gradient to them.
  * The bias is not rescaled: h = (m / ||V||) * (W0 x + s B A x) + b.
  * With dropout, while training, the dropped input feeds both the LoRA branch and the
    rescaled W0 term: h = (W0 x + b) + (g - 1) * W0 d(x) + g * s * B A d(x), g = m / ||V||.
    That costs one more product with W0; without dropout (or in eval mode) the host's own
    output is reused and no extra product with W0 is made.

The fast path never forms the (out, in) matrix V. Row by row,
    ||W0 + s B A||^2 = ||W0||^2 + 2 s <W0 A^T, B> + s^2 <B (A A^T), B>
which needs W0 A^T (out, r), A A^T (r, r) and one pass over W0 for ||W0||^2: no (out, in)
temporary. ||W0||^2 is recomputed each call rather than cached: it costs 1/r of the W0 A^T
product, and a host weight rewritten in place (another adapter merged, a residual init)
can then never leave a stale norm behind. The identity is exact; in floating point it loses
relative precision only where a row of V nearly cancels (||V|| << ||W0||), which training
from m = ||W0|| does not approach. The sum is taken in fp32 even for half-precision weights.

Hosts: layers whose output channels are the last dimension (nn.Linear, transformers' Conv1D).
On nn.Linear without dropout in training, W0 x + b + s B A x comes from LoRA's stacked path
(lora.StackedLoRA: one GEMM through [W0; A]) and is then rescaled as above.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..core import PeftLoRA
from ..errors import PeftlabError
from ..hosts import LINEAR_LIKE, HostKind
from ..registry import MethodConfig, Site, register
from .lora import LoRAAdapter, StackedLoRA, initialise

INITS = ("kaiming", "gaussian")


def row_norm(V: Tensor) -> Tensor:
    """||V|| per output row of an (out, in) matrix: (out,). The reference form of the norm."""
    return torch.linalg.vector_norm(V, dim=1)


@torch.no_grad()
def fast_weight_norm(weight: Tensor, A: Tensor, B: Tensor, scale: float) -> Tensor:
    """||W0 + s B A|| per output row, (out,), from (out, r) and (r, r) products only. No gradient."""
    dtype = torch.promote_types(weight.dtype, torch.float32)  # half precision sums in fp32
    W0, A, B = weight.to(dtype), A.to(dtype), B.to(dtype)
    w0_sq = torch.linalg.vector_norm(W0, dim=1).square()  # ||W0_i||^2          (out,)
    cross = (B * (W0 @ A.T)).sum(1)  # <W0_i, (B A)_i>                          (out,)
    update_sq = ((B @ (A @ A.T)) * B).sum(1)  # ||(B A)_i||^2                   (out,)
    squared = w0_sq + (2 * scale) * cross + (scale * scale) * update_sq
    return _nonzero(squared.clamp_min(0).sqrt().to(weight.dtype))


def _nonzero(norm: Tensor) -> Tensor:
    # A zero row (a pruned output, with B = 0) has m = 0 too: keep m / ||V|| at 0, not 0/0.
    return norm.clamp_min(torch.finfo(norm.dtype).tiny)


class ScaleChannels(torch.autograd.Function):
    """y = g * z + (1 - g) * b over the last (channel) dimension, with a lean backward.

    z: (..., out) the host's output plus the LoRA branch, bias included; g, b: (out,).
    Autograd's own addcmul backward makes several passes over the (..., out) tensors and
    allocates a buffer for each; this one computes dg = sum_tokens dy * (z - b) and
    dz = dy * g through a single (..., out) buffer, which keeps DoRA's step close to LoRA's.
    """

    @staticmethod
    def forward(ctx, z: Tensor, g: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(z, g, bias)
        if bias is None:
            return z * g
        return torch.addcmul((1 - g) * bias, z, g)

    @staticmethod
    def backward(ctx, dy: Tensor):
        z, g, bias = ctx.saved_tensors
        need_z, need_g, need_bias = ctx.needs_input_grad
        dy_rows = dy.reshape(-1, dy.shape[-1])  # (tokens, out)
        dz = dg = dbias = None
        dy_sum = dy_rows.sum(0) if bias is not None and (need_g or need_bias) else None  # (out,)
        if need_g:
            product = dy * z  # one (..., out) buffer, reused for dz below: fresh memory is not free on CPU
            dg = product.reshape(-1, product.shape[-1]).sum(0)  # sum_tokens dy * z   (out,)
            if bias is not None:
                dg = dg - bias * dy_sum
            if need_z:
                dz = torch.mul(dy, g, out=product)
        elif need_z:
            dz = dy * g
        if need_bias:
            dbias = (1 - g) * dy_sum
        return dz, dg, dbias


class DoRAAdapter(LoRAAdapter):
    """LoRA's A, B and dropout, plus the magnitude m: W' = m * (W0 + s B A) / ||W0 + s B A||."""

    additive = False  # W' is a rescaling of W0 + s B A, not W0 plus something

    def __init__(self, kind: HostKind, in_features: int, out_features: int, r: int, scale: float,
                 dropout: float, dtype: torch.dtype):
        super().__init__(kind, in_features, out_features, r, scale, dropout, dtype)
        self.m = nn.Parameter(torch.zeros(out_features, dtype=dtype))  # (out,)
        self.uses_dropout = dropout > 0

    def weight_norm(self, weight: Tensor) -> Tensor:
        return fast_weight_norm(weight, self.A, self.B, self.scale)

    def forward(self, host: nn.Module, x: Tensor, base) -> Tensor:
        weight = self.kind.matrix(host)  # W0 as (out, in)
        g = self.m / self.weight_norm(weight)  # (out,); the norm is a constant for autograd
        if self.uses_dropout and self.training:
            dropped = self.dropout(x)
            lora = self.kind.apply_out(host, self.kind.apply_in(host, dropped, self.A), self.B * self.scale)
            w0_dropped = self.kind.apply_in(host, dropped, weight)  # W0 d(x), no bias   (..., out)
            return base(x) + (g - 1) * w0_dropped + g * lora
        # As in LoRA: s scales the rank-r activations, and the add rides on the B GEMM.
        h = self.kind.apply_in(host, x, self.A)  # (..., r)
        adapted = self.kind.add_out(host, base(x), h * self.scale, self.B)  # W0 x + b + s B A x  (..., out)
        return ScaleChannels.apply(adapted, g, host.bias)  # g * (W0 x + s B A x) + b

    def forward_stacked(self, host: nn.Module, x: Tensor, stacked: Tensor) -> Tensor | None:
        if self.uses_dropout and self.training:
            return None
        g = self.m / self.weight_norm(self.kind.matrix(host))  # (out,), a constant for autograd
        adapted = StackedLoRA.apply(x, self.A, self.B, host.bias, stacked, self.scale)  # W0 x + b + s B A x
        return ScaleChannels.apply(adapted, g, host.bias)

    def lora_factors(self) -> None:
        return None  # the rescaling by m / ||W0 + s B A|| is not a low-rank change

    def merged_weight(self, weight: Tensor) -> Tensor:
        V = weight + self.delta_weight().to(weight.dtype)  # (out, in)
        return V * (self.m / _nonzero(row_norm(V))).unsqueeze(1)

    def initialise_magnitude(self, weight: Tensor) -> None:
        """m = ||W0 + s B A|| per row, so that W' = W0 at init."""
        with torch.no_grad():
            self.m.copy_(row_norm(weight.detach() + self.delta_weight().to(weight.dtype)))


@register("dora")
@dataclass
class DoRA(MethodConfig):
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    init: str = "kaiming"
    rslora: bool = False

    hosts = LINEAR_LIKE
    trainable_formula = "r * (in + out) + out per site"

    def validate(self) -> None:
        self.check_positive_int("r")
        self.check_dropout()
        if self.init not in INITS:
            raise PeftlabError(f"DoRA init {self.init!r} is unknown; choose one of {INITS} "
                               "(SVD-based inits are LoRA options: use peftlab.LoRA)")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def validate_site(self, site: Site) -> None:
        site.check_rank(self.r)

    def peft_lora(self, adapter: DoRAAdapter) -> PeftLoRA:
        A, B = adapter.factors_on_original_base()  # PiSSA/OLoRA: rank 2r, see peftlab.io.peft
        return PeftLoRA(A, B, self.alpha, self.r, self.rslora, self.dropout,
                        {"lora_magnitude_vector": adapter.m})

    def peft_config(self) -> dict[str, Any]:
        return {"lora_dropout": self.dropout, "use_rslora": self.rslora, "use_dora": True}

    def build(self, site: Site, stats=None, initialize: bool = True) -> DoRAAdapter:
        weight = site.weight
        adapter = DoRAAdapter(site.kind, site.in_features, site.out_features, self.r, self.scale, self.dropout,
                              weight.dtype)
        if initialize:
            initialise(adapter, self.init, weight, None)
            adapter.initialise_magnitude(weight)
        return adapter
