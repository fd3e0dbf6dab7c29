"""torch's own optimizers by registry name: adamw, sgd, adafactor.

Each is a checked config over the torch class, with the fields a run config may set; `build`
hands them to the torch optimizer unchanged, so the arithmetic is torch's. (Any other
torch.optim class still works in a run config by its class name, e.g. `name: RMSprop`; see
recipe/config.py.) Adafactor's pair `eps` is two fields here, `eps1` (None: the dtype's
epsilon) and `eps2`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from .registry import OptimizerConfig, register_optimizer


@register_optimizer("adamw")
@dataclass
class AdamWConfig(OptimizerConfig):
    """torch.optim.AdamW (Loshchilov & Hutter 2019, decoupled weight decay)."""

    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    amsgrad: bool = False
    maximize: bool = False
    foreach: bool | None = None
    fused: bool | None = None

    description = "torch.optim.AdamW: Adam with decoupled weight decay (two moments per parameter)"

    def validate(self) -> None:
        self.check_positive("eps", "weight_decay", allow_zero=True)
        self.check_betas()

    def build(self, params: Iterable) -> torch.optim.AdamW:
        return torch.optim.AdamW(params, **self.kwargs())


@register_optimizer("sgd")
@dataclass
class SGDConfig(OptimizerConfig):
    """torch.optim.SGD, with optional (Nesterov) momentum."""

    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    maximize: bool = False
    foreach: bool | None = None

    description = "torch.optim.SGD: plain or momentum gradient descent (no state without momentum)"

    def validate(self) -> None:
        self.check_positive("momentum", "dampening", "weight_decay", allow_zero=True)
        if self.nesterov and (self.momentum == 0 or self.dampening != 0):
            self._fail("nesterov", "false unless momentum > 0 and dampening = 0")

    def build(self, params: Iterable) -> torch.optim.SGD:
        return torch.optim.SGD(params, **self.kwargs())


@register_optimizer("adafactor")
@dataclass
class AdafactorConfig(OptimizerConfig):
    """torch.optim.Adafactor (Shazeer & Stern 2018): factored second moments, no first moment."""

    lr: float = 1e-2
    beta2_decay: float = -0.8
    eps1: float | None = None
    eps2: float = 1e-3
    d: float = 1.0
    weight_decay: float = 0.0
    maximize: bool = False
    foreach: bool | None = None

    description = "torch.optim.Adafactor: row and column second-moment factors per matrix, no momentum"

    def validate(self) -> None:
        if self.beta2_decay > 0:
            self._fail("beta2_decay", "<= 0 (e.g. -0.8)")
        self.check_positive("eps2", "d")
        self.check_positive("weight_decay", allow_zero=True)
        if self.eps1 is not None:
            self.check_positive("eps1", allow_zero=True)

    def build(self, params: Iterable) -> torch.optim.Adafactor:
        fields = self.kwargs()
        fields["eps"] = (fields.pop("eps1"), fields.pop("eps2"))
        return torch.optim.Adafactor(params, **fields)
