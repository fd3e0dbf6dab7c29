"""MAM adapter (He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning",
arXiv 2110.04366): the unified view's combination, a prefix on attention and a parallel adapter
beside each FFN block.

    head_l = softmax(q_l [K_p,l ; K_l]^T / sqrt(d)) [V_p,l ; V_l]      prefix tuning (methods/prefix.py)
    FFN(x) + s * Up(act(Down(x)))                                     parallel adapter (methods/parallel_adapter.py)

The paper's values are the defaults: a prefix of 30 tokens trained through the
reparameterisation MLP (its width m: encoder_hidden_size, default kv_dim), and a bottleneck of
size 512 beside the FFN with s = 4. The two parts are exactly those methods' adapters (built by
their own functions), held by one model-level adapter under `prefix.*` and `ffn.*`, so MAM
computes what attaching `prefix` and `parallel_adapter` with the same weights computes.

Trained: the prefix's embedding and MLP, and 2 size d + size + d per FFN block. Output changes
at attach (the prefix does; Up starts at 0). No weight form: merge is refused; save(format="peft")
is refused (peft has no MAM).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from ..errors import PeftlabError
from ..model_level import ModelAdapter, ModelHooks
from ..registry import MethodConfig, register
from .bottleneck import check_bottleneck
from .parallel_adapter import FFN_BLOCKS, parallel_ffn
from .prefix import build_prefix


class MAMAdapter(ModelAdapter):
    """The prefix (a VirtualTokens adapter) and the parallel FFN adapter, installed together."""

    identity_at_init = False  # the prefix changes the output from the start

    def __init__(self, prefix: ModelAdapter, ffn: ModelAdapter):
        super().__init__()
        self.prefix = prefix
        self.ffn = ffn

    def install(self, model: nn.Module, hooks: ModelHooks) -> None:
        self.prefix.install(model, hooks)
        self.ffn.install(model, hooks)


@register("mam")
@dataclass
class MAM(MethodConfig):
    targets: Any = field(default_factory=lambda: list(FFN_BLOCKS))  # the FFN blocks of the parallel adapter
    num_virtual_tokens: int = 30
    encoder_hidden_size: int | None = None  # the prefix MLP's width m; None: kv_dim
    size: int = 512  # the parallel adapter's bottleneck width
    scale: float = 4.0
    activation: str = "relu"

    site_adapters: ClassVar[bool] = False
    model_adapter: ClassVar[bool] = True
    trainable_formula: ClassVar[str] = "prefix (P kv_dim + MLP) + 2 size d + size + d per FFN block"

    def validate(self) -> None:
        self.check_positive_int("num_virtual_tokens")
        self.check_positive_int("encoder_hidden_size", optional=True)
        check_bottleneck(self)
        if not self.scale > 0:
            raise PeftlabError(f"MAM scale must be positive, got {self.scale!r}")

    def build_model(self, model: nn.Module, initialize: bool = True) -> MAMAdapter:
        prefix = build_prefix(model, self, self.num_virtual_tokens, True, self.encoder_hidden_size)
        ffn = parallel_ffn(model, self.targets, self.exclude, self.size, self.scale, self.activation, self.method)
        return MAMAdapter(prefix, ffn)
