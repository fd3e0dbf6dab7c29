"""ALDR-KL: LDR-KL with one adaptive lambda per training example (Zhu, Ying & Yang, ICML 2023;
official code Optimization-AI/ICML2023_LDR, loss.py ALDRLoss_V1).

Each time example i is seen, its lambda_i moves (a closed-form step of the min over lambda of
the paper's objective), then the loss is LDR-KL at that lambda:

    z         = softplus(f) / mean_k softplus(f)                     as in LDR-KL (n, K)
    p         = softmax(z / lambda_i)                                 with lambda_i from the last visit
    lambda_i <- lambda0 - lambda0 KL(p || uniform) / (alpha log K)    stored (no gradient)
    loss_i    = LDR-KL(z, y; c, lambda_i) - (alpha log K / (2 lambda0)) (lambda_i - lambda0)^2

A confident (peaked) prediction gets a smaller lambda (closer to the hinge), an uncertain one
stays near lambda0; alpha > 1 keeps lambda_i >= lambda0 (1 - 1/alpha) > 0. Every lambda starts
at lambda0. Defaults are the official ones: c = 0.1, lambda0 = 10, alpha = 2.

The lambdas are state, kept by the loss object and indexed by `example_ids` (n,), which the
batch must carry while training (the recipe numbers the training rows 0..N-1). Called without
ids where no gradient flows (evaluation under torch.no_grad), every row is scored as on its
first visit (previous lambda = lambda0) and nothing is stored. The KL is computed exactly from
log_softmax (the official code adds 1e-5 to p before its log; values agree to ~1e-4).
The lambdas are not part of a checkpoint: a resumed run starts them again at lambda0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import PeftlabError
from .ldr_kl import ldr, normalised_scores
from .registry import LossConfig, register_loss


@register_loss("aldr_kl")
@dataclass
class ALDRKL(LossConfig):
    margin: float = 0.1  # c
    lambda0: float = 10.0  # the reference lambda every example starts at
    alpha: float = 2.0  # > 1: how far lambda may move from lambda0
    softplus: bool = True

    needs_example_ids = True
    formula = "LDR-KL at a per-example lambda_i, updated from KL(softmax(z/lambda_i) || uniform)"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.lambdas = torch.empty(0)  # lambda of example id i (ids never seen hold lambda0)

    def validate(self) -> None:
        self.check_range("margin", 0, math.inf)
        self.check_range("lambda0", 0, math.inf, low_open=True)
        self.check_range("alpha", 1, math.inf, low_open=True)

    def per_example(self, logits: Tensor, labels: Tensor, example_ids: Tensor | None = None, **batch) -> Tensor:
        classes = logits.shape[1]
        if classes < 2:
            raise PeftlabError(f"loss aldr_kl needs at least 2 classes, got logits of shape {tuple(logits.shape)}")
        scores = normalised_scores(logits, self.softplus)  # (n, K)
        previous = self._previous(example_ids, logits)  # (n,)
        log_k = math.log(classes)
        with torch.no_grad():
            log_p = torch.log_softmax(scores / previous[:, None], dim=1)
            kl = (log_p.exp() * (log_p + log_k)).sum(dim=1)  # KL(p || uniform) (n,)
            lam = self.lambda0 - self.lambda0 * kl / (self.alpha * log_k)
        if example_ids is not None:
            self.lambdas[example_ids.to(self.lambdas.device)] = lam.to(self.lambdas)
        penalty = self.alpha * log_k / (2 * self.lambda0) * (lam - self.lambda0) ** 2
        return ldr(scores, labels, self.margin, lam) - penalty

    def _previous(self, example_ids: Tensor | None, logits: Tensor) -> Tensor:
        """Each row's lambda from its last visit (lambda0 on the first), growing the table to the ids."""
        if example_ids is None:
            if torch.is_grad_enabled() and logits.requires_grad:
                raise PeftlabError("loss aldr_kl needs example_ids in the batch while training (one integer id "
                                   "per training example, 0..N-1): pass fn(logits, labels, example_ids=ids)")
            return torch.full(logits.shape[:1], self.lambda0, dtype=logits.dtype, device=logits.device)
        if example_ids.dim() != 1 or example_ids.dtype.is_floating_point or (example_ids < 0).any():
            raise PeftlabError(f"loss aldr_kl: example_ids must be non-negative integers, one per row; "
                               f"got a {example_ids.dtype} tensor of shape {tuple(example_ids.shape)}")
        needed = int(example_ids.max()) + 1 if example_ids.numel() else 0
        if needed > len(self.lambdas):
            grown = torch.full((needed,), self.lambda0, dtype=torch.float32, device=logits.device)
            grown[: len(self.lambdas)] = self.lambdas.to(grown.device)
            self.lambdas = grown
        return self.lambdas[example_ids.to(self.lambdas.device)].to(logits)
