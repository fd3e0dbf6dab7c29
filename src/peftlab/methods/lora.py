"""LoRA: Low-Rank Adaptation (Hu et al. 2021, arXiv 2106.09685), with its initialisations.

    h = W0 x + s * B A dropout(x)          W' = W0 + s * B @ A          s = alpha / r
                                                                 (rsLoRA: s = alpha / sqrt(r))
    A: (r, in), B: (out, r). Trained: A and B. W0 is frozen.

Initialisations (`init`):
    "kaiming"   A ~ kaiming-uniform(a=sqrt(5)), B = 0            (Hu et al.; `peft`'s default)
    "gaussian"  A ~ N(0, 1/r^2), B = 0                             (as `peft`'s "gaussian")
    "pissa"     top-r SVD of W0 = U S V^T:  B = U_r S_r^(1/2)/sqrt(s), A = S_r^(1/2) V_r^T/sqrt(s)
                (Meng et al. 2024, arXiv 2404.02948); `svd_niter` switches to a fast randomised SVD
    "olora"     QR of W0: B = Q[:, :r], A = R[:r]                  (Büyükakyüz 2024, arXiv 2406.01775)
    "loftq"     on a quantized base: Q_t = q(W0 - s B A), s B A = top-r SVD of (W0 - Q_t), `loftq_iters`
                times (Li et al. 2023, arXiv 2310.08659). It needs W0 in full precision while the layer
                is quantized, so peftlab.quantize.quantize(model, scheme, loftq=LoRA(init="loftq"))
                computes it and attaches; attach alone refuses it (a saved LoftQ adapter loads as usual)

PiSSA and OLoRA move s*B0@A0 out of the frozen weight (the host holds W0 - s*B0@A0 while the
adapter is attached) so the output at init is unchanged; the initial factors B0, A0 are kept
as buffers, so a saved adapter re-applies to the original base weights.

On a quantized base (peftlab.quantize) LoRA needs only the host's forward: every init but
PiSSA's and OLoRA's (which rewrite W0) works there.

On nn.Embedding the input is an index: A acts as a lookup table, dropout does not apply, and,
as in `peft`, A starts at 0 and B ~ N(0, 1).

On nn.Linear, A is kept below W0 in one (out + r, in) buffer (peftlab.core, the stacked path), and
while the adapter runs alone without dropout in training the forward is `StackedLoRA`: the chain's
arithmetic in one autograd node, whose backward computes dx through [W0; A] in one GEMM.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..core import Adapter, PeftLoRA
from ..errors import PeftlabError
from ..hosts import ALL_KINDS, HostKind
from ..linalg import top_r_svd
from ..registry import MethodConfig, Site, register

INITS = ("kaiming", "gaussian", "pissa", "olora", "loftq")


class StackedLoRA(torch.autograd.Function):
    """y = x W0^T + b + s (x A^T) B^T, reading W0 and A as the one stacked matrix S = [W0; A] (out + r, in).

    Forward, as the chain computes it, bit for bit: y = x W0^T + b, h = x A^T (tokens, r), then
    y += (s h) B^T in place. (One GEMM x S^T gives [y | h] too, but its (tokens, out + r) rows must
    then be copied into a contiguous (tokens, out) output, an in-place op on a view of them being
    forbidden after a custom Function: measured on CPU that copy costs what the second read of x
    saves, and the h columns round differently from x A^T alone.)
    Backward, with dh = s dy B the gradient w.r.t. h (tokens, r):
        dx = [dy | dh] S   (one GEMM)      dA = dh^T x      dB = s dy^T h      db = sum_tokens dy
    W0 is frozen: no gradient for it (the slot takes this path only then). A is an input only so that
    its gradient reaches it; its values are read through S.
    """

    @staticmethod
    def forward(ctx, x: Tensor, A: Tensor, B: Tensor, bias: Tensor | None, stacked: Tensor, scale: float) -> Tensor:
        out = B.shape[0]
        x_rows = x.reshape(-1, x.shape[-1])  # (tokens, in)
        W0, A_rows = stacked[:out], stacked[out:]  # views: (out, in), (r, in)
        y = torch.mm(x_rows, W0.T) if bias is None else torch.addmm(bias, x_rows, W0.T)  # (tokens, out)
        h = torch.mm(x_rows, A_rows.T)  # (tokens, r)
        y.addmm_(h * scale, B.T)
        ctx.save_for_backward(x, h, B, stacked)
        ctx.scale = scale
        return y.view(*x.shape[:-1], out)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, h, B, stacked = ctx.saved_tensors
        need_x, need_A, need_B, need_bias = ctx.needs_input_grad[:4]
        dy_rows = dy.reshape(-1, B.shape[0])  # (tokens, out)
        dh = torch.mm(dy_rows, B).mul_(ctx.scale)  # (tokens, r)
        dx = dA = dB = dbias = None
        if need_x:
            dx = torch.mm(torch.cat([dy_rows, dh], dim=1), stacked).view(x.shape)  # [dy | dh] [W0; A]
        if need_A:
            dA = torch.mm(dh.T, x.reshape(-1, x.shape[-1]))  # (r, in)
        if need_B:
            dB = torch.mm(dy_rows.T, h).mul_(ctx.scale)  # (out, r)
        if need_bias:
            dbias = dy_rows.sum(0)
        return dx, dA, dB, dbias, None, None


def zero_factors(r: int, in_features: int, out_features: int, dtype: torch.dtype) -> tuple[nn.Parameter, nn.Parameter]:
    """LoRA's trained pair, zero until an init fills it: A (r, in), B (out, r)."""
    return (nn.Parameter(torch.zeros(r, in_features, dtype=dtype)),
            nn.Parameter(torch.zeros(out_features, r, dtype=dtype)))


class LoRAAdapter(Adapter):
    def __init__(self, kind: HostKind, in_features: int, out_features: int, r: int, scale: float,
                 dropout: float, dtype: torch.dtype):
        super().__init__(kind)
        self.scale = scale
        self.A, self.B = zero_factors(r, in_features, out_features, dtype)  # (r, in), (out, r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 and not kind.index_input else nn.Identity()
        self.has_residual = False

    def forward(self, host: nn.Module, x: Tensor, base) -> Tensor:
        h = self.kind.apply_in(host, self.dropout(x), self.A)  # (..., r); (N, r, H, W) for conv
        # Scale the rank-r activations, not the (..., out) ones, and fuse the add into the GEMM.
        return self.kind.add_out(host, base(x), h * self.scale, self.B)

    def stack_rows(self) -> nn.Parameter | None:
        return self.A if self.kind.stackable else None

    def dropping(self) -> bool:
        """Dropout changes x for A now (training, p > 0): x for W0 and x for A differ, no stacked path."""
        return isinstance(self.dropout, nn.Dropout) and self.dropout.training

    def forward_stacked(self, host: nn.Module, x: Tensor, stacked: Tensor) -> Tensor | None:
        if self.dropping():
            return None
        return StackedLoRA.apply(x, self.A, self.B, host.bias, stacked, self.scale)

    def delta_weight(self) -> Tensor:
        return self.scale * (self.B @ self.A)  # (out, in)

    def keep_initial_factors(self) -> None:
        """For SVD/QR inits: remember B0, A0; the host gives up s*B0@A0 while attached."""
        self.register_buffer("A0", self.A.detach().clone())
        self.register_buffer("B0", self.B.detach().clone())
        self.has_residual = True

    def residual(self) -> Tensor:
        return self.scale * (self.B0 @ self.A0)

    def factors_on_original_base(self) -> tuple[Tensor, Tensor]:
        """(A', B') with s B' A' the change of the ORIGINAL W0: (A, B), or for SVD/QR inits, whose
        host holds W0 - s B0 A0, s (B A - B0 A0) = s [B, -B0] @ [A; A0] (rank 2r, same scale)."""
        if not self.has_residual:
            return self.A, self.B
        return torch.cat([self.A, self.A0]), torch.cat([self.B, -self.B0], dim=1)

    def lora_factors(self) -> tuple[Tensor, Tensor]:
        A, B = self.factors_on_original_base()
        return A, self.scale * B


def initialise(adapter: LoRAAdapter, init: str, weight: Tensor, svd_niter: int | None) -> None:
    """Fill A and B in place. `weight` is the host matrix W0, (out, in)."""
    A, B, s, r = adapter.A, adapter.B, adapter.scale, adapter.A.shape[0]
    with torch.no_grad():
        if adapter.kind.index_input:
            A.zero_()
            nn.init.normal_(B)
            return
        if init == "kaiming":
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            B.zero_()
        elif init == "gaussian":
            nn.init.normal_(A, std=1 / r)
            B.zero_()
        elif init == "pissa":
            U, S, Vh = top_r_svd(weight.detach().float(), r, svd_niter)
            S = S / s  # so that s * B @ A equals the top-r part of W0
            A.copy_(torch.diag(S.sqrt()) @ Vh)
            B.copy_(U @ torch.diag(S.sqrt()))
        elif init == "olora":
            Q, R = torch.linalg.qr(weight.detach().float())
            A.copy_(R[:r])
            B.copy_(Q[:, :r])
    if init in ("pissa", "olora"):
        adapter.keep_initial_factors()


def residual_adapter(site: Site, r: int, scale: float, dropout: float,
                     factors: tuple[Tensor, Tensor] | None) -> LoRAAdapter:
    """A LoRA adapter starting from given factors (A (r, in), B (out, r)) that move out of the host.

    For data-driven inits (CorDA, LoRA-GA): the host holds W0 - s*B0@A0 while attached, so the
    output is unchanged at init. factors=None builds the shapes only, for saved values to fill.
    """
    adapter = LoRAAdapter(site.kind, site.in_features, site.out_features, r, scale, dropout, site.weight.dtype)
    if factors is not None:
        with torch.no_grad():
            adapter.A.copy_(factors[0])
            adapter.B.copy_(factors[1])
    adapter.keep_initial_factors()
    return adapter


@register("lora", pissa={"init": "pissa"}, olora={"init": "olora"}, rslora={"rslora": True})
@dataclass
class LoRA(MethodConfig):
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    init: str = "kaiming"
    rslora: bool = False
    svd_niter: int | None = None  # PiSSA: None = exact SVD, else iterations of a randomised SVD
    loftq_iters: int = 1  # LoftQ: alternations of quantizing and the SVD (1: peft's replace_lora_weights_loftq)

    hosts = ALL_KINDS
    quantized_base = "ok"
    trainable_formula = "r * (in + out) per site"

    def validate(self) -> None:
        self.check_positive_int("r", "loftq_iters")
        self.check_dropout()
        if self.init not in INITS:
            raise PeftlabError(f"LoRA init {self.init!r} is unknown; choose one of {INITS}")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def validate_site(self, site: Site) -> None:
        site.check_rank(self.r)
        if self.init in ("pissa", "olora") and site.kind.index_input:
            raise PeftlabError(f"init {self.init!r} needs a weight matrix input; {site.name} is an embedding: "
                               "exclude it")
        if self.init in ("pissa", "olora") and site.quantized:
            raise PeftlabError(f"LoRA init {self.init!r} moves the top of {site.name}'s weight into the adapter, but "
                               "that weight is quantized: pass init: gaussian (or kaiming, or loftq through "
                               "peftlab.quantize.quantize), or attach before quantizing")

    def peft_lora(self, adapter: LoRAAdapter) -> PeftLoRA:
        A, B = adapter.factors_on_original_base()  # PiSSA/OLoRA: rank 2r, see peftlab.io.peft
        return PeftLoRA(A, B, self.alpha, self.r, self.rslora, self.dropout)

    def peft_config(self) -> dict[str, Any]:
        return {"lora_dropout": self.dropout, "use_rslora": self.rslora}

    def build(self, site: Site, stats=None, initialize: bool = True) -> LoRAAdapter:
        weight = site.weight
        adapter = LoRAAdapter(site.kind, site.in_features, site.out_features, self.r, self.scale, self.dropout,
                              weight.dtype)
        if initialize and self.init == "loftq":
            raise PeftlabError(f"LoRA init 'loftq' fits A, B to {site.name}'s full-precision weight as it is "
                               "quantized: pass this config to peftlab.quantize.quantize(model, 'nf4', loftq=config), "
                               "which quantizes the model and attaches it")
        if initialize:
            initialise(adapter, self.init, weight, self.svd_niter)
        elif self.init in ("pissa", "olora"):
            adapter.keep_initial_factors()  # shapes only: the saved values fill them
        return adapter
