"""RandLoRA: full-rank updates from random low-rank bases (Albert et al. 2025, arXiv 2502.00987).

With m = min(in, out), M = max(in, out) and n = ceil(m / r) bases of rank r:

    ΔW = s * sum_{j<n} B_j diag(λ_j) A diag(γ_j)          s = alpha / r

    A:   (r, m)         one frozen random matrix shared by every basis (and every layer)
    B_j: (M, r)         frozen random, one per basis (shared across layers)
    λ_j: (r,)  γ_j: (m,) trained diagonal scalings: n * r + n * m parameters per site

n * r >= m, so the sum can reach full rank. The trained scalings sit on A, the side of the
smaller dimension; the product is (M, m) and is transposed when out < in.

Construction, matching `peft` (tuners/randlora) so the bases agree value for value: from a
torch.Generator seeded with `seed` (peft's projection_prng_key), draw A as a (r, 1, m_max)
bfloat16 tensor with kaiming-uniform(a=sqrt(5)), then n_max blocks (M_max, 1, r) the same
way, concatenated into B (M_max, n_max, r); each is divided by its own standard deviation
(in bfloat16). `bases="sparse"` draws ternary {-1, 0, 1} bases with density 1/3 and
`"very_sparse"` with density 1/sqrt(m_max), as peft does. A layer uses A[..., :m] and
B[:M, :n]. λ = 0 and γ = 1/max(n, m) at init (peft's reset), so the output is unchanged.
As peft computes it, the sum runs over t < r * n rank-one terms paired by flat position:
column t of B flattened to (M, n*r) (basis t // r, column t % r) times row t of the scaled A
flattened to (r*n, m), i.e. λ[t // n, t % n] * A[t // n] * γ[t % n]. It is the same family
(fixed random bases, trained diagonal scalings, full-rank reach) with a fixed random
pairing; keeping peft's pairing keeps the outputs identical.

Bases are never parameters and never saved: each adapter keeps `seed` and `basis_shape`
(out_max, in_max) as persistent buffers and regenerates the bases on build and after load;
sites with the same (seed, shape, r, kind) share one copy in memory. As in vera.py,
`basis_shape=None` uses each site's own shape (peft's construction whenever all targeted
layers have one shape); set it to [out_max, in_max] of the largest targeted layer to get
peft's bases on layers of mixed shapes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core import Adapter
from ..errors import PeftlabError
from ..hosts import LINEAR_LIKE, HostKind
from ..registry import MethodConfig, Site, register
from .vera import basis_shape_at, cached_pair, check_bases_config, check_fits_basis, keep_seed

BASES = ("dense", "sparse", "very_sparse")


def _num_bases(min_dim: int, r: int) -> int:
    return math.ceil(min_dim / r)  # enough rank-r bases to reach rank min_dim


def _dense(shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    # bfloat16 and kaiming-uniform(a=sqrt(5)) on a 3-d tensor: fan-in = shape[1] * shape[2].
    return nn.init.kaiming_uniform_(torch.empty(shape, dtype=torch.bfloat16), a=math.sqrt(5), generator=generator)


def _ternary(uniform: Tensor, sparsity: float) -> Tensor:
    # -1 below 1/(2 sparsity), +1 above 1 - 1/(2 sparsity), 0 between: density 1/sparsity.
    out = torch.zeros(uniform.shape)
    out[uniform < 1 / (2 * sparsity)] = -1
    out[uniform > 1 - 1 / (2 * sparsity)] = 1
    return out


def make_bases(seed: int, out_max: int, in_max: int, r: int, kind: str) -> tuple[Tensor, Tensor]:
    """A (r, 1, m_max) and B (M_max, n_max, r), each scaled to unit standard deviation."""
    m_max, big_max = min(out_max, in_max), max(out_max, in_max)
    n_max = _num_bases(m_max, r)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    if kind == "dense":
        A = _dense((r, 1, m_max), generator)
        B = torch.cat([_dense((big_max, 1, r), generator) for _ in range(n_max)], dim=1)
    else:
        sparsity = 3.0 if kind == "sparse" else math.sqrt(m_max)
        A = torch.rand((r, 1, m_max), generator=generator)
        B = torch.rand((big_max, n_max, r), generator=generator)
        A, B = _ternary(A, sparsity), _ternary(B, sparsity)
    return A / A.std(), B / B.std()


def shared_bases(seed: int, out_max: int, in_max: int, r: int, kind: str, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    def make() -> tuple[Tensor, Tensor]:
        A, B = make_bases(seed, out_max, in_max, r, kind)
        return A.to(dtype), B.to(dtype)

    return cached_pair(("randlora", seed, out_max, in_max, r, kind, dtype), make)


class RandLoRAAdapter(Adapter):
    def __init__(self, kind: HostKind, in_features: int, out_features: int, r: int, scale: float, seed: int,
                 basis_shape: tuple[int, int], bases: str, dropout: float, dtype: torch.dtype):
        super().__init__(kind)
        self.in_features, self.out_features, self.r, self.scale, self.bases = in_features, out_features, r, scale, bases
        self.min_dim, self.max_dim = min(in_features, out_features), max(in_features, out_features)
        n = _num_bases(self.min_dim, r)
        self.lam = nn.Parameter(torch.zeros(r, n, dtype=dtype))  # λ_j as columns; 0: identity at init
        self.gamma = nn.Parameter(torch.full((n, self.min_dim), 1 / max(n, self.min_dim), dtype=dtype))  # γ_j rows
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        keep_seed(self, seed, basis_shape)

    def regenerate_bases(self) -> None:
        out_max, in_max = self.basis_shape.tolist()
        A, B = shared_bases(int(self.seed), out_max, in_max, self.r, self.bases, self.lam.dtype)
        n, device = self.lam.shape[1], self.lam.device
        self.register_buffer("A", A[:, :, : self.min_dim].to(device), persistent=False)  # (r, 1, m)
        self.register_buffer("B", B[: self.max_dim, :n].to(device), persistent=False)  # (M, n, r)

    def factors(self) -> tuple[Tensor, Tensor]:
        """P (M, n*r) and Q (r*n, m) with ΔW = s * P @ Q (transposed when out < in)."""
        scaled = self.lam[:, :, None] * self.A * self.gamma[None]  # (r, n, m)
        return self.B.flatten(1), scaled.flatten(0, 1)

    def forward(self, host: nn.Module, x: Tensor, base) -> Tensor:
        P, Q = self.factors()
        x_in = self.dropout(x)
        if self.in_features == self.min_dim:  # ΔW = P Q: x -> Q x (r*n) -> P (out)
            h = self.kind.apply_out(host, self.kind.apply_in(host, x_in, Q), P)
        else:  # ΔW = Q^T P^T: x -> P^T x (n*r) -> Q^T (out)
            h = self.kind.apply_out(host, self.kind.apply_in(host, x_in, P.T), Q.T)
        return base(x) + h * self.scale

    def delta_weight(self) -> Tensor:
        P, Q = self.factors()
        update = P @ Q  # (M, m)
        return self.scale * (update if self.in_features == self.min_dim else update.T)  # (out, in)


@register("randlora")
@dataclass
class RandLoRA(MethodConfig):
    r: int = 32
    alpha: float = 640.0  # s = alpha / r = 20, peft's default
    dropout: float = 0.0
    seed: int = 0  # peft's projection_prng_key
    bases: str = "dense"
    basis_shape: list | None = None  # [out_max, in_max] of the shared bases; None: each site's own shape

    hosts = LINEAR_LIKE
    trainable_formula = "n * (r + min(in, out)) per site, n = ceil(min(in, out) / r)"

    def validate(self) -> None:
        check_bases_config(self)
        if self.bases not in BASES:
            raise PeftlabError(f"RandLoRA bases {self.bases!r} is unknown; choose one of {BASES}")

    def validate_site(self, site: Site) -> None:
        check_fits_basis(self, site)

    def build(self, site: Site, stats=None, initialize: bool = True) -> RandLoRAAdapter:
        return RandLoRAAdapter(site.kind, site.in_features, site.out_features, self.r, self.alpha / self.r, self.seed,
                               basis_shape_at(self, site), self.bases, self.dropout, site.weight.dtype)
