"""Intruder dimensions (Shuttleworth et al. 2024, "LoRA vs full fine-tuning: an illusion of
equivalence", arXiv 2410.21228; reference code reeceshuttle/intruder-dimensions).

For a base weight W0 and a tuned weight W, both (out, in), with thin SVDs

    W0 = U0 S0 V0^T,   W = U S V^T          (U0, U: (out, m), m = min(out, in))

the top-k left singular vectors u_j of W (j < k, by singular value) are compared with every
left singular vector of W0:

    similarity_j = max_i |u_j . u0_i|

and u_j is an intruder dimension when similarity_j < threshold (0.5 in the paper): a direction
of high singular value in the tuned weight with no counterpart in the base. Full fine-tuning
has few; low-rank updates introduce them.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import PeftlabError


def check_settings(k: int, threshold: float) -> None:
    """k a positive integer, threshold in (0, 1]; a PeftlabError naming the one that is not."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise PeftlabError(f"intruder_dimensions k must be a positive integer (tuned singular vectors checked), got {k!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise PeftlabError(f"intruder_dimensions threshold must be in (0, 1] (a |cosine|), got {threshold!r}")


def _check(w0: Tensor, w: Tensor, k: int, threshold: float) -> None:
    if w0.dim() != 2 or w.shape != w0.shape:
        raise PeftlabError(f"intruder_dimensions needs two (out, in) matrices of one shape, got "
                           f"{tuple(w0.shape)} and {tuple(w.shape)}: pass the base and the tuned weight of one layer")
    check_settings(k, threshold)


def max_base_similarity(w0: Tensor, w: Tensor, k: int = 10) -> Tensor:
    """(min(k, m),): for each of the top-k left singular vectors of w, its largest |cosine| with
    any left singular vector of w0. Computed in float64 so near-ties do not swap vectors."""
    _check(w0, w, k, 0.5)
    u_base = torch.linalg.svd(w0.detach().double(), full_matrices=False).U  # (out, m)
    u_tuned = torch.linalg.svd(w.detach().double(), full_matrices=False).U[:, :k]  # (out, k)
    return (u_tuned.T @ u_base).abs().amax(dim=1)  # (k, m) -> (k,)


def intruder_dimensions(w0: Tensor, w: Tensor, k: int = 10, threshold: float = 0.5) -> int:
    """How many of the top-k left singular vectors of the tuned weight `w` have no left singular
    vector of the base `w0` with |cosine| >= threshold."""
    _check(w0, w, k, threshold)
    return int((max_base_similarity(w0, w, k) < threshold).sum())


def intruder_report(pairs: dict[str, tuple[Tensor, Tensor]], k: int = 10, threshold: float = 0.5) -> dict:
    """{"per_matrix": {name: count}, "similarity": {name: [max |cos| of each top-k vector]}, "total",
    "k", "threshold"} over (base, tuned) weight pairs by name."""
    if not pairs:
        raise PeftlabError("intruder_report got no weight pairs: pass {name: (base weight, tuned weight)}")
    for w0, w in pairs.values():  # every pair checked before any SVD
        _check(w0, w, k, threshold)
    similarity = {name: max_base_similarity(w0, w, k) for name, (w0, w) in pairs.items()}
    per_matrix = {name: int((s < threshold).sum()) for name, s in similarity.items()}
    return {"k": k, "threshold": threshold, "total": sum(per_matrix.values()), "per_matrix": per_matrix,
            "similarity": {name: [round(float(x), 6) for x in s] for name, s in similarity.items()}}
