"""HFT: half fine-tuning (Hui et al. 2024, arXiv 2404.18466; no official code).

Paper: Tingfeng Hui, Zhenyu Zhang, Shuohuan Wang, Weiran Xu, Yu Sun, Hua Wu, "HFT: Half
Fine-Tuning for Large Language Models", 2024.

Half of the model's parameters train in place, half stay exactly as they were, chosen at the
level of parameter categories (a linear layer: its weight and bias) in each transformer block:

    attention   half of the block's attention projections (2 of q, k, v, o)
    FFN         half of its FFN linears, rounded up in a random half of the blocks and down in
                the other half (Llama's 3: 2 of 3 in half the blocks, 1 of 3 in the rest)

    W' = W0 + what training did, for the chosen categories; W' = W0 for the rest.

A stage lasts `stage_steps` optimizer steps (None: the whole run, one draw at attach); at each
new stage the halves are re-drawn. The draw for stage s is a function of (`seed`, s) alone.
After each step (`peftlab.step(model, step, optimizer=...)`), a category that freezes loses its
gradient and its optimizer state, so optimizer memory is that of the trained half.

Categories are every linear layer inside the blocks (`targets` and `exclude` are not read, a
training run's default targets included: HFT halves whole blocks); a layer whose name inside
its block contains "attn" or "attention" is an attention projection, the others FFN linears. Norms, embeddings and the head stay frozen (the
training recipe adds a classifier's new head through also_train). The block list is the
model's largest nn.ModuleList, or `blocks`.

Choices where the paper is silent: the stage length within one run, the random choice of the
blocks that get the larger FFN half, and that parameters outside the categories are frozen.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core import Adapter
from ..errors import PeftlabError
from ..hosts import LINEAR_LIKE, host_kind
from ..model_level import MODEL, ModelAdapter
from ..registry import MethodConfig, register
from .lisa import canonical_parameters, find_blocks, set_trainable


class HFTAdapter(ModelAdapter):
    """Categories (linear layers) per block, split into attention and FFN; `chosen` (categories,) 0/1."""

    weight_form = True

    def __init__(self, categories: list[dict[str, nn.Parameter]], attention: list[list[int]], ffn: list[list[int]]):
        super().__init__({k: p for category in categories for k, p in category.items()})
        self.categories = categories  # each: the parameters of one linear layer, by name
        self.attention, self.ffn = attention, ffn  # per block: indices into categories
        self.register_buffer("chosen", torch.zeros(len(categories), dtype=torch.int64))

    def install(self, model: nn.Module, hooks) -> None:
        self.choose(self.chosen.bool().tolist())

    def choose(self, mask: list[bool], optimizer: Any = None) -> None:
        for category, on in zip(self.categories, mask):
            if not on:
                set_trainable(category.values(), False, optimizer)
        for category, on in zip(self.categories, mask):
            if on:
                set_trainable(category.values(), True)
        with torch.no_grad():
            self.chosen.copy_(torch.tensor(mask, dtype=torch.int64))

    def draw(self, seed: int, stage: int) -> list[bool]:
        """Half of each block's attention categories; half of its FFN ones, rounded up in a random half of
        the blocks and down in the others."""
        generator = torch.Generator().manual_seed(seed * 1_000_003 + stage)
        blocks = len(self.attention)
        larger = set(torch.randperm(blocks, generator=generator)[: (blocks + 1) // 2].tolist())
        mask = [False] * len(self.categories)
        for b in range(blocks):
            attention, ffn = self.attention[b], self.ffn[b]
            count = {"attention": len(attention) // 2,
                     "ffn": (len(ffn) + 1) // 2 if b in larger else len(ffn) // 2}
            for group, members in (("attention", attention), ("ffn", ffn)):
                for i in torch.randperm(len(members), generator=generator)[: count[group]].tolist():
                    mask[members[i]] = True
        return mask


@register("hft")
@dataclass
class HFT(MethodConfig):
    stage_steps: int | None = None  # steps per stage; None: one stage, the whole run
    blocks: str | None = None  # the nn.ModuleList of transformer blocks; None: the largest one
    seed: int = 0

    hosts = LINEAR_LIKE
    site_adapters = False
    model_adapter = True
    step_hook = True
    step_needs_optimizer = True
    trainable_formula = "half of each block's attention and FFN linears, re-drawn every stage_steps"

    def validate(self) -> None:
        self.check_positive_int("stage_steps", optional=True)

    def build_model(self, model: nn.Module, initialize: bool = True) -> HFTAdapter:
        name, module = find_blocks(model, self.blocks, "HFT")
        modules = dict(model.named_modules())
        categories, attention, ffn = [], [], []
        for b, block in enumerate(module):
            attention.append([])
            ffn.append([])
            for inner, layer in block.named_modules():
                full = f"{name}.{b}.{inner}"
                kind = host_kind(layer)
                if kind is None or kind.name not in LINEAR_LIKE:
                    continue
                group = attention if ("attn" in inner or "attention" in inner) else ffn
                group[b].append(len(categories))
                categories.append(canonical_parameters(model, module=modules[full]))
        if not categories:
            raise PeftlabError(f"HFT found no linear layer in the blocks of {name}: name the list of transformer "
                               "blocks with blocks=")
        adapter = HFTAdapter(categories, attention, ffn)
        with torch.no_grad():
            adapter.chosen.copy_(torch.tensor(adapter.draw(self.seed, 0), dtype=torch.int64))
        return adapter

    def after_step(self, adapters: dict[str, Adapter], step: int, optimizer: Any = None) -> None:
        if self.stage_steps is None or step % self.stage_steps:
            return
        adapter = adapters[MODEL]
        adapter.choose(adapter.draw(self.seed, step // self.stage_steps), optimizer)
