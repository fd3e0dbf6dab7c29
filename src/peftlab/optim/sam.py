"""SAM: Sharpness-Aware Minimization (Foret et al. 2021, arXiv 2010.01412), around any base optimizer;
`adaptive` gives ASAM (Kwon et al. 2021, arXiv 2102.11600).

SAM minimises the loss at the worst nearby point. Each step takes two gradients:

    e = rho * g / ||g||                 (ASAM: e = rho * W^2 g / ||W g||, elementwise)
    g_sam = grad L(W + e)               the gradient at the perturbed weights
    W <- base step from W with g_sam    (W itself, not W + e, is updated)

||.|| is over every parameter together. In a plain loop:

    loss_fn().backward()                # the gradient at W
    optimizer.step(closure)             # closure: zero_grad, loss at W + e, backward, return loss

or by hand: `perturb()` (W -> W + e, gradients cleared), backward, `step()` (W back, base step).
The training recipe does the second (loop.PeftlabTrainer.training_step). The state is the base
optimizer's (state_dict and load_state_dict are its), plus e while a step is in flight.
Defaults: rho 0.05, base adamw (its fields in `base_fields`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from ..errors import PeftlabError
from .registry import OptimizerConfig, optimizer, optimizer_config, register_optimizer


class SAM(torch.optim.Optimizer):
    """A two-step wrapper: `perturb()` then `step()`, or `step(closure)` (module docstring)."""

    def __init__(self, params: Iterable, base: Callable[[list[dict]], torch.optim.Optimizer], rho: float = 0.05,
                 adaptive: bool = False):
        super().__init__(params, dict(rho=rho, adaptive=adaptive))
        self.base = base(self.param_groups)
        self.param_groups = self.base.param_groups  # one set of groups: schedulers change both
        self._perturbation: dict[torch.Tensor, torch.Tensor] = {}

    @torch.no_grad()
    def perturb(self) -> None:
        """W <- W + e from the gradients present now; the gradients are cleared for the second pass."""
        if self._perturbation:
            raise PeftlabError("SAM.perturb was called twice without a step: call step() after the second backward")
        weighted = [(p.abs() if g["adaptive"] else torch.ones_like(p)) * p.grad
                    for g in self.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([w.norm() for w in weighted])) if weighted else torch.tensor(0.0)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                e = (p * p if group["adaptive"] else 1.0) * p.grad * (group["rho"] / (norm + 1e-12))
                p.add_(e)
                self._perturbation[p] = e
                p.grad = None

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        """The base step at W with the gradient taken at W + e."""
        loss = None
        if closure is not None:
            self.perturb()
            with torch.enable_grad():
                loss = closure()
        if not self._perturbation:
            raise PeftlabError("SAM.step needs the gradient at the perturbed weights: call step(closure) after "
                               "backward (the closure recomputes the loss and calls backward), or perturb(), "
                               "backward, then step()")
        for p, e in self._perturbation.items():
            p.sub_(e)
        self._perturbation.clear()
        self.base.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none)

    def state_dict(self) -> dict:
        return self.base.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.base.load_state_dict(state_dict)
        self.param_groups = self.base.param_groups


@register_optimizer("sam")
@dataclass
class SAMConfig(OptimizerConfig):
    """SAM's fields: the perturbation radius and the base optimizer (module docstring)."""

    rho: float = 0.05
    adaptive: bool = False
    base: str = "adamw"
    base_fields: dict = dataclasses.field(default_factory=dict)

    description = "sharpness-aware minimisation around a base optimizer: the step uses the gradient at W + e"
    two_pass = True  # each step needs a second forward and backward (no gradient accumulation)

    def validate(self) -> None:
        self.check_positive("rho")
        if self.base == "sam":
            self._fail("base", "another optimizer's name (adamw, sgd, galore, ...)")
        try:
            optimizer_config(self.base, **{"lr": self.lr, **self.base_fields})
        except PeftlabError as err:
            raise PeftlabError(f"optimizer 'sam' base {self.base!r}: {err}") from None

    def build(self, params: Iterable) -> SAM:
        fields = {"lr": self.lr, **self.base_fields}
        return SAM(params, lambda groups: optimizer(self.base, groups, **fields), rho=self.rho, adaptive=self.adaptive)
