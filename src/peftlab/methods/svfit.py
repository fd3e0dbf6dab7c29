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

The rank, per site: by default the paper's, the smallest r whose singular values hold 99% of
the energy sum(S^2) (the paper keeps the top singular values holding ">99% of the information",
close to full rank for a trained weight: about 1/100 of the capacity is left out). `energy`
sets another share; a fixed `r` is the option (e.g. r = 8, as this implementation's default
once was; far fewer trainable values). Setting both is refused: one of them decides the rank.
Choices where the paper is silent:
  - "information" is read as energy, sum of squared singular values (the Frobenius norm the
    truncated SVD is optimal for).
  - With an energy-chosen rank, the rank is found again from the singular values of the base
    weight when a saved adapter is loaded (the same weight gives the same rank).
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


PAPER_ENERGY = 0.99  # the paper: the singular values holding >99% of the information


@register("svfit")
@dataclass
class SVFit(MethodConfig):
    r: int | None = None  # a fixed rank per site; unset: chosen by energy
    energy: float | None = None  # share of sum(S^2) the kept singular values hold; unset (and no r): 0.99

    trainable_formula = "r per site (by default r holds 99% of each weight's singular-value energy)"

    def validate(self) -> None:
        self.check_positive_int("r", optional=True)
        if self.energy is not None and not 0 < self.energy <= 1:
            raise PeftlabError(f"SVFit energy must be in (0, 1], e.g. 0.99, got {self.energy!r}")
        if self.r is not None and self.energy is not None:
            raise PeftlabError(f"SVFit sets its rank by r or by energy, not both (r={self.r}, energy={self.energy}): "
                               "drop one of them")

    @property
    def share(self) -> float | None:
        """The energy share that picks the rank, or None for a fixed r."""
        if self.r is not None:
            return None
        return self.energy if self.energy is not None else PAPER_ENERGY

    def validate_site(self, site: Site) -> None:
        if self.r is not None:  # an energy-chosen rank always fits
            site.check_rank(self.r, "SVFit", fix="leave r unset to choose it by energy, or an override for this site")

    def build(self, site: Site, stats=None, initialize: bool = True) -> SVFitAdapter:
        weight, share = site.weight, self.share
        r = self.r
        if initialize:  # with an energy share, every triplet is a candidate until the energy picks r
            U, S, Vh = top_r_svd(weight.detach().float(), site.max_rank if share is not None else r)
            r = energy_rank(S, share) if share is not None else r
        elif share is not None:
            r = energy_rank(torch.linalg.svdvals(weight.detach().float()), share)
        adapter = SVFitAdapter(site.kind, site.in_features, site.out_features, r, weight.dtype)
        if initialize:
            adapter.initialise(U, S, Vh)
        return adapter
