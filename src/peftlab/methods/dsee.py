"""DSEE: a low-rank update plus a sparse update on a fixed support chosen from W0.

Dually Sparsity-Embedded Efficient tuning (Chen, Chen, Chen, Awadallah, Wang & Cheng 2021,
arXiv 2111.00160; official code VITA-Group/DSEE), its parameter-efficient half.

    h = W0 x + s * (B A x + S x)            W' = W0 + s * (B @ A + S)        s = alpha / r
    A: (r, in), B: (out, r)                 trained, as LoRA
    S: (out, in), zero outside Ω            trained on Ω only: |Ω| = num_sparse values per site

Initialisation (official code): A ~ N(0, 0.02^2), B = 0, S = 0, so the output is unchanged at
attach. The scale s multiplies the sparse part too, as in the official forward.

How Ω is chosen (`support`), from the official `run_glue.py` (`--sparse_method`, default
"grebsmo"); Ω is chosen once, before training, and never changes:
    "decomposition"  (default, as the official code's "grebsmo") split W0 into low-rank plus
                     sparse, W0 ≈ L + S0, and take the num_sparse largest |S0|: the entries a
                     low-rank structure does not explain. The official code grows L by
                     greedy bilateral smoothing (GreBsmo, Zhou & Tao 2013) up to rank 496 of
                     768 on BERT-base, hard-thresholding S0 = W0 - L at |.| < 0.01. Here L is
                     the best rank-k approximation of W0 - S0 (truncated SVD), alternated with
                     the same hard threshold for `decomposition_iters` rounds (GoDec-style,
                     the same authors' 2011 scheme), k = round(decomposition_ratio * min(out, in)),
                     ratio 0.65 ≈ 496/768 as the official run. Deterministic.
    "magnitude"      the num_sparse largest |W0| (official "omp")
    "random"         num_sparse positions uniformly at random from `seed` (official "rp")
Ω is saved with the adapter (an int64 buffer of flat indices into the (out, in) matrix).

Defaults: r = 8, alpha = 16 (s = 2; the official scripts use r = 16, alpha = 32), num_sparse
= 64 per matrix (the official README's SST-2 run; its scripts also use 16). Not implemented:
DSEE's second half, pruning the final weights (magnitude or structured head pruning after
tuning), which is a compression step rather than an adapter.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core import Adapter
from ..errors import PeftlabError
from ..hosts import LINEAR_LIKE, HostKind
from ..linalg import top_r_svd
from ..registry import MethodConfig, Site, register
from .lora import zero_factors

SUPPORTS = ("decomposition", "magnitude", "random")


def lowrank_sparse_residual(weight: Tensor, rank: int, iters: int, threshold: float) -> Tensor:
    """S0 of W ≈ L + S0 with rank(L) <= rank and S0 hard-thresholded at |.| < threshold."""
    W = weight.detach().float()
    S = torch.zeros_like(W)
    for _ in range(iters):
        U, sigma, Vh = top_r_svd(W - S, rank)
        L = U @ torch.diag(sigma) @ Vh  # best rank-k fit of what S does not hold
        S = W - L
        S[S.abs() < threshold] = 0
    return S


def choose_support(weight: Tensor, num_sparse: int, support: str, rank: int, iters: int, threshold: float,
                   seed: int) -> Tensor:
    """Flat indices (num_sparse,) into the (out, in) matrix, sorted ascending."""
    if support == "decomposition":
        score = lowrank_sparse_residual(weight, rank, iters, threshold).abs()
    elif support == "magnitude":
        score = weight.detach().float().abs()
    else:
        score = torch.rand(weight.shape, generator=torch.Generator(device="cpu").manual_seed(seed))
    return torch.topk(score.flatten().cpu(), num_sparse).indices.sort().values


class DSEEAdapter(Adapter):
    def __init__(self, kind: HostKind, in_features: int, out_features: int, r: int, num_sparse: int, scale: float,
                 dropout: float, dtype: torch.dtype):
        super().__init__(kind)
        self.in_features, self.out_features, self.scale = in_features, out_features, scale
        self.A, self.B = zero_factors(r, in_features, out_features, dtype)  # (r, in), (out, r)
        self.values = nn.Parameter(torch.zeros(num_sparse, dtype=dtype))  # S on Ω, in the order of `support`
        self.register_buffer("support", torch.zeros(num_sparse, dtype=torch.int64))  # flat indices into (out, in)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def sparse_matrix(self) -> Tensor:
        """S as a dense (out, in) matrix: zero outside the support."""
        flat = self.values.new_zeros(self.out_features * self.in_features)
        return flat.index_put((self.support,), self.values).view(self.out_features, self.in_features)

    def forward(self, host: nn.Module, x: Tensor, base) -> Tensor:
        x_in = self.dropout(x)
        low_rank = self.kind.apply_out(host, self.kind.apply_in(host, x_in, self.A), self.B)  # (..., out)
        # S x without building S: y[..., row] += values * x[..., col], one term per support entry.
        rows, cols = self.support // self.in_features, self.support % self.in_features
        sparse = low_rank.new_zeros(low_rank.shape).index_add(-1, rows, x_in.index_select(-1, cols) * self.values)
        return base(x) + (low_rank + sparse) * self.scale

    def delta_weight(self) -> Tensor:
        return self.scale * (self.B @ self.A + self.sparse_matrix())  # (out, in)


@register("dsee")
@dataclass
class DSEE(MethodConfig):
    r: int = 8
    alpha: float = 16.0
    num_sparse: int = 64  # |Ω| per site
    support: str = "decomposition"
    decomposition_ratio: float = 0.65  # rank of L as a share of min(out, in)
    decomposition_iters: int = 4
    decomposition_threshold: float = 0.01
    dropout: float = 0.0
    seed: int = 0  # support="random": each site draws from crc32(seed, site name)

    hosts = LINEAR_LIKE
    trainable_formula = "r * (in + out) + num_sparse per site"

    def validate(self) -> None:
        self.check_positive_int("r", "num_sparse", "decomposition_iters")
        if self.support not in SUPPORTS:
            raise PeftlabError(f"DSEE support {self.support!r} is unknown; choose one of {SUPPORTS}")
        if not 0 < self.decomposition_ratio < 1:
            raise PeftlabError(f"DSEE decomposition_ratio must be in (0, 1), got {self.decomposition_ratio!r}")
        self.check_dropout()

    def validate_site(self, site: Site) -> None:
        site.check_rank(self.r, "DSEE")
        entries = site.in_features * site.out_features
        if self.num_sparse > entries:
            raise PeftlabError(f"DSEE num_sparse={self.num_sparse} exceeds the {entries} entries of "
                               f"{site.name}: use num_sparse <= {entries}")

    def build(self, site: Site, stats=None, initialize: bool = True) -> DSEEAdapter:
        weight = site.weight
        adapter = DSEEAdapter(site.kind, site.in_features, site.out_features, self.r, self.num_sparse,
                              self.alpha / self.r, self.dropout, weight.dtype)
        if initialize:
            rank = max(1, round(self.decomposition_ratio * site.max_rank))
            support = choose_support(weight, self.num_sparse, self.support, rank, self.decomposition_iters,
                                     self.decomposition_threshold, zlib.crc32(f"{self.seed}/{site.name}".encode()))
            with torch.no_grad():
                adapter.support.copy_(support)
                nn.init.normal_(adapter.A, std=0.02)  # torch's global generator, as LoRA's init
        return adapter
