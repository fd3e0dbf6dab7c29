"""Compacter++ (Karimi Mahabadi, Henderson & Ruder 2021, arXiv 2106.04647): Compacter after the FFN only.

    h' = h + Up(act(Down(h)))     after the FFN's output projection; Down, Up PHM layers
                                  sharing one A across the model (see methods/compacter.py)

The official compacter++.json is compacter.json with add_adapter_in_self_attention = false:
the same PHM layers, initialisation and shared A, at half the sites.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..hosts import LINEAR_LIKE
from ..registry import MethodConfig, Site, register
from .bottleneck import AFTER_FFN
from .compacter import (CompacterAdapter, SharedRule, build_compacter, check_compacter, check_compacter_site,
                        shared_rule_at_site)


@register("compacter_pp")
@dataclass
class CompacterPP(MethodConfig):
    size: int = 16  # the bottleneck width (the paper: d / 32); a multiple of n
    n: int = 4  # Kronecker factors per PHM layer; A_i are (n, n)
    activation: str = "gelu_tanh"
    rule_init_std: float = 1e-4  # A ~ N(0, std^2), the official phm_init_range

    hosts = LINEAR_LIKE
    trainable_formula = "3 d + 3 size per site + n^3 shared (d: the layer's output width)"

    def __post_init__(self) -> None:
        if self.targets is None:  # None (also from a run config): the method's own places
            self.targets = list(AFTER_FFN)
        super().__post_init__()
        self.shared = SharedRule()  # not a field: never saved; a fresh A per attach

    def validate(self) -> None:
        check_compacter(self)

    def validate_site(self, site: Site) -> None:
        check_compacter_site(self, site)

    def at_site(self, overrides: dict[str, Any]) -> "CompacterPP":
        return shared_rule_at_site(self, overrides, super().at_site(overrides))

    def build(self, site: Site, stats=None, initialize: bool = True) -> CompacterAdapter:
        return build_compacter(self, site)
