"""SVFit: train the top singular values of each frozen weight (Sun et al. 2024, arXiv 2409.05926).

Paper: Chengwei Sun, Jiwei Wei, Yujia Wu, Yiming Shi, Shiyuan He, Zeyu Ma, Ning Xie, Yang Yang,
"SVFit: Parameter-Efficient Fine-Tuning of Large Pre-Trained Models Using Singular Values",
2024, arXiv 2409.05926. No official code was found.

With the SVD W0 = U S V^T (out x in) and its top r triplets U_r (out, r), S_r, V_r^T (r, in):

    W_res = W0 - U_r diag(S_r) V_r^T                 (written into the host while attached)
    W'    = W_res + U_r diag(sigma) V_r^T
    h     = W_res x + U_r (sigma * (V_r^T x))        (fast path)

Trained: sigma (r values per site), initialised to S_r, so the output at attach is unchanged.
U_r and V_r are frozen buffers.

The rank: a fixed `r`, or, with `energy` set (the paper keeps the singular values holding
">99% of the information"), the smallest r per site whose singular values carry that share of
sum(S^2). Choices where the paper is silent:
  - "information" is read as energy, sum of squared singular values (the Frobenius norm the
    truncated SVD is optimal for); `energy` overrides `r` when set.
  - With `energy`, the rank is found again from the singular values of the base weight when a
    saved adapter is loaded (the same weight gives the same rank).
  - The SVD runs in float32 (exact, torch.linalg.svd); results are cast to the weight's dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core import Adapter
from ..errors import PeftlabError
from ..hosts import HostKind
from ..linalg import top_r_svd
from ..registry import MethodConfig, Site, register


def energy_rank(singular_values: Tensor, energy: float) -> int:
    """The fewest leading singular values whose squares reach `energy` of the total."""
    squares = singular_values.double().pow(2)
    share = squares.cumsum(0) / squares.sum()
    first = int(torch.searchsorted(share, torch.tensor([energy], dtype=share.dtype)).item())
    return min(first + 1, len(singular_values))  # rounding can leave the last share just below 1


class SVFitAdapter(Adapter):
    has_residual = True

    def __init__(self, kind: HostKind, in_features: int, out_features: int, r: int, dtype: torch.dtype):
        super().__init__(kind)
        self.register_buffer("U", torch.zeros(out_features, r, dtype=dtype))  # U_r, (out, r)
        self.register_buffer("Vh", torch.zeros(r, in_features, dtype=dtype))  # V_r^T, (r, in)
        self.register_buffer("sigma0", torch.zeros(r, dtype=dtype))  # S_r: what the host gave up
        self.sigma = nn.Parameter(torch.zeros(r, dtype=dtype))

    def initialise(self, U: Tensor, S: Tensor, Vh: Tensor) -> None:
        r = self.sigma.shape[0]
        with torch.no_grad():
            self.U.copy_(U[:, :r])
            self.Vh.copy_(Vh[:r])
            self.sigma0.copy_(S[:r])
            self.sigma.copy_(S[:r])

    def forward(self, host: nn.Module, x: Tensor, base) -> Tensor:
        h = self.kind.apply_in(host, x, self.Vh) * self.sigma  # (..., r)
        return self.kind.add_out(host, base(x), h, self.U)

    def delta_weight(self) -> Tensor:
        return (self.U * self.sigma) @ self.Vh  # (out, in)

    def residual(self) -> Tensor:
        return (self.U * self.sigma0) @ self.Vh

    def lora_factors(self) -> tuple[Tensor, Tensor]:
        return self.Vh, self.U * (self.sigma - self.sigma0)  # relative to W0 only σ moved


@register("svfit")
@dataclass
class SVFit(MethodConfig):
    r: int = 8
    energy: float | None = None  # e.g. 0.99: choose r per site by singular-value energy instead

    trainable_formula = "r per site (r chosen per site when energy is set)"

    def validate(self) -> None:
        self.check_positive_int("r")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise PeftlabError(f"SVFit energy must be in (0, 1], e.g. 0.99, got {self.energy!r}")

    def validate_site(self, site: Site) -> None:
        if self.energy is None:  # with energy set, each site chooses a rank it can hold
            site.check_rank(self.r, "SVFit", fix="set energy=..., or an override for this site")

    def build(self, site: Site, stats=None, initialize: bool = True) -> SVFitAdapter:
        weight = site.weight
        r = self.r
        if initialize:  # with energy set, every triplet is a candidate until the energy picks r
            U, S, Vh = top_r_svd(weight.detach().float(), r if self.energy is None else site.max_rank)
            r = energy_rank(S, self.energy) if self.energy is not None else r
        elif self.energy is not None:
            r = energy_rank(torch.linalg.svdvals(weight.detach().float()), self.energy)
        adapter = SVFitAdapter(site.kind, site.in_features, site.out_features, r, weight.dtype)
        if initialize:
            adapter.initialise(U, S, Vh)
        return adapter
