"""P-tuning v2 (Liu et al. 2022, arXiv 2110.07602): deep prompts, trained keys and values at every layer.

    head_l = softmax(q_l [K_p,l ; K_l]^T / sqrt(d)) [V_p,l ; V_l]        K_p,l, V_p,l: (P, kv_dim)

It is prefix tuning without the reparameterisation MLP (the paper finds the MLP's benefit
task-dependent and drops it): the (P, 2 L kv_dim) prefix is the trained parameter, ~ N(0, 1)
at start as in the official code (THUDM/P-tuning-v2, `PrefixEncoder` without
prefix_projection) and `peft` (PrefixTuningConfig(prefix_projection=False)). Everything else
(the cache, the mask, generation, the peft format) is methods/prefix.py's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from torch import Tensor, nn

from ..registry import MethodConfig, register
from .prefix import build_prefix, peft_prefix_export, peft_prefix_import
from .prefixes import VirtualTokens


@register("p_tuning_v2")
@dataclass
class PTuningV2(MethodConfig):
    num_virtual_tokens: int = 20

    site_adapters: ClassVar[bool] = False
    model_adapter: ClassVar[bool] = True
    peft_type: ClassVar[str] = "PREFIX_TUNING"  # peft reads it as prefix tuning without prefix_projection
    trainable_formula: ClassVar[str] = "2 L P kv_dim"

    def validate(self) -> None:
        self.check_positive_int("num_virtual_tokens")

    def build_model(self, model: nn.Module, initialize: bool = True) -> VirtualTokens:
        return build_prefix(model, self, self.num_virtual_tokens, projection=False, mlp_hidden=None)

    def peft_export(self, model: nn.Module, adapters: dict[str, Any],
                    in_place: dict[str, Tensor]) -> tuple[dict[str, Any], dict[str, Tensor]]:
        return peft_prefix_export(model, self, adapters)

    @classmethod
    def peft_import(cls, model: nn.Module, document: dict[str, Any], tensors: dict[str, Tensor],
                    exact_pattern: Callable[[str], str]) -> tuple[MethodConfig, dict[str, dict[str, Tensor]], dict]:
        return peft_prefix_import(model, document, tensors)  # a direct prefix: prefix(projection=False)
