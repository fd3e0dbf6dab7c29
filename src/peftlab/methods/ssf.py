"""SSF: Scaling & Shifting your Features (Lian et al. 2022, arXiv 2210.08823; dongzelian/SSF).

A per-channel affine map after each chosen layer (Eq. 1 of the paper):

    h = gamma * (W x + b) + beta          gamma, beta: (out,)

Trained: gamma and beta, 2 * out per site. Initialisation as the official code
(`init_ssf_scale_shift`): gamma ~ N(1, init_std^2), beta ~ N(0, init_std^2) with init_std =
0.02, so the output changes slightly at attach; init_std=0 starts at the identity.

Weight form (section 3.3, re-parameterisation): the map folds into the layer it follows,

    W' = diag(gamma) W,   b' = gamma * b + beta

so merge rewrites both the weight and the bias (changes_bias) and unmerge restores both
exactly. A layer without a bias has nowhere to put beta: merge refuses it, naming the layer.

Hosts: linear layers (nn.Linear, transformers' Conv1D), e.g. targets="all-linear". The
paper also places SSF after norms; in peftlab, scaling a norm's output is what LN tuning
trains directly (ln_tuning).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core import Adapter
from ..errors import PeftlabError
from ..hosts import LINEAR_LIKE, HostKind
from ..registry import MethodConfig, Site, register


class SSFAdapter(Adapter):
    additive = False  # a rescaling: unmerge restores the kept weights rather than subtracting
    changes_bias = True  # b' = gamma * b + beta

    def __init__(self, kind: HostKind, out_features: int, init_std: float, initialize: bool, dtype: torch.dtype):
        super().__init__(kind)
        self.gamma = nn.Parameter(torch.ones(out_features, dtype=dtype))  # (out,)
        self.beta = nn.Parameter(torch.zeros(out_features, dtype=dtype))  # (out,)
        if initialize and init_std > 0:
            with torch.no_grad():
                nn.init.normal_(self.gamma, mean=1.0, std=init_std)
                nn.init.normal_(self.beta, std=init_std)
        self.identity_at_init = init_std == 0

    def forward(self, host: nn.Module, x: Tensor, base) -> Tensor:
        return base(x) * self.gamma + self.beta  # (..., out)

    def merged_weight(self, weight: Tensor) -> Tensor:
        return self.gamma.to(weight.dtype)[:, None] * weight  # (out, in)

    def merged_bias(self, bias: Tensor) -> Tensor:
        return self.gamma.to(bias.dtype) * bias + self.beta.to(bias.dtype)


@register("ssf")
@dataclass
class SSF(MethodConfig):
    init_std: float = 0.02  # gamma ~ N(1, std^2), beta ~ N(0, std^2); 0: the identity at attach

    hosts = LINEAR_LIKE
    trainable_formula = "2 * out per site"

    def validate(self) -> None:
        if not isinstance(self.init_std, (int, float)) or self.init_std < 0:
            raise PeftlabError(f"SSF init_std must be a number >= 0 (0.02 in the paper), got {self.init_std!r}")

    def build(self, site: Site, stats=None, initialize: bool = True) -> SSFAdapter:
        return SSFAdapter(site.kind, site.out_features, self.init_std, initialize, site.weight.dtype)
