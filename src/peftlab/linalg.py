"""Linear algebra the method files share.

Several methods start from the top singular triplets of a matrix: PiSSA and SVFit from the
weight, LoRA-SB from its estimated first update, LoRA-GA from the gradient, DSEE from its
low-rank fit, EVA from the site's inputs. They take them from one function, so the choice
between an exact and a randomised SVD, and the layout of the factors, are made in one place.
(CorDA keeps the top or the bottom r of a full SVD, so it calls torch.linalg.svd itself.)
"""
from __future__ import annotations

import torch
from torch import Tensor


def top_r_svd(matrix: Tensor, r: int, niter: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The r largest singular triplets of an (out, in) matrix: U_r (out, r), S_r (r,), Vh_r (r, in).

    niter=None takes the exact SVD (torch.linalg.svd, reduced) and keeps its first r triplets;
    otherwise torch.svd_lowrank with q = r and `niter` subspace iterations, which draws from
    torch's global random state. The matrix is used in its own dtype: callers cast (most SVD in
    float32). Signs are the LAPACK routine's, as torch returns them.
    """
    if niter is None:
        U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
        return U[:, :r], S[:r], Vh[:r]
    U, S, V = torch.svd_lowrank(matrix, r, niter=niter)
    return U, S, V.T
