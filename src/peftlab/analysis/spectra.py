"""Spectra of weight changes, and how alike two changes are.

For a change dW (out, in) with singular values s_1 >= s_2 >= ... >= s_m (m = min(out, in)):

    effective rank (Roy & Vetterli 2007)   p_k = s_k / sum_i s_i,   erank = exp(-sum_k p_k log p_k)
                                           (0 log 0 = 0): 1 for a rank-one matrix, m for equal s_k
    stable rank                            ||dW||_F^2 / ||dW||_2^2 = sum_k s_k^2 / s_1^2

Subspace similarity (Hu et al. 2021, the LoRA paper, section 7.2): with U_A the singular
vectors of change A (columns, by singular value) and U_B those of B,

    phi(A, B, i, j) = ||U_A[:, :i]^T U_B[:, :j]||_F^2 / min(i, j)   in [0, 1]

1 when the top-i subspace lies within the top-j one (or the reverse), 0 when they are
orthogonal. The paper compares the right singular vectors of LoRA's A (the input space);
`side="left"` compares output spaces.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import PeftlabError

SIDES = ("right", "left")


def _matrix(delta: Tensor, what: str = "delta") -> Tensor:
    if delta.dim() != 2:
        raise PeftlabError(f"{what} must be an (out, in) matrix, got shape {tuple(delta.shape)}")
    return delta.detach().double()


def singular_values(delta: Tensor) -> Tensor:
    """(m,) descending, float64."""
    return torch.linalg.svdvals(_matrix(delta))


def effective_rank(delta: Tensor) -> float:
    """Roy & Vetterli's entropy effective rank; 0 for a zero matrix."""
    s = singular_values(delta)
    if float(s.sum()) == 0:
        return 0.0
    p = s / s.sum()
    p = p[p > 0]
    return math.exp(float(-(p * p.log()).sum()))


def stable_rank(delta: Tensor) -> float:
    """||delta||_F^2 / ||delta||_2^2; 0 for a zero matrix."""
    s = singular_values(delta)
    return 0.0 if float(s[0]) == 0 else float((s ** 2).sum() / s[0] ** 2)


def spectrum(delta: Tensor, top: int | None = 64) -> dict:
    """{"singular_values": the largest `top` (None: all), "effective_rank", "stable_rank",
    "frobenius_norm", "shape"} of one change."""
    s = singular_values(delta)
    shown = s if top is None else s[:top]
    return {"shape": list(delta.shape), "singular_values": [float(x) for x in shown],
            "effective_rank": effective_rank(delta), "stable_rank": stable_rank(delta),
            "frobenius_norm": float(s.norm())}


def _singular_vectors(delta: Tensor, side: str) -> Tensor:
    """(n, m) columns by singular value: left (n = out) or right (n = in)."""
    if side not in SIDES:
        raise PeftlabError(f"subspace similarity side must be one of {SIDES}, got {side!r}")
    U, _, Vh = torch.linalg.svd(_matrix(delta), full_matrices=False)
    return U if side == "left" else Vh.T


def _check_shapes(a: Tensor, b: Tensor) -> None:
    if a.dim() != 2 or a.shape != b.shape:
        raise PeftlabError(f"subspace similarity compares two changes of one layer: shapes {tuple(a.shape)} and "
                           f"{tuple(b.shape)} differ; pass matrices of the same (out, in)")


def subspace_similarity(delta_a: Tensor, delta_b: Tensor, i: int, j: int, side: str = "right") -> float:
    """phi(A, B, i, j) = ||U_A,i^T U_B,j||_F^2 / min(i, j)."""
    _check_shapes(delta_a, delta_b)
    m = min(delta_a.shape)
    if not (isinstance(i, int) and isinstance(j, int) and 1 <= i <= m and 1 <= j <= m):
        raise PeftlabError(f"subspace similarity i, j must be integers in 1..{m} (the matrices' rank bound), "
                           f"got i={i!r}, j={j!r}")
    ua, ub = _singular_vectors(delta_a, side)[:, :i], _singular_vectors(delta_b, side)[:, :j]
    return float((ua.T @ ub).pow(2).sum() / min(i, j))


def similarity_grid(delta_a: Tensor, delta_b: Tensor, size: int = 8, side: str = "right") -> list[list[float]]:
    """[[phi(A, B, i, j) for j in 1..n] for i in 1..n], n = min(size, rank bound): the paper's figure 3."""
    _check_shapes(delta_a, delta_b)
    n = min(size, *delta_a.shape)
    ua, ub = _singular_vectors(delta_a, side)[:, :n], _singular_vectors(delta_b, side)[:, :n]
    overlap = (ua.T @ ub).pow(2)  # (n, n): squared cosines between single vectors
    # ||U_A,i^T U_B,j||_F^2 is the sum of the top-left i x j block: a 2-d running sum
    block = overlap.cumsum(0).cumsum(1)
    return [[float(block[i - 1, j - 1] / min(i, j)) for j in range(1, n + 1)] for i in range(1, n + 1)]
