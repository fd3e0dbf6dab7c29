"""The parallel adapter (He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer
Learning", arXiv 2110.04366): a bottleneck beside each FFN block, scaled.

    FFN(x) + s * Up(act(Down(x)))      x: the FFN block's input (..., d), s = `scale` (fixed)

    Down: (size, d) + bias, Up: (d, size) + bias. Trained: 2 size d + size + d per FFN block.

The unified view's best single change of the FFN (a parallel adapter with s = 4); MAM adds a
prefix on attention (methods/mam.py composes `parallel_ffn` with one). Up starts at 0, so the
output is unchanged at attach; no weight form (see methods/bottleneck.py).

Where it sits. It needs the FFN's input as well as its output, which no single linear layer
sees, so it is a model-level adapter (peftlab.model_level): forward hooks on the FFN blocks
`targets` selects, in two layouts (FFN_LAYOUTS, by the block's class):

    "output"    the block computes FFN(x) alone (Llama's and GPT-2's `mlp`): a hook after it
                adds s f(x) to its output
    "residual"  the block also adds the residual and normalises (BERT's `layer.N.output`:
                LayerNorm(FFN(x) + x), with x passed in as `input_tensor`): a hook before it
                passes x + s f(x) as the residual, which gives LayerNorm(FFN(x) + s f(x) + x)

Its tensors sit at `adapters.<name>.blocks.<block name, dots as '-'>.{down,up}.{weight,bias}`.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..errors import PeftlabError
from ..model_level import ModelAdapter, ModelHooks
from ..registry import MethodConfig, register
from ..targets import select
from .bottleneck import Bottleneck, check_bottleneck, dense_bottleneck

# The FFN blocks of BERT/MiniLM (layer.N.output), Llama/SmolLM2 and GPT-2 (mlp).
FFN_BLOCKS = [r"re:.*layer\.\d+\.output", "mlp"]


@dataclass(frozen=True)
class FFNLayout:
    """How a parallel adapter reaches one kind of FFN block."""

    adds_to: str  # "output" (a hook after the block) or "residual" (a hook before it), see above
    input_at: tuple[int, str]  # the FFN input x: (position, keyword) among the block's arguments
    width: Callable[[nn.Module], int]  # d, the hidden size


_LLAMA_STYLE = FFNLayout("output", (0, "x"), lambda m: m.down_proj.out_features)
_BERT_STYLE = FFNLayout("residual", (1, "input_tensor"), lambda m: m.dense.out_features)
FFN_LAYOUTS: dict[str, FFNLayout] = {
    "BertOutput": _BERT_STYLE, "RobertaOutput": _BERT_STYLE,
    "LlamaMLP": _LLAMA_STYLE, "MistralMLP": _LLAMA_STYLE, "Qwen2MLP": _LLAMA_STYLE,
    "GPT2MLP": FFNLayout("output", (0, "hidden_states"), lambda m: m.c_proj.weight.shape[1]),
}


def ffn_blocks(model: nn.Module, targets: Any, exclude: Any, method: str) -> dict[str, FFNLayout]:
    """Block name -> layout for every module `targets` selects; refuses one that is no known FFN block."""
    modules = dict(model.named_modules())
    blocks = {name: FFN_LAYOUTS.get(type(modules[name]).__name__) for name in select(model, targets, exclude)}
    unknown = [f"{name} ({type(modules[name]).__name__})" for name, layout in blocks.items() if layout is None]
    if unknown:
        raise PeftlabError(f"{method} targets select {', '.join(unknown[:4])}{' ...' if len(unknown) > 4 else ''}, "
                           f"which is no FFN block it knows ({', '.join(FFN_LAYOUTS)}): target the FFN blocks, "
                           f"e.g. targets={FFN_BLOCKS}")
    return blocks


def _input(layout: FFNLayout, args: tuple, kwargs: dict) -> Tensor:
    position, keyword = layout.input_at
    return args[position] if len(args) > position else kwargs[keyword]


def _add_beside(f: Bottleneck, scale: float, layout: FFNLayout, module, args, kwargs, output: Tensor) -> Tensor:
    return output + scale * f(_input(layout, args, kwargs))  # FFN(x) + s f(x)


def _add_to_residual(f: Bottleneck, scale: float, layout: FFNLayout, module, args, kwargs):
    x = _input(layout, args, kwargs)
    residual = x + scale * f(x)  # the block then computes LayerNorm(FFN(x) + residual)
    position, keyword = layout.input_at
    if len(args) > position:
        return (*args[:position], residual, *args[position + 1:]), kwargs
    return args, {**kwargs, keyword: residual}


class ParallelFFN(ModelAdapter):
    """A bottleneck beside each chosen FFN block: FFN(x) + s f(x)."""

    def __init__(self, layouts: dict[str, FFNLayout], bottlenecks: dict[str, Bottleneck], scale: float):
        super().__init__()
        self.layouts = layouts  # block name -> layout, in model order (plain: not state)
        self.blocks = nn.ModuleDict({name.replace(".", "-"): bottlenecks[name] for name in layouts})
        self.scale = scale

    def install(self, model: nn.Module, hooks: ModelHooks) -> None:
        for name, layout in self.layouts.items():
            f = self.blocks[name.replace(".", "-")]
            if layout.adds_to == "output":
                hooks.after(model.get_submodule(name), functools.partial(_add_beside, f, self.scale, layout))
            else:
                hooks.before(model.get_submodule(name), functools.partial(_add_to_residual, f, self.scale, layout))


def parallel_ffn(model: nn.Module, targets: Any, exclude: Any, size: int, scale: float, activation: str,
                 method: str = "parallel_adapter") -> ParallelFFN:
    """The parallel adapter of `model`'s FFN blocks that `targets` selects, built beside the model (nothing
    changes until the core installs it). MAM builds its FFN part with this."""
    layouts = ffn_blocks(model, targets, exclude, method)
    bottlenecks = {}
    for name, layout in layouts.items():
        block = model.get_submodule(name)
        # the block's dtype: its floating-point parameters' (a quantized base packs weights in uint8;
        # a block of only packed weights computes in fp32)
        floating = next((p for p in block.parameters() if p.is_floating_point()), None)
        f = dense_bottleneck(layout.width(block), size, activation, floating.dtype if floating is not None
                             else torch.float32)
        bottlenecks[name] = f.to(next(block.parameters()).device)
    return ParallelFFN(layouts, bottlenecks, scale)


@register("parallel_adapter")
@dataclass
class ParallelAdapter(MethodConfig):
    size: int = 64  # the bottleneck width m
    scale: float = 4.0  # s; He et al.'s value
    activation: str = "relu"

    site_adapters = False
    model_adapter = True
    trainable_formula = "2 size d + size + d per FFN block (d: the hidden size)"

    def __post_init__(self) -> None:
        if self.targets is None:  # None (also from a run config): the method's own places
            self.targets = list(FFN_BLOCKS)
        super().__post_init__()

    def validate(self) -> None:
        check_bottleneck(self)
        if not self.scale > 0:
            raise PeftlabError(f"ParallelAdapter scale must be positive, got {self.scale!r}")
        if self.overrides:
            raise PeftlabError("ParallelAdapter takes no overrides: one size and scale serve every FFN block; "
                               "attach a second adapter with other targets for other values")

    def build_model(self, model: nn.Module, initialize: bool = True) -> ParallelFFN:
        return parallel_ffn(model, self.targets, self.exclude, self.size, self.scale, self.activation, self.method)
