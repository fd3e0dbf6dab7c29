"""Prefix tuning (Li & Liang 2021, arXiv 2101.00190): P trained keys and values in front of every
attention layer's own.

    head_l = softmax(q_l [K_p,l ; K_l]^T / sqrt(d)) [V_p,l ; V_l]        K_p,l, V_p,l: (P, kv_dim)

    reparameterised (projection=True, the paper's training form):
        [K_p,1 V_p,1 ... K_p,L V_p,L] = MLP(E_p)       E_p: (P, kv_dim),  MLP: kv_dim -> m -> 2 L kv_dim (tanh)
    direct (projection=False): the (P, 2 L kv_dim) matrix is the parameter itself

kv_dim = kv_heads x head_dim (the hidden size without grouped-query attention). The prefix goes
into the base model's key/value cache before its first layer runs, with attention_mask
extended by P ones (methods/prefixes.py), as `peft` does; `generate` works with the cache.

Trained: E_p and the MLP (projection=True), or the prefix itself. The MLP is a training aid:
the prefix it gives is what the model uses, and what save(format="peft") writes (peft's
PREFIX_TUNING `prompt_embeddings`, (P, 2 L kv_dim)), which reloads as a direct prefix.
Initialisation as `peft`: E_p (or the direct prefix) ~ N(0, 1), the MLP nn.Linear's default;
m (encoder_hidden_size) defaults to kv_dim. No weight form: merge is refused.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from torch import Tensor, nn

from ..registry import MethodConfig, register
from .prefixes import VirtualTokens, check_no_other, check_positions, find_layout, peft_keys, peft_virtual_tokens


class PrefixEncoder(nn.Module):
    """forward() gives the prefix (P, 2 * layers * kv_dim) in peft's layout (see methods/prefixes.py)."""

    def __init__(self, tokens: int, kv_dim: int, layers: int, mlp_hidden: int | None):
        super().__init__()
        width = 2 * layers * kv_dim
        # peft's names (embedding, transform.0, transform.2), so weights map one to one
        self.embedding = nn.Embedding(tokens, kv_dim if mlp_hidden else width)
        self.transform = None if mlp_hidden is None else nn.Sequential(
            nn.Linear(kv_dim, mlp_hidden), nn.Tanh(), nn.Linear(mlp_hidden, width))

    def forward(self) -> Tensor:
        prefix = self.embedding.weight
        return prefix if self.transform is None else self.transform(prefix)


def build_prefix(model: nn.Module, config: MethodConfig, tokens: int, projection: bool,
                 mlp_hidden: int | None) -> VirtualTokens:
    """The prefix adapter for `model` (every check first; the model is not touched)."""
    owner = type(config).__name__
    layout = find_layout(model, config.method, needs_cache=True)
    check_positions(layout, tokens, owner)
    check_no_other(model, owner)
    width = (mlp_hidden or layout.kv_dim) if projection else None
    encoder = PrefixEncoder(tokens, layout.kv_dim, layout.layers, width)
    return VirtualTokens(layout, encoder.to(layout.embedding.weight.device), tokens, "prefix")


def peft_prefix_export(model: nn.Module, config: MethodConfig, adapters: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """peft's PREFIX_TUNING form: the prefix (P, 2 L kv_dim) itself, as a direct prefix (no MLP)."""
    prefix: VirtualTokens = adapters[""]
    layout = prefix.layout
    keys = {**peft_keys(model, config, prefix, layout.kv_dim, layout.kv_heads), "encoder_hidden_size": layout.kv_dim,
            "prefix_projection": False, "init_weights": None}
    return keys, {"prompt_embeddings": prefix.encoder().detach().float()}


def peft_prefix_import(model: nn.Module, document: dict[str, Any], tensors: dict[str, Tensor]
                       ) -> tuple[MethodConfig, dict[str, dict[str, Tensor]], dict]:
    """A peft PREFIX_TUNING file (with or without its MLP at training: the file holds the prefix) as a direct prefix."""
    prefix = peft_virtual_tokens(document, tensors, "2 x layers x kv_dim")
    config = PrefixTuning(num_virtual_tokens=prefix.shape[0], projection=False)
    return config, {"": {"encoder.embedding.weight": prefix}}, {}


@register("prefix")
@dataclass
class PrefixTuning(MethodConfig):
    num_virtual_tokens: int = 20
    projection: bool = True  # train through the MLP (peft's prefix_projection)
    encoder_hidden_size: int | None = None  # the MLP's width m; None: kv_dim

    site_adapters: ClassVar[bool] = False
    model_adapter: ClassVar[bool] = True
    peft_type: ClassVar[str] = "PREFIX_TUNING"
    trainable_formula: ClassVar[str] = "P x kv_dim + MLP (kv_dim m + 2 L kv_dim m); projection=False: 2 L P kv_dim"

    def validate(self) -> None:
        self.check_positive_int("num_virtual_tokens")
        self.check_positive_int("encoder_hidden_size", optional=True)

    def build_model(self, model: nn.Module, initialize: bool = True) -> VirtualTokens:
        return build_prefix(model, self, self.num_virtual_tokens, self.projection, self.encoder_hidden_size)

    def peft_export(self, model: nn.Module, adapters: dict[str, Any],
                    in_place: dict[str, Tensor]) -> tuple[dict[str, Any], dict[str, Tensor]]:
        return peft_prefix_export(model, self, adapters)

    @classmethod
    def peft_import(cls, model: nn.Module, document: dict[str, Any], tensors: dict[str, Tensor],
                    exact_pattern: Callable[[str], str]) -> tuple[MethodConfig, dict[str, dict[str, Tensor]], dict]:
        return peft_prefix_import(model, document, tensors)
