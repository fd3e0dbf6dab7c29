"""Pfeiffer adapters (Pfeiffer et al. 2021, "AdapterFusion", arXiv 2005.00247): one bottleneck per layer.

    h' = h + Up(act(Down(h)))      after the FFN's output projection only

    Down: (size, d) + bias, Up: (d, size) + bias, d the layer's output width (the hidden size).
    Trained: Down and Up, 2 size d + size + d per site. The model is frozen.

Starts with Up = 0 (the output is unchanged at attach); see methods/bottleneck.py for the
initialisation, the default places in BERT, Llama and GPT-2, and why there is no weight form.
Half of Houlsby's sites: Pfeiffer et al. found the adapter after the FFN alone about as good.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..hosts import LINEAR_LIKE
from ..registry import MethodConfig, Site, register
from .bottleneck import AFTER_FFN, SequentialAdapter, check_bottleneck, dense_bottleneck


@register("pfeiffer")
@dataclass
class Pfeiffer(MethodConfig):
    size: int = 64  # the bottleneck width m
    activation: str = "relu"

    hosts = LINEAR_LIKE
    trainable_formula = "2 size d + size + d per site (d: the layer's output width)"

    def __post_init__(self) -> None:
        if self.targets is None:  # None (also from a run config): the method's own places
            self.targets = list(AFTER_FFN)
        super().__post_init__()

    def validate(self) -> None:
        check_bottleneck(self)

    def build(self, site: Site, stats=None, initialize: bool = True) -> SequentialAdapter:
        bottleneck = dense_bottleneck(site.out_features, self.size, self.activation, site.weight.dtype)
        return SequentialAdapter(site.kind, bottleneck)
