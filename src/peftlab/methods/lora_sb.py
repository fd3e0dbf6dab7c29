"""LoRA-SB: an r x r core initialised from the SVD of an estimated first update (Ponkshe et al. 2024, arXiv 2411.19557).

Paper: Kaustubh Ponkshe, Raghav Singhal, Eduard Gorbunov, Alexey Tumanov, Samuel Horvath,
Praneeth Vepakomma, "Initialization using Update Approximation is a Silver Bullet for Extremely
Efficient Low-Rank Fine-Tuning", 2024, arXiv 2411.19557. Official code: RaghavSinghal10/lora-sb
(`utils/gradient_utils.py`, `utils/initialization_utils.py`).

    h = W0 x + s * B R A dropout(x)             W' = W0 + s * B @ R @ A          s = 1
    B: (out, r) frozen.  R: (r, r) trained.  A: (r, in) frozen.

Initialisation from data (calibration batches given to `peftlab.attach(..., calibration=...)`):
  1. G = the sum over the batches of dL/dW0 at each site (the model's own `loss`, so the
     batches carry labels), computed in train mode;
  2. the first full fine-tuning update, as the official code estimates it:
         dW = -lr_eff * sign(G),   lr_eff = lr / (warmup_ratio * total_steps);
  3. its truncated SVD dW ~ U_r diag(S_r) V_r^T gives B = U_r, R = diag(S_r), A = V_r^T.
So the initial update s * B R A is the best rank-r approximation of dW, and the output at
attach differs from the base model's by design (W0 is not adjusted).

Defaults and choices: s = 1 (the official scripts set alpha = r for that reason); lr = 1e-4 and
warmup_ratio = 0.02 follow the official scripts; `total_steps` has no default and is required.
The SVD is exact (the official code uses a randomised SVD; `svd_niter` selects that instead).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..core import Adapter
from ..errors import PeftlabError
from ..hosts import HostKind
from ..linalg import top_r_svd
from ..registry import MethodConfig, Site, register


class LoRASBAdapter(Adapter):
    identity_at_init = False

    def __init__(self, kind: HostKind, in_features: int, out_features: int, r: int, dropout: float,
                 dtype: torch.dtype):
        super().__init__(kind)
        self.register_buffer("A", torch.zeros(r, in_features, dtype=dtype))  # V_r^T, frozen, (r, in)
        self.register_buffer("B", torch.zeros(out_features, r, dtype=dtype))  # U_r, frozen, (out, r)
        self.R = nn.Parameter(torch.zeros(r, r, dtype=dtype))  # (r, r), applied as h @ R^T
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def initialise(self, update: Tensor, svd_niter: int | None) -> None:
        """Set B R A to the best rank-r approximation of `update` (out, in)."""
        U, S, Vh = top_r_svd(update, self.R.shape[0], svd_niter)
        with torch.no_grad():
            self.B.copy_(U)
            self.R.copy_(torch.diag(S))
            self.A.copy_(Vh)

    def forward(self, host: nn.Module, x: Tensor, base) -> Tensor:
        h = self.kind.apply_in(host, self.dropout(x), self.A)  # (..., r)
        h = self.kind.apply_out(host, h, self.R)  # (..., r)
        return self.kind.add_out(host, base(x), h, self.B)

    def delta_weight(self) -> Tensor:
        return self.B @ self.R @ self.A  # (out, in)

    def lora_factors(self) -> tuple[Tensor, Tensor]:
        return self.R @ self.A, self.B


def weight_gradients(model: nn.Module, sites: list[Site], calibration: Any) -> dict[str, Tensor]:
    """Sum over calibration batches of dL/dW0 at each site, as (out, in) float32 matrices.

    Leaves the model as it was: requires_grad flags, .grad fields and train/eval mode.
    """
    weights = [s.host.weight for s in sites]
    flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    sums = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    batches = 0
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        model.train()
        for batch in calibration:
            if not isinstance(batch, dict):
                raise PeftlabError(f"calibration batches must be dicts of model inputs, got {type(batch).__name__}")
            device = weights[0].device
            loss = getattr(model(**{k: v.to(device) for k, v in batch.items()}), "loss", None)
            if loss is None:
                raise PeftlabError("the model returned no loss on a calibration batch: include labels in the "
                                   "calibration batches (e.g. {'input_ids': ..., 'labels': ...})")
            for total, grad in zip(sums, torch.autograd.grad(loss, weights, allow_unused=True)):
                if grad is not None:  # a site the loss does not reach keeps a zero gradient
                    total += grad.float()
            batches += 1
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        model.train(was_training)
    if batches == 0:
        raise PeftlabError("calibration gave no batches: pass a non-empty iterable of model input dicts")
    return {s.name: s.as_matrix(g) for s, g in zip(sites, sums)}


@register("lora_sb")
@dataclass
class LoRASB(MethodConfig):
    r: int = 8
    dropout: float = 0.0
    lr: float = 1e-4  # the run's learning rate
    warmup_ratio: float = 0.02
    total_steps: int | None = None  # the run's optimizer steps; required (lr_eff needs it)
    svd_niter: int | None = None  # None: exact SVD, else iterations of a randomised SVD

    needs_calibration = True
    quantized_base = "no"  # its init needs the gradient with respect to W, which a packed weight has not
    run_fields = ("total_steps", "lr")  # filled by the training recipe when unset
    trainable_formula = "r * r per site"

    def validate(self) -> None:
        self.check_positive_int("r")
        self.check_dropout()
        if self.lr <= 0 or self.warmup_ratio <= 0:
            raise PeftlabError(f"LoRA-SB lr and warmup_ratio must be > 0, got lr={self.lr!r}, "
                               f"warmup_ratio={self.warmup_ratio!r}")
        self.check_positive_int("total_steps", optional=True)

    def validate_site(self, site: Site) -> None:
        site.check_rank(self.r, "LoRA-SB")

    def effective_lr(self) -> float:
        if self.total_steps is None:
            raise PeftlabError("LoRA-SB scales its initial update by lr / (warmup_ratio * total_steps): "
                               "set LoRASB(total_steps=<optimizer steps of the run>)")
        return self.lr / (self.warmup_ratio * self.total_steps)

    def first_update(self, gradient: Tensor) -> Tensor:
        """The estimated first full fine-tuning update, -lr_eff * sign(G). (out, in)"""
        return -self.effective_lr() * torch.sign(gradient)

    def calibrate(self, model: nn.Module, sites: list[Site], calibration: Any) -> dict[str, Tensor]:
        self.effective_lr()  # fails before any computation if total_steps is missing
        return weight_gradients(model, sites, calibration)

    def build(self, site: Site, stats=None, initialize: bool = True) -> LoRASBAdapter:
        adapter = LoRASBAdapter(site.kind, site.in_features, site.out_features, self.r, self.dropout, site.weight.dtype)
        if initialize:
            adapter.initialise(self.first_update(stats), self.svd_niter)
        return adapter
