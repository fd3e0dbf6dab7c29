"""Intrinsic dimension: training in a random d-dimensional subspace (Li, Farkhoor, Liu & Yosinski
2018, "Measuring the intrinsic dimension of objective landscapes", arXiv 1804.08838; Aghajanyan,
Zettlemoyer & Gupta 2020, "Intrinsic dimensionality explains the effectiveness of language model
fine-tuning", arXiv 2012.13255).

Every targeted weight moves only along a fixed random projection of one shared vector z:

    theta = theta_0 + P z          z: (d,) the only trained tensor (starts at 0: identity at attach)
                                   P: (D, d) random, D = the targeted weights' entries in total

P is never stored. Its rows are split by layer, and each layer's block P_l (D_l x d) is the
Fastfood transform of the official code (Li et al.; Aghajanyan et al.'s `fastfood_torched`):

    P_l z = (H G Pi H B [z; 0])[:D_l] / (sqrt(L * sum G^2) * sqrt(D_l / L))

with L = 2^ceil(log2 max(D_l, d)), [z; 0] zero-padded to L, B a random +-1 diagonal, H the
(unnormalised) Walsh-Hadamard transform, Pi a random permutation, G a Gaussian diagonal. The
divisor gives P's columns unit norm on average. Memory is O(L) per layer (B, Pi, G), never
O(D x d); one product costs O(L log L). B, Pi and G are drawn from `seed` and the layer's name,
so they are rebuilt, not saved: a saved adapter is z alone.

The change of layer l, reshaped to its (out, in) weight, is added to its output:
y = W0 x + b + (P_l z) x. That is a forward hook on each targeted layer (a model-level adapter),
so it has no weight form here (merge refuses; `delta_weights()` gives the per-layer changes).
`peft` has no such adapter: save(format="peft") refuses it. Aghajanyan et al.'s SAID variant
(a learned scale per layer) is not implemented.
"""
from __future__ import annotations

import functools
import math
import zlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..core import sites_for
from ..errors import PeftlabError
from ..hosts import LINEAR_LIKE
from ..model_level import ModelAdapter, ModelHooks
from ..registry import MethodConfig, Site, register


def hadamard(x: Tensor) -> Tensor:
    """The unnormalised Walsh-Hadamard transform of x (L,), L a power of two: H x with H = [[1, 1], [1, -1]]^(x log2 L)."""
    length = x.shape[-1]
    h = 1
    while h < length:
        pairs = x.reshape(length // (2 * h), 2, h)  # pairs[:, 0] and pairs[:, 1] are h apart
        x = torch.stack((pairs[:, 0] + pairs[:, 1], pairs[:, 0] - pairs[:, 1]), dim=1).reshape(length)
        h *= 2
    return x


class Fastfood(nn.Module):
    """One layer's block of P: (d,) -> (size,), from B, Pi, G drawn with `seed`; nothing saved."""

    def __init__(self, d: int, size: int, seed: int):
        super().__init__()
        self.d, self.size = d, size
        self.length = 2 ** math.ceil(math.log2(max(size, d, 2)))
        generator = torch.Generator().manual_seed(seed)
        sign = torch.randint(0, 2, (self.length,), generator=generator).float() * 2 - 1  # B
        permutation = torch.randperm(self.length, generator=generator)  # Pi
        gauss = torch.randn(self.length, generator=generator)  # G
        self.divisor = math.sqrt(self.length * float(gauss.double().pow(2).sum())) * math.sqrt(size / self.length)
        self.register_buffer("sign", sign, persistent=False)
        self.register_buffer("permutation", permutation, persistent=False)
        self.register_buffer("gauss", gauss, persistent=False)

    def forward(self, z: Tensor) -> Tensor:
        padded = torch.nn.functional.pad(z, (0, self.length - self.d))  # (L,)
        mixed = hadamard(padded * self.sign.to(z.dtype))
        return hadamard(mixed[self.permutation] * self.gauss.to(z.dtype))[: self.size] / self.divisor  # (size,)


def layer_seed(seed: int, site: str) -> int:
    """A layer's own stream: the method's seed and the layer's name (not its position in `targets`)."""
    return (seed * 1_000_003 + zlib.crc32(site.encode())) % (2 ** 63)


def _add_change(adapter: "IntrinsicAdapter", site: Site, module: nn.Module, args: tuple, kwargs: dict,
                output: Tensor) -> Tensor:
    x = args[0] if args else next(iter(kwargs.values()))
    return output + site.kind.apply_in(module, x, adapter.delta_weight(site.name))  # (..., out)


class IntrinsicAdapter(ModelAdapter):
    """z (d,) and one Fastfood block per targeted layer."""

    def __init__(self, sites: list[Site], d: int, seed: int, dtype: torch.dtype):
        super().__init__()
        self.sites = sites
        self.z = nn.Parameter(torch.zeros(d, dtype=dtype))
        self.projections = nn.ModuleDict({str(i): Fastfood(d, s.out_features * s.in_features, layer_seed(seed, s.name))
                                          for i, s in enumerate(sites)})
        self.index = {s.name: str(i) for i, s in enumerate(sites)}
        self.shapes = {s.name: (s.out_features, s.in_features) for s in sites}

    def install(self, model: nn.Module, hooks: ModelHooks) -> None:
        for site in self.sites:
            hooks.after(site.host, functools.partial(_add_change, self, site))

    def delta_weight(self, site: str) -> Tensor:
        """(out, in): P_l z for one targeted layer, in the layout of its weight matrix view."""
        return self.projections[self.index[site]](self.z).view(self.shapes[site])

    def delta_weights(self) -> dict[str, Tensor]:
        """Layer name -> its (out, in) change: the whole of P z."""
        return {s.name: self.delta_weight(s.name) for s in self.sites}


@register("intrinsic")
@dataclass
class Intrinsic(MethodConfig):
    targets: Any = "all-linear"
    d: int = 1000  # the subspace's dimension: the only trained numbers
    seed: int = 0  # draws P (with each layer's name)

    hosts = LINEAR_LIKE
    site_adapters = False
    model_adapter = True
    trainable_formula = "d in total (theta = theta_0 + P z, P a Fastfood projection regenerated from seed)"

    def validate(self) -> None:
        self.check_positive_int("d")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise PeftlabError(f"Intrinsic seed must be a non-negative integer, got {self.seed!r}")

    def build_model(self, model: nn.Module, initialize: bool = True) -> IntrinsicAdapter:
        sites = sites_for(model, self)
        return IntrinsicAdapter(sites, self.d, self.seed, sites[0].weight.dtype)
