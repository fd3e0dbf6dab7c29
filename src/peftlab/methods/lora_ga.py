"""LoRA-GA: Low-Rank Adaptation with Gradient Approximation (Wang, Yu, Li 2024, arXiv 2407.05000).

A data-driven initialisation of LoRA: A and B start from the SVD of the full-weight gradient
G = dL/dW0 estimated on calibration batches, so that the first LoRA step moves W in (nearly) the
direction full fine-tuning would. With G = U S V^T (top 2r components):

    direction "ArB2r" (default):  A = V[:, :r]^T (r, in)     B = U[:, r:2r] diag(S[r:2r]) (out, r)
              "A2rBr":            A = V[:, r:2r]^T           B = U[:, :r] diag(S[:r])
              "ArBr":             A = V[:, 1:2r:2]^T         B = U[:, 0:2r:2] diag(S[0:2r:2])
              "random":           one random choice of r of the 2r indices for both (torch.randperm)
    scale     "stable" (default): B *= out^(1/4) / sqrt(stable_gamma)
              "weight_svd":       B *= sigma_1(W0) / S_B[0]
              "gd_scale":         A /= s, B /= s
              "unit":             nothing more
    W_res = W0 - s * B A            h = W_res x + s * B A x     (the output is unchanged at init)

Trained: A and B (the host holds W_res while attached; the initial factors are kept as buffers,
so a saved adapter re-applies to the original base weights and detach restores W0 exactly).

The gradient: each calibration batch must carry labels so that `model(**batch).loss` is the
training loss (e.g. `{"input_ids": ..., "attention_mask": ..., "labels": ...}` for a transformers
model with a head); a batch whose output has no `.loss` is an error. G is the mean over batches of
dL/dW0, taken with the model in train mode (as the reference code), with only the target weights
requiring gradients and nothing written to any `.grad`.

This follows `peft`'s `lora_ga_init` (peft 0.21), which differs from the authors' code: there both
A and B are orthonormal factors (no S in B) and "stable" scales both by out^(1/4)/sqrt(gamma).
One further difference: `peft` takes a randomised `svd_lowrank` (q = 4r, 4 iterations, from the
global random state); here the SVD is exact, so results are deterministic and agree with `peft`
to rounding when its SVD is made exact, and up to the accuracy of its randomised SVD otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import PeftlabError
from ..hosts import LINEAR_LIKE
from ..linalg import top_r_svd
from ..registry import MethodConfig, Site, register
from .lora import LoRAAdapter, residual_adapter

DIRECTIONS = ("ArB2r", "A2rBr", "ArBr", "random")
SCALES = ("stable", "weight_svd", "gd_scale", "unit")


def mean_gradients(model, sites: list[Site], calibration) -> dict[str, Tensor]:
    """{site: dL/dW0 (out, in)} averaged over the calibration batches."""
    weights = [s.host.weight for s in sites]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    device = weights[0].device
    totals = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    count = 0
    was_training = model.training
    model.train()
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        for batch in calibration:
            batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
            loss = getattr(model(**batch), "loss", None)
            if loss is None:
                raise PeftlabError(
                    "LoRA-GA estimates the gradient of the training loss, but the model returned no .loss: "
                    "give every calibration batch its labels (e.g. {'input_ids': ..., 'labels': ...}) and use a "
                    "model with a head that computes the loss (e.g. AutoModelForSequenceClassification)"
                )
            for total, grad in zip(totals, torch.autograd.grad(loss, weights)):
                total += grad.float()
            count += 1
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    if count == 0:
        raise PeftlabError("LoRA-GA got no calibration batches: pass calibration=[batch, ...] with labels")
    return {s.name: s.as_matrix(total / count) for s, total in zip(sites, totals)}


def lora_ga_factors(grad: Tensor, weight: Tensor, r: int, direction: str, scale_mode: str, stable_gamma: float,
                    scale: float) -> tuple[Tensor, Tensor]:
    """(A (r, in), B (out, r)) from the gradient's top 2r singular triplets."""
    U, S, Vh = top_r_svd(grad.float(), 2 * r)  # (out, 2r), (2r,), (2r, in)
    if direction == "ArB2r":
        a_rows, b_cols = torch.arange(r), torch.arange(r, 2 * r)
    elif direction == "A2rBr":
        a_rows, b_cols = torch.arange(r, 2 * r), torch.arange(r)
    elif direction == "ArBr":
        a_rows, b_cols = torch.arange(1, 2 * r, 2), torch.arange(0, 2 * r, 2)
    else:  # "random": the same r indices for A and B
        a_rows = b_cols = torch.randperm(2 * r)[:r]
    A = Vh[a_rows]  # (r, in)
    S_B = S[b_cols]
    B = U[:, b_cols] @ torch.diag(S_B)  # (out, r)
    if scale_mode == "stable":
        B = B * (grad.shape[0] ** 0.25 / stable_gamma ** 0.5)
    elif scale_mode == "weight_svd" and S_B[0] > 0:
        B = B * (torch.linalg.svdvals(weight.float())[0] / S_B[0])
    elif scale_mode == "gd_scale":
        A, B = A / scale, B / scale
    return A, B


@register("lora_ga")
@dataclass
class LoRAGA(MethodConfig):
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    direction: str = "ArB2r"
    scale_mode: str = "stable"  # `peft`'s LoraGAConfig.scale
    stable_gamma: float = 16.0

    hosts = LINEAR_LIKE
    needs_calibration = True
    quantized_base = "no"  # its init moves part of W into the adapter (W - s B A): W must be full precision
    trainable_formula = "r * (in + out) per site"

    def validate(self) -> None:
        self.check_positive_int("r")
        if self.direction not in DIRECTIONS:
            raise PeftlabError(f"LoRA-GA direction {self.direction!r} is unknown; choose one of {DIRECTIONS}")
        if self.scale_mode not in SCALES:
            raise PeftlabError(f"LoRA-GA scale_mode {self.scale_mode!r} is unknown; choose one of {SCALES}")
        self.check_dropout()
        if self.stable_gamma <= 0:
            raise PeftlabError(f"LoRA-GA stable_gamma must be positive, got {self.stable_gamma!r}")

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def validate_site(self, site: Site) -> None:
        if 2 * self.r > site.max_rank:
            raise PeftlabError(f"LoRA-GA takes 2r = {2 * self.r} gradient components, more than {site.name} has "
                               f"({site.out_features} x {site.in_features}): use r <= {site.max_rank // 2}, "
                               "or an override")

    def calibrate(self, model, sites: list[Site], calibration) -> dict[str, Tensor]:
        return mean_gradients(model, sites, calibration)

    def build(self, site: Site, stats: Tensor | None = None, initialize: bool = True) -> LoRAAdapter:
        factors = None
        if initialize:
            factors = lora_ga_factors(stats, site.weight.detach(), self.r, self.direction, self.scale_mode,
                                      self.stable_gamma, self.scale)
        return residual_adapter(site, self.r, self.scale, self.dropout, factors)
