"""CorDA: Context-oriented Decomposition Adaptation (Yang et al. 2024, arXiv 2406.05223).

Yang, Li, Zhou, Song, Wu, Nie, Ghanem, "CorDA: Context-Oriented Decomposition Adaptation of Large
Language Models for Task-Aware Parameter-Efficient Fine-tuning" (NeurIPS 2024).

A data-driven initialisation of LoRA. The weight is decomposed together with the covariance C of
the layer's inputs on calibration data, so the singular directions are those that matter for
that data:

    W0 C = U S V^T  (SVD)          W0 = U S V^T C^-1
    A = sqrt(S_k / s) (V_k^T C^-1)   (k = r, in)        B = U_k sqrt(S_k / s)   (out, r)
    W_res = W0 - s * B A           h = W_res x + s * B A x     (the output is unchanged at init)

Two modes pick which r components become the adapter:
    "ipm"  instruction-previewed: the r largest (calibrate on the task's own data; adapts fastest)
    "kpm"  knowledge-preserved:   the r smallest (calibrate on data whose knowledge should survive,
           e.g. QA pairs; the large components it keeps frozen carry that knowledge)
Trained: A and B (the host holds W_res while attached; the initial factors are kept as buffers,
so a saved adapter re-applies to the original base weights and detach restores W0 exactly).

Choices, following the official code as `peft` carries it (`tuners/lora/corda.py`):
  - each calibration sequence x (tokens, in) is scaled by 1/|max(x)| and adds x^T x to C; C is then
    divided by the number of sequences. Batches of any size give the official statistic; padded
    tokens (attention_mask == 0) are left out.
  - C is damped before inversion: C + d * mean(diag C) * I with d = 0.01, doubled until
    ||C_d C_d^-1 - I||_F < 0.05; the damped C_d is the one used in W0 C_d and C_d^-1.
  - the covariance is computed in float32, the model in eval mode under no_grad.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import PeftlabError
from ..hosts import LINEAR_LIKE
from ..registry import MethodConfig, Site, register
from .lora import LoRAAdapter, residual_adapter

MODES = ("ipm", "kpm")


def input_covariance(model, sites: list[Site], calibration) -> dict[str, Tensor]:
    """{site: C (in, in)}: the mean over calibration sequences of x^T x / max(x)^2, x a sequence's tokens.

    The statistic is per sequence, as in the official code (which calibrates one sequence per
    forward): each sequence is scaled by its own max, so a batch of 32 gives the same C as 32
    forwards of one. Padded tokens (attention_mask == 0) are left out.
    """
    sums: dict[str, Tensor] = {s.name: 0 for s in sites}
    counts: dict[str, int] = {s.name: 0 for s in sites}
    device = sites[0].weight.device
    mask = None

    def sequences(x: Tensor) -> list[Tensor]:
        """The site input (batch, tokens, in) or (tokens, in) as one (tokens_i, in) tensor per sequence."""
        if mask is not None and x.shape[:-1] == mask.shape:
            return [row[keep] for row, keep in zip(x, mask)]
        return list(x) if x.dim() == 3 else [x.reshape(-1, x.shape[-1])]

    def hook(name: str):
        def add(module, args, output) -> None:
            for x in sequences(args[0]):
                x = x.float()
                x = x / x.max().abs()
                if not torch.isfinite(x).all():
                    raise PeftlabError(f"CorDA: the input of {name} has inf/nan (or is all zero) on a calibration "
                                       "sequence: check the batches (no empty or constant-zero sequences)")
                sums[name] = sums[name] + x.T @ x  # (in, in)
                counts[name] += 1
        return add

    handles = [s.host.register_forward_hook(hook(s.name)) for s in sites]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in calibration:
                batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
                mask = batch["attention_mask"].bool() if "attention_mask" in batch else None
                model(**batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not any(counts.values()):
        raise PeftlabError("CorDA got no calibration batches: pass calibration=[batch, ...] (dicts of model inputs)")
    unseen = [name for name, n in counts.items() if n == 0]
    if unseen:
        raise PeftlabError(f"CorDA: {', '.join(unseen)} saw no input on the calibration batches; target modules "
                           "that the model's forward uses")
    return {name: total / counts[name] for name, total in sums.items()}


def damped_inverse(covariance: Tensor, damp: float = 0.01, tolerance: float = 0.05) -> tuple[Tensor, Tensor]:
    """(C_d, C_d^-1) with C_d = C + d * mean(diag C) * I, d doubled until the inverse is accurate."""
    eye = torch.eye(covariance.shape[0], dtype=covariance.dtype, device=covariance.device)
    ones = torch.ones_like(covariance[0])
    while True:
        # A poorly conditioned C makes the inverse sensitive to the last bit of the damping term:
        # it is formed exactly as the reference code forms it (diagonal copied, then averaged).
        damped = covariance + torch.diag(ones * torch.diag(covariance).mean() * damp)
        inverse = torch.linalg.inv(damped)
        if torch.dist(damped @ inverse, eye).item() < tolerance:
            return damped, inverse
        damp *= 2


def corda_factors(weight: Tensor, covariance: Tensor, r: int, mode: str, scale: float) -> tuple[Tensor, Tensor]:
    """(A (r, in), B (out, r)) with s * B @ A the chosen r components of W0 in the C-weighted SVD."""
    damped, inverse = damped_inverse(covariance.float())
    U, S, Vh = torch.linalg.svd(weight.float() @ damped, full_matrices=False)  # (out, m), (m,), (m, in)
    V = (Vh @ inverse).T  # (in, m): right factors mapped back through C^-1
    keep = slice(0, r) if mode == "ipm" else slice(S.shape[0] - r, S.shape[0])
    U, S, V = U[:, keep], S[keep] / scale, V[:, keep]
    A = V.T * S.sqrt()[:, None]  # (r, in)
    B = U * S.sqrt()  # (out, r)
    return A, B


@register("corda")
@dataclass
class CorDA(MethodConfig):
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    mode: str = "ipm"  # "ipm" (top r components) or "kpm" (bottom r)

    hosts = LINEAR_LIKE
    needs_calibration = True
    trainable_formula = "r * (in + out) per site"

    def validate(self) -> None:
        self.check_positive_int("r")
        if self.mode not in MODES:
            raise PeftlabError(f"CorDA mode {self.mode!r} is unknown; choose 'ipm' (instruction-previewed, top r) "
                               "or 'kpm' (knowledge-preserved, bottom r)")
        self.check_dropout()

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def validate_site(self, site: Site) -> None:
        site.check_rank(self.r)

    def calibrate(self, model, sites: list[Site], calibration) -> dict[str, Tensor]:
        return input_covariance(model, sites, calibration)

    def build(self, site: Site, stats: Tensor | None = None, initialize: bool = True) -> LoRAAdapter:
        factors = corda_factors(site.weight.detach(), stats, self.r, self.mode, self.scale) if initialize else None
        return residual_adapter(site, self.r, self.scale, self.dropout, factors)
