"""A few optimizer steps through peftlab's training hooks, for methods that change while training.

The loop is what a user's own loop does: AdamW over `peftlab.param_groups`, the task loss plus
`peftlab.regularization(model)`, and `peftlab.step(model, step)` after every optimizer step
(`step` counts the optimizer steps done, from 1).
"""
from __future__ import annotations

from typing import Callable

import torch

import peftlab
from conftest import output_of, token_batch


def train(model: torch.nn.Module, steps: int, lr: float = 1e-2, weight_decay: float = 0.0,
          after_step: Callable[[int], None] | None = None) -> list[float]:
    """Regress the model's output onto a fixed random target for `steps` steps; returns the losses."""
    batch = token_batch(seed=3, batch=4, length=12)
    with torch.no_grad():
        target = torch.randn(output_of(model, batch).shape, generator=torch.Generator().manual_seed(4))
    optimizer = torch.optim.AdamW(peftlab.param_groups(model, lr), lr=lr, weight_decay=weight_decay)
    losses = []
    model.train()
    for step in range(1, steps + 1):
        loss = (output_of(model, batch) - target).pow(2).mean()
        extra = peftlab.regularization(model)
        total = loss if extra is None else loss + extra
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        peftlab.step(model, step)
        losses.append(loss.item())
        if after_step is not None:
            after_step(step)
    model.eval()
    return losses
