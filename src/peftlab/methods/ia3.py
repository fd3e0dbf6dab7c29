"""IA3: Infused Adapter by Inhibiting and Amplifying Inner Activations (Liu et al. 2022, arXiv 2205.05638).

Learned vectors rescale activations (Eq. in section 3.3 of the paper):

    keys, values (and any layer not named feedforward):  h = l * (W x + b)      l: (out,)
    feedforward layers (the FFN's second linear):        h = W (l * x) + b      l: (in,)

so scaling the FFN's inner activation is the same as scaling the input of the layer after it.
Trained: one vector l per site (out or in entries). Initialisation: l = 1, so the output is
unchanged at attach.

Weight form (what merge folds into the layer, exactly):

    output scaling:  W' = diag(l) W, b' = l * b      (the bias changes: changes_bias)
    feedforward:     W' = W diag(l), b' = b

Targets are explicit, as in `peft`'s IA3Config: `targets` the layers to adapt and
`feedforward` the patterns among them whose input is scaled (peft's feedforward_modules).
For BERT/MiniLM: targets=["key", "value", "output.dense"], feedforward=["output.dense"]; for
Llama/SmolLM2: targets=["k_proj", "v_proj", "down_proj"], feedforward=["down_proj"].
save(format="peft") writes peft's IA3 files (ia3_l of shape (out, 1), or (1, in) for a
feedforward layer) and load reads them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..core import Adapter, host_bias
from ..errors import PeftlabError
from ..hosts import LINEAR_LIKE, HostKind, host_kind
from ..registry import MethodConfig, Site, register
from ..targets import check_patterns, matches

_PEFT_KEY = "ia3_l"


class IA3Adapter(Adapter):
    additive = False  # a rescaling: unmerge restores the kept weights rather than subtracting

    def __init__(self, kind: HostKind, features: int, feedforward: bool, has_bias: bool, dtype: torch.dtype):
        super().__init__(kind)
        self.feedforward = feedforward
        self.scale = nn.Parameter(torch.ones(features, dtype=dtype))  # (in,) feedforward, else (out,)
        # output scaling multiplies the bias too; a layer without bias has nothing to rescale
        self.changes_bias = has_bias and not feedforward

    def forward(self, host: nn.Module, x: Tensor, base) -> Tensor:
        if self.feedforward:
            return base(x * self.scale.to(x.dtype))  # x: (..., in)
        return base(x) * self.scale  # (..., out)

    def merged_weight(self, weight: Tensor) -> Tensor:
        scale = self.scale.to(weight.dtype)
        return weight * scale[None, :] if self.feedforward else scale[:, None] * weight  # (out, in)

    def merged_bias(self, bias: Tensor) -> Tensor:
        return bias * self.scale.to(bias.dtype)


@register("ia3")
@dataclass
class IA3(MethodConfig):
    feedforward: Any = None  # patterns (among targets) of layers whose input is scaled: peft's feedforward_modules

    hosts = LINEAR_LIKE
    trainable_formula = "out per site (in for feedforward sites)"
    peft_type = "IA3"

    def validate(self) -> None:
        check_patterns("IA3 feedforward", self.feedforward)

    def is_feedforward(self, site: Site) -> bool:
        patterns = [] if self.feedforward is None else (
            [self.feedforward] if isinstance(self.feedforward, str) or callable(self.feedforward)
            else list(self.feedforward))
        return any(matches(p, site.name, site.host) for p in patterns)

    def build(self, site: Site, stats=None, initialize: bool = True) -> IA3Adapter:
        feedforward = self.is_feedforward(site)
        features = site.in_features if feedforward else site.out_features
        return IA3Adapter(site.kind, features, feedforward, host_bias(site.host) is not None, site.weight.dtype)

    # ---- the peft format: base_model.model.<site>.ia3_l, (out, 1) or (1, in) for feedforward ------------

    def peft_export(self, model: nn.Module, adapters: dict[str, Any],
                    in_place: dict[str, Tensor]) -> tuple[dict[str, Any], dict[str, Tensor]]:
        tensors = {f"{site}.{_PEFT_KEY}": a.scale.detach()[None, :] if a.feedforward else a.scale.detach()[:, None]
                   for site, a in adapters.items()}
        return {"target_modules": list(adapters), "feedforward_modules": [s for s, a in adapters.items()
                                                                           if a.feedforward],
                "fan_in_fan_out": any(a.kind.name == "conv1d" for a in adapters.values()),
                "init_ia3_weights": True}, tensors

    @classmethod
    def peft_import(cls, model: nn.Module, document: dict[str, Any], tensors: dict[str, Tensor],
                    exact_pattern: Callable[[str], str]) -> tuple[MethodConfig, dict[str, dict[str, Tensor]],
                                                                  dict[str, Tensor]]:
        modules = dict(model.named_modules())
        per_site: dict[str, dict[str, Tensor]] = {}
        feedforward = []
        for key, value in tensors.items():
            site = key[: -len("." + _PEFT_KEY)] if key.endswith("." + _PEFT_KEY) else None
            kind = host_kind(modules[site]) if site in modules else None
            if kind is None or kind.name not in LINEAR_LIKE:
                raise PeftlabError(f"peft IA3 file holds {key!r}, which is not an {_PEFT_KEY} vector of a linear "
                                   "layer of this model: load it onto the base model it was trained on")
            # peft's layout says which side is scaled: (1, in) scales the input, (out, 1) the output
            feedforward_shape = (1, kind.in_features(modules[site]))
            if tuple(value.shape) not in (feedforward_shape, (kind.out_features(modules[site]), 1)):
                raise PeftlabError(f"peft IA3 file holds {key!r} of shape {tuple(value.shape)}, which fits neither "
                                   f"side of {site} here: load it onto the base model it was trained on")
            if tuple(value.shape) == feedforward_shape and value.shape[1] != 1:
                feedforward.append(site)
            per_site[site] = {"scale": value.reshape(-1)}
        config = cls(targets=[exact_pattern(s) for s in per_site],
                     feedforward=[exact_pattern(s) for s in feedforward])
        return config, per_site, {}
