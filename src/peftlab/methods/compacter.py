"""Compacter (Karimi Mahabadi, Henderson & Ruder 2021, arXiv 2106.04647; rabeehk/compacter).

A Houlsby adapter whose Down and Up are PHM layers (parameterised hypercomplex multiplication):

    h' = h + Up(act(Down(h)))                      after the attention's and the FFN's output
    PHM(x) = x H^T + b,   H = sum_i kron(A_i, B_i)  (out, in),   i = 1..n
    A_i: (n, n), shared by every PHM layer of the model (one `rule` tensor A of shape (n, n, n))
    B_i = s_i t_i^T: (out/n, in/n), rank one, s_i (out/n, 1), t_i (1, in/n), per layer

    Trained: A (n^3, once) and per site s, t and the biases of Down (d -> size) and Up
    (size -> d): 3 d + 3 size. d and size must both be multiples of n.

Initialisation as the official code (compacter.json: shared rule, factorised W, glorot-uniform
W, "normal" rule with std 1e-4): A ~ N(0, rule_init_std^2); every s_i, t_i glorot-uniform with
gain sqrt(2); biases 0. One change: Up's t starts at 0, so Up's H is 0 and the output is
unchanged at attach (the official init changes it by about rule_init_std^2).

The shared A lives in the first site's adapter (saved there, under `<site>.adapters.<name>.rule`);
the other sites hold a reference to the same tensor, so it trains once and is saved once.
The official runs also train the LayerNorms: add them with also_train if wanted. No weight form
(see methods/bottleneck.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import Adapter
from ..errors import PeftlabError
from ..hosts import LINEAR_LIKE, HostKind
from ..registry import MethodConfig, Site, register
from .bottleneck import ACTIVATIONS, AFTER_ATTENTION, AFTER_FFN, check_bottleneck


def kron_sum(rule: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """H = sum_i kron(A_i, s_i t_i): rule A (n, n, n), left s (n, p, 1), right t (n, 1, q) -> (n p, n q).

    kron(A, B)[a p + c, b q + e] = A[a, b] B[c, e]: one einsum over i gives every block at once.
    """
    B = left @ right  # (n, p, q), each B_i of rank one
    n, p, q = B.shape
    return torch.einsum("iab,ice->acbe", rule, B).reshape(n * p, n * q)


def _glorot_uniform(rows: int, cols: int, count: int, dtype: torch.dtype) -> Tensor:
    # Xavier-uniform with gain sqrt(2) for each of `count` (rows, cols) matrices, as the official init.
    bound = math.sqrt(2.0) * math.sqrt(6.0 / (rows + cols))
    return torch.empty(count, rows, cols, dtype=dtype).uniform_(-bound, bound)


class PHMMap(nn.Module):
    """x (..., in) -> x H^T + b with H = kron_sum(A, s, t) (out, in); A is given at each call."""

    def __init__(self, in_features: int, out_features: int, n: int, dtype: torch.dtype, zero_right: bool):
        super().__init__()
        p, q = out_features // n, in_features // n
        self.left = nn.Parameter(_glorot_uniform(p, 1, n, dtype))  # s: (n, out/n, 1)
        right = torch.zeros(n, 1, q, dtype=dtype) if zero_right else _glorot_uniform(1, q, n, dtype)
        self.right = nn.Parameter(right)  # t: (n, 1, in/n)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype))

    def weight(self, rule: Tensor) -> Tensor:
        return kron_sum(rule, self.left, self.right)  # (out, in)

    def forward(self, x: Tensor, rule: Tensor) -> Tensor:
        return F.linear(x, self.weight(rule), self.bias)


class SharedRule:
    """The A of one attached Compacter: the first site built makes it, every later site refers to it.

    It travels with its config: attach deep-copies the config it is given, and a copy starts
    empty, so each attach draws its own A and its first site owns it.
    """

    def __init__(self) -> None:
        self.rule: nn.Parameter | None = None

    def __deepcopy__(self, memo: dict) -> "SharedRule":
        return SharedRule()

    def take(self, n: int, std: float, dtype: torch.dtype) -> tuple[nn.Parameter, bool]:
        """(A, whether this call made it)."""
        if self.rule is not None:
            return self.rule, False
        self.rule = nn.Parameter(torch.randn(n, n, n, dtype=torch.float32).mul_(std).to(dtype))
        return self.rule, True


class CompacterAdapter(Adapter):
    """h' = h + Up(act(Down(h))) with PHM Down and Up sharing one A across the model."""

    weight_form = False
    additive = False

    def __init__(self, kind: HostKind, d: int, size: int, n: int, activation: str, rule: nn.Parameter,
                 owns_rule: bool, dtype: torch.dtype):
        super().__init__(kind)
        if owns_rule:
            self.rule = rule  # registered here: trained, saved and loaded at this site
        else:
            self.__dict__["rule"] = rule  # a reference to the first site's A, not a parameter of this one
        self.down = PHMMap(d, size, n, dtype, zero_right=False)
        self.up = PHMMap(size, d, n, dtype, zero_right=True)
        self.activation = activation

    def bottleneck(self, h: Tensor) -> Tensor:
        z = ACTIVATIONS[self.activation](self.down(h, self.rule))  # (..., size)
        return self.up(z, self.rule)  # (..., d)

    def forward(self, host: nn.Module, x: Tensor, base) -> Tensor:
        h = base(x)  # (..., d)
        return h + self.bottleneck(h)


def check_compacter(config: MethodConfig) -> None:
    """size, activation, n >= 2, size a multiple of n, a finite positive rule_init_std."""
    check_bottleneck(config)
    config.check_positive_int("n")
    name = type(config).__name__
    if config.n < 2:
        raise PeftlabError(f"{name} n must be at least 2 (n = 1 is a dense adapter: use houlsby), got {config.n}")
    if config.size % config.n:
        raise PeftlabError(f"{name} size={config.size} must be a multiple of n={config.n}: PHM splits it into n "
                           f"blocks; use e.g. size={config.n * max(1, round(config.size / config.n))}")
    if not config.rule_init_std > 0:
        raise PeftlabError(f"{name} rule_init_std must be positive, got {config.rule_init_std!r}")


def check_compacter_site(config: MethodConfig, site: Site) -> None:
    """The layer's output width d splits into n blocks too."""
    if site.out_features % config.n:
        raise PeftlabError(f"{type(config).__name__} n={config.n} does not divide the width {site.out_features} of "
                           f"{site.name}: choose an n that divides it, or exclude that layer")


def shared_rule_at_site(config: MethodConfig, overrides: dict[str, Any], sited: MethodConfig) -> MethodConfig:
    """A per-site config (overrides applied) that keeps the one shared A; n cannot vary by site."""
    if "n" in overrides and overrides["n"] != config.n:
        raise PeftlabError(f"{type(config).__name__} overrides set n={overrides['n']!r} for some layers, but A is "
                           "shared by every layer and has one n: remove n from overrides")
    sited.shared = config.shared
    return sited


def build_compacter(config: MethodConfig, site: Site) -> CompacterAdapter:
    dtype = site.weight.dtype
    rule, owns = config.shared.take(config.n, config.rule_init_std, dtype)
    return CompacterAdapter(site.kind, site.out_features, config.size, config.n, config.activation, rule, owns,
                            dtype)


@register("compacter")
@dataclass
class Compacter(MethodConfig):
    size: int = 16  # the bottleneck width (the paper: d / 32); a multiple of n
    n: int = 4  # Kronecker factors per PHM layer; A_i are (n, n)
    activation: str = "gelu_tanh"
    rule_init_std: float = 1e-4  # A ~ N(0, std^2), the official phm_init_range

    hosts = LINEAR_LIKE
    trainable_formula = "3 d + 3 size per site + n^3 shared (d: the layer's output width)"

    def __post_init__(self) -> None:
        if self.targets is None:  # None (also from a run config): the method's own places
            self.targets = [*AFTER_ATTENTION, *AFTER_FFN]
        super().__post_init__()
        self.shared = SharedRule()  # not a field: never saved; a fresh A per attach (see SharedRule)

    def validate(self) -> None:
        check_compacter(self)

    def validate_site(self, site: Site) -> None:
        check_compacter_site(self, site)

    def at_site(self, overrides: dict[str, Any]) -> "Compacter":
        return shared_rule_at_site(self, overrides, super().at_site(overrides))

    def build(self, site: Site, stats=None, initialize: bool = True) -> CompacterAdapter:
        return build_compacter(self, site)
