"""Bottleneck adapters: the pieces Houlsby, Pfeiffer, the parallel adapter and Compacter share.

    sequential (Houlsby et al. 2019, arXiv 1902.00751; Pfeiffer et al. 2021, arXiv 2005.00247)
        h' = h + Up(act(Down(h)))            h: a layer's output (..., d)
    parallel (He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning",
              arXiv 2110.04366)
        FFN(x) + s * Up(act(Down(x)))        x: the FFN's input (..., d)

    Down: d -> m (weight (m, d), bias (m,)), Up: m -> d (weight (d, m), bias (d,)); m = `size`.
    Trained: Down and Up (2 m d + m + d per place). The host model is frozen.

Initialisation: Down as nn.Linear's default (kaiming-uniform, a = sqrt(5)), its bias 0; Up and
its bias 0, so the output is unchanged at attach (He et al.'s init; Houlsby et al. draw Up small
rather than zero, which only approximately keeps the output).

No weight form: act sits between Down and Up, so the change is no matrix a host layer could
hold; their adapters declare weight_form = False and merge refuses them.

Where they sit. A sequential adapter is a site adapter on the linear layer whose output it
changes (the attention's or the FFN's output projection, before the residual add and the
LayerNorm); targets=None (the default) names those layers in BERT, Llama and GPT-2:

    after attention   BERT attention.output.dense   Llama self_attn.o_proj   GPT-2 attn.c_proj
    after the FFN     BERT layer.N.output.dense     Llama mlp.down_proj      GPT-2 mlp.c_proj

The parallel adapter needs the FFN's input as well as its output; it lives beside FFN blocks
(see methods/parallel_adapter.py).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import Adapter
from ..errors import PeftlabError
from ..hosts import HostKind
from ..registry import MethodConfig

# The places targets=None picks: the output projections of attention and of the FFN, named for BERT/MiniLM,
# Llama/SmolLM2 and GPT-2 (a name matches a module whose dotted name ends with it). The FFN's
# BERT name needs a regex: "output.dense" alone also ends "attention.output.dense".
AFTER_ATTENTION = ["attention.output.dense", "self_attn.o_proj", "attn.c_proj"]
AFTER_FFN = [r"re:.*layer\.\d+\.output\.dense", "mlp.down_proj", "mlp.c_proj"]

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),  # T5's and Compacter's "gelu_new"
    "silu": F.silu,  # "swish"
    "tanh": torch.tanh,
}


def check_bottleneck(config: MethodConfig) -> None:
    """The fields every bottleneck method has: size (m >= 1) and activation (a known name)."""
    config.check_positive_int("size")
    if config.activation not in ACTIVATIONS:
        raise PeftlabError(f"{type(config).__name__} activation {config.activation!r} is unknown; choose one of "
                           f"{sorted(ACTIVATIONS)}")


class DenseMap(nn.Module):
    """x (..., in) -> x W^T + b: a plain dense map, W (out, in), b (out,)."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, zero: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype))
        if not zero:
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class Bottleneck(nn.Module):
    """x (..., d) -> Up(act(Down(x))) (..., d); `down` and `up` are any maps d -> m and m -> d."""

    def __init__(self, down: nn.Module, up: nn.Module, activation: str):
        super().__init__()
        self.down, self.up = down, up
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        return self.up(ACTIVATIONS[self.activation](self.down(x)))


def dense_bottleneck(d: int, size: int, activation: str, dtype: torch.dtype) -> Bottleneck:
    """Down (size, d) drawn as nn.Linear's, Up (d, size) zero: the identity at init."""
    return Bottleneck(DenseMap(d, size, dtype, zero=False), DenseMap(size, d, dtype, zero=True), activation)


class SequentialAdapter(Adapter):
    """h' = h + f(h) at a host layer's output h (..., out), with f a Bottleneck."""

    weight_form = False
    additive = False

    def __init__(self, kind: HostKind, bottleneck: nn.Module):
        super().__init__(kind)
        self.bottleneck = bottleneck

    def forward(self, host: nn.Module, x: Tensor, base) -> Tensor:
        h = base(x)  # (..., out)
        return h + self.bottleneck(h)
