"""LoLDU: train the diagonal of an LDU decomposition of the frozen weight (Shi et al. 2024, arXiv 2410.13618).

Paper: Yiming Shi, Jiwei Wei, Yujia Wu, Ran Ran, Chengwei Sun, Shiyuan He, Yang Yang,
"LoLDU: Low-Rank Adaptation via Lower-Diag-Upper Decomposition for Parameter-Efficient
Fine-Tuning", 2024, arXiv 2410.13618. Official code: SKDDJ/LoLDU, `minloldu/loldu.py`.

The LU factorisation with partial pivoting of W0 (out x in), rescaled to unit diagonals:

    W0 = P L U = P L diag(D) U'        D = diag(U),  U' = U / D (row-wise, unit diagonal)

Keep the first r columns of L and rows of U':  L_r (out, r), U_r (in-space, (r, in)).

    W_res = W0 - s * P L_r diag(D_r) U_r                       (written into the host while attached)
    W'    = W_res + s * P L_r diag(z) U_r                      s = alpha / r
    h     = W_res x + s * P L_r (z * (U_r x))                  (fast path, never builds the matrix)

Trained: z (r values per site), initialised to D_r, so the output at attach is unchanged.
P, L_r and U_r are frozen; P L_r is stored once as one (out, r) buffer.

Defaults and choices:
  - alpha = 1 (s = 1/r), as the official `from_linear` default.
  - The official code also builds the scale s as a parameter but its parameter helper trains
    only z; `train_scale=True` makes s a trained scalar as well (one more parameter per site).
  - Only the official "lu" initialisation of z is offered: the other initialisations in the
    official code change the output at init (W_res always uses D_r).
  - A pivot that is exactly 0 (a rank-deficient W0) cannot be divided out: that row of U keeps
    its scale and its z starts at 1, so the factors still reconstruct W0 exactly.
  - The factorisation runs in float32 and the results are cast to the weight's dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core import Adapter
from ..errors import PeftlabError
from ..hosts import HostKind
from ..registry import MethodConfig, Site, register


def ldu(weight: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """P, L, D, U' with weight = P @ L @ diag(D) @ U' (float32; zero pivots kept as 1, see above).

    weight (m, n) -> P (m, m), L (m, k), D (k,), U' (k, n), k = min(m, n).
    """
    P, L, U = torch.linalg.lu(weight.detach().float())
    pivots = torch.diagonal(U)
    D = torch.where(pivots == 0, torch.ones_like(pivots), pivots)
    return P, L, D, U / D[:, None]


class LoLDUAdapter(Adapter):
    has_residual = True

    def __init__(self, kind: HostKind, in_features: int, out_features: int, r: int, scale: float,
                 train_scale: bool, dtype: torch.dtype):
        super().__init__(kind)
        self.register_buffer("PL", torch.zeros(out_features, r, dtype=dtype))  # P @ L_r, (out, r)
        self.register_buffer("U", torch.zeros(r, in_features, dtype=dtype))  # U_r, unit diagonal, (r, in)
        self.register_buffer("z0", torch.zeros(r, dtype=dtype))  # D_r: what the host gave up
        self.register_buffer("scale0", torch.tensor(scale, dtype=dtype))
        self.z = nn.Parameter(torch.zeros(r, dtype=dtype))
        self.train_scale = train_scale
        if train_scale:
            self.scale = nn.Parameter(torch.tensor(scale, dtype=dtype))

    def current_scale(self) -> Tensor:
        return self.scale if self.train_scale else self.scale0

    def initialise(self, weight: Tensor) -> None:
        r = self.z.shape[0]
        P, L, D, U = ldu(weight)
        with torch.no_grad():
            self.PL.copy_(P @ L[:, :r])
            self.U.copy_(U[:r])
            self.z0.copy_(D[:r])
            self.z.copy_(D[:r])

    def forward(self, host: nn.Module, x: Tensor, base) -> Tensor:
        h = self.kind.apply_in(host, x, self.U) * (self.z * self.current_scale())  # (..., r)
        return self.kind.add_out(host, base(x), h, self.PL)

    def delta_weight(self) -> Tensor:
        return self.current_scale() * (self.PL * self.z) @ self.U  # (out, in)

    def residual(self) -> Tensor:
        return self.scale0 * (self.PL * self.z0) @ self.U

    def lora_factors(self) -> tuple[Tensor, Tensor]:
        # relative to W0 only the diagonal moved: (PL * (s z - s0 z0)) @ U, rank r
        return self.U, self.PL * (self.current_scale() * self.z - self.scale0 * self.z0)


@register("loldu")
@dataclass
class LoLDU(MethodConfig):
    r: int = 8
    alpha: float = 1.0
    train_scale: bool = False

    trainable_formula = "r per site (+1 with train_scale)"

    def validate(self) -> None:
        self.check_positive_int("r")

    def validate_site(self, site: Site) -> None:
        site.check_rank(self.r, "LoLDU")

    def build(self, site: Site, stats=None, initialize: bool = True) -> LoLDUAdapter:
        weight = site.weight
        adapter = LoLDUAdapter(site.kind, site.in_features, site.out_features, self.r, self.alpha / self.r,
                               self.train_scale, weight.dtype)
        if initialize:
            adapter.initialise(weight)
        return adapter
