"""LISA: layerwise importance sampling (Pan et al. 2024, arXiv 2403.17919).

Paper: Rui Pan, Xiang Liu, Shizhe Diao, Renjie Pi, Jipeng Zhang, Chi Han, Tong Zhang, "LISA:
Layerwise Importance Sampling for Memory-Efficient Large Language Model Fine-Tuning", 2024.
Official code: OptimalScale/LMFlow (`lisa_trainer.py`, DynamicLayerActivationCallback).

The model's own parameters train in place (no new tensors, W' = W0 + what training did):

    always:  everything outside the transformer blocks (embeddings, final norm, head, pooler)
    blocks:  gamma = `active_blocks` of the L blocks, drawn uniformly without replacement;
             every K = `interval` steps (official 20, gamma = 2) all blocks freeze and a new
             gamma are drawn

The draw at step t (0 at attach) is a function of (`seed`, t) alone, so a resumed or
re-attached run draws the same blocks. After each step (`peftlab.step(model, step,
optimizer=...)`), a block that freezes loses its gradient and its optimizer state (Adam's two
moments), so optimizer memory follows the active set as the paper promises; a block that
returns starts with fresh moments. `targets` and `exclude` are not read (a training run's
default targets included): LISA trains whole blocks, found as the model's largest
nn.ModuleList, or named by `blocks`.

Save writes every parameter LISA may train (the blocks and the outside); detach puts their
original values back; merge has nothing to fold (the change is already in the weights).
The helpers here (finding the blocks, freezing with the optimizer state dropped) serve HFT too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

from ..core import Adapter
from ..errors import PeftlabError
from ..model_level import MODEL, ModelAdapter
from ..registry import MethodConfig, register


def find_blocks(model: nn.Module, name: str | None, method: str) -> tuple[str, nn.ModuleList]:
    """(name, the model's list of transformer blocks): `name`, or the ModuleList holding the most parameters."""
    if name is not None:
        module = dict(model.named_modules()).get(name)
        if not isinstance(module, nn.ModuleList):
            raise PeftlabError(f"{method} blocks={name!r} is not a list of blocks (nn.ModuleList) in this model: "
                               "name one, e.g. 'encoder.layer' or 'model.layers', or leave it None")
        return name, module
    lists = [(sum(p.numel() for p in m.parameters()), n, m) for n, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise PeftlabError(f"{method} found no list of transformer blocks (nn.ModuleList) in this model: "
                           "name it with blocks=")
    _, found, module = max(lists, key=lambda item: item[0])
    return found, module


def canonical_parameters(model: nn.Module, module: nn.Module | None = None) -> dict[str, nn.Parameter]:
    """name (in model.named_parameters(), tied weights once) -> parameter, for `module`'s parameters."""
    canonical = {id(p): n for n, p in model.named_parameters()}
    owner = model if module is None else module
    return {canonical[id(p)]: p for p in owner.parameters()}


def set_trainable(params: Iterable[nn.Parameter], trainable: bool, optimizer: Any = None) -> None:
    """Flip requires_grad; a parameter that freezes also drops its gradient and its optimizer state."""
    for p in params:
        if not trainable and p.requires_grad:
            p.grad = None
            if optimizer is not None:
                optimizer.state.pop(p, None)
        p.requires_grad_(trainable)


class LISAAdapter(ModelAdapter):
    """The model's own parameters, trained in place; `active` (gamma,) the blocks training now."""

    weight_form = True

    def __init__(self, blocks: list[dict[str, nn.Parameter]], outside: dict[str, nn.Parameter], active: int):
        super().__init__({**outside, **{k: p for block in blocks for k, p in block.items()}})
        self.blocks = blocks  # per block: its parameters by name
        self.register_buffer("active", torch.zeros(active, dtype=torch.int64))

    def install(self, model: nn.Module, hooks) -> None:
        self.activate(self.active.tolist())

    def activate(self, chosen: list[int], optimizer: Any = None) -> None:
        for i, block in enumerate(self.blocks):
            if i not in chosen:
                set_trainable(block.values(), False, optimizer)
        for i in chosen:
            set_trainable(self.blocks[i].values(), True)
        with torch.no_grad():
            self.active.copy_(torch.tensor(chosen, dtype=torch.int64))


def draw(seed: int, step: int, population: int, count: int) -> list[int]:
    """`count` of range(population), uniformly without replacement, from (seed, step) alone."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return sorted(torch.randperm(population, generator=generator)[:count].tolist())


@register("lisa")
@dataclass
class LISA(MethodConfig):
    active_blocks: int = 2  # gamma: blocks training at once
    interval: int = 20  # K: steps between draws
    blocks: str | None = None  # the nn.ModuleList of transformer blocks; None: the largest one
    seed: int = 0

    hosts = ()
    site_adapters = False
    model_adapter = True
    step_hook = True
    step_needs_optimizer = True
    trainable_formula = "active_blocks of the blocks + everything outside them, re-drawn every interval steps"

    def validate(self) -> None:
        self.check_positive_int("active_blocks", "interval")

    def build_model(self, model: nn.Module, initialize: bool = True) -> LISAAdapter:
        name, module = find_blocks(model, self.blocks, "LISA")
        if self.active_blocks > len(module):
            raise PeftlabError(f"LISA active_blocks={self.active_blocks} is more than the {len(module)} blocks of "
                               f"{name}: use active_blocks <= {len(module)}")
        blocks = [canonical_parameters(model, module=block) for block in module]
        inside = {k for block in blocks for k in block}
        outside = {k: p for k, p in canonical_parameters(model).items() if k not in inside}
        adapter = LISAAdapter(blocks, outside, self.active_blocks)
        with torch.no_grad():
            adapter.active.copy_(torch.tensor(draw(self.seed, 0, len(blocks), self.active_blocks)))
        return adapter

    def after_step(self, adapters: dict[str, Adapter], step: int, optimizer: Any = None) -> None:
        if step % self.interval:
            return
        adapter = adapters[MODEL]
        adapter.activate(draw(self.seed, step, len(adapter.blocks), self.active_blocks), optimizer)
