"""NOLA: LoRA factors as trained mixtures of frozen random bases regenerated from a seed.

Koohpayegani, Navaneet, Nooralinejad, Kolouri & Pirsiavash 2023, arXiv 2310.02556; official
code UCDvision/NOLA.

    h = W0 x + s * B A dropout(x)           s = alpha / r
    A = A0 + sum_{i<k} a_i A_i              A0, A_i: (r, in)   frozen
    B =      sum_{j<k} b_j B_j              B_j:     (out, r)  frozen      (B0 = 0)

Trained: only the coefficient vectors a and b (k each): 2k parameters per site, whatever the
rank or the layer size. a = b = 0 at init, so B = 0 and the output is unchanged.

Bases, as in the official code (`gpt/src/model_nola.py`): A_i, B_j ~ U(-1, 1) / sqrt(k);
A0 ~ kaiming-uniform(a=sqrt(5)) (the official A0 is a frozen nn.Linear weight, which it saves;
here it is regenerated like the bases). All of them come from a per-site seed and are never
saved: the adapter stores only that seed, as a persistent int64 buffer, and rebuilds A0 and
the bases from it after loading. The per-site seed is derived from the config's `seed` and
the site's name (crc32), so runs are reproducible; three independent generator streams
(A0, A-bases, B-bases) are derived from it.

Memory: with `bases_in_memory=True` (default) the bases are built once and kept as
non-saved buffers (2 k r (in + out) numbers per site: fast steps). With False they are
regenerated in every forward and again in backward and never kept, as the official code does
(one site's bases exist at a time; slower steps).

Defaults: k = 256, r = 8 (the official GPT-2 E2E script: k = 256, r = 8, alpha = 2, lr 1e-2;
LLaMA-2: k = 512, r = 16, alpha = 4). alpha = 16 here, LoRA's default scale s = 2, since
NOLA's coefficients start at 0 and learn at the learning rate given. Embedding hosts are not
offered: their bases would scale with the vocabulary.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from ..core import Adapter
from ..errors import PeftlabError
from ..hosts import HostKind
from ..registry import MethodConfig, Site, register


def stream_seed(seed: int, stream: str) -> int:
    """A 32-bit seed for one named random stream, derived deterministically (not Python's salted hash)."""
    return zlib.crc32(f"{seed}/{stream}".encode())


def uniform_bases(seed: int, k: int, shape: tuple[int, int]) -> Tensor:
    """k bases of `shape`, entries U(-1, 1) / sqrt(k): (k, *shape), float32 on the CPU."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return (torch.rand((k, *shape), generator=generator) * 2 - 1) / math.sqrt(k)


def initial_a(seed: int, r: int, in_features: int) -> Tensor:
    """A0 (r, in): kaiming-uniform(a=sqrt(5)), i.e. U(-1/sqrt(in), 1/sqrt(in))."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return nn.init.kaiming_uniform_(torch.empty(r, in_features), a=math.sqrt(5), generator=generator)


class _CombineRegenerated(torch.autograd.Function):
    """sum_i c_i * basis_i with the bases rebuilt in backward instead of saved for it."""

    @staticmethod
    def forward(ctx, coefficients: Tensor, make_bases: Callable[[], Tensor]) -> Tensor:
        ctx.make_bases = make_bases
        return torch.einsum("k,k...->...", coefficients, make_bases())

    @staticmethod
    def backward(ctx, grad: Tensor):
        return torch.einsum("k...,...->k", ctx.make_bases(), grad), None


class NOLAAdapter(Adapter):
    def __init__(self, kind: HostKind, in_features: int, out_features: int, r: int, num_basis: int, scale: float,
                 seed: int, dropout: float, bases_in_memory: bool, dtype: torch.dtype):
        super().__init__(kind)
        self.in_features, self.out_features, self.r, self.num_basis = in_features, out_features, r, num_basis
        self.scale, self.bases_in_memory = scale, bases_in_memory
        self.coef_a = nn.Parameter(torch.zeros(num_basis, dtype=dtype))  # mixes the A bases
        self.coef_b = nn.Parameter(torch.zeros(num_basis, dtype=dtype))  # mixes the B bases; 0: identity
        self.dropout = nn.Dropout(dropout) if dropout > 0 and not kind.index_input else nn.Identity()
        self.register_buffer("seed", torch.tensor(seed, dtype=torch.int64))  # all that is saved besides a, b
        self.regenerate()
        self.register_load_state_dict_post_hook(lambda module, _keys: module.regenerate())

    # ---- the frozen random tensors, all from self.seed ----------------------------------------

    def _make(self, which: str) -> Tensor:
        seed, dtype, device = int(self.seed), self.coef_a.dtype, self.coef_a.device
        if which == "A0":
            t = initial_a(stream_seed(seed, "A0"), self.r, self.in_features)
        elif which == "bases_a":
            t = uniform_bases(stream_seed(seed, "A"), self.num_basis, (self.r, self.in_features))
        else:
            t = uniform_bases(stream_seed(seed, "B"), self.num_basis, (self.out_features, self.r))
        return t.to(device=device, dtype=dtype)

    def regenerate(self) -> None:
        self.register_buffer("A0", self._make("A0"), persistent=False)  # (r, in)
        if self.bases_in_memory:
            self.register_buffer("bases_a", self._make("bases_a"), persistent=False)  # (k, r, in)
            self.register_buffer("bases_b", self._make("bases_b"), persistent=False)  # (k, out, r)

    def factors(self) -> tuple[Tensor, Tensor]:
        """A (r, in) and B (out, r) from the current coefficients."""
        if self.bases_in_memory:
            A = self.A0 + torch.einsum("k,kri->ri", self.coef_a, self.bases_a)
            B = torch.einsum("k,kor->or", self.coef_b, self.bases_b)
        else:
            A = self.A0 + _CombineRegenerated.apply(self.coef_a, lambda: self._make("bases_a"))
            B = _CombineRegenerated.apply(self.coef_b, lambda: self._make("bases_b"))
        return A, B

    def forward(self, host: nn.Module, x: Tensor, base) -> Tensor:
        A, B = self.factors()
        h = self.kind.apply_in(host, self.dropout(x), A)  # (..., r); (N, r, H, W) for conv
        return base(x) + self.kind.apply_out(host, h, B) * self.scale

    def delta_weight(self) -> Tensor:
        A, B = self.factors()
        return self.scale * (B @ A)  # (out, in)

    def lora_factors(self) -> tuple[Tensor, Tensor]:
        A, B = self.factors()
        return A, self.scale * B


@register("nola")
@dataclass
class NOLA(MethodConfig):
    r: int = 8
    num_basis: int = 256  # k: bases per factor
    alpha: float = 16.0
    dropout: float = 0.0
    seed: int = 0  # per-site seeds are derived from this and the site name
    bases_in_memory: bool = True

    hosts = ("linear", "conv1d", "conv2d")
    trainable_formula = "2 * num_basis per site (independent of r and of the layer's size)"

    def validate(self) -> None:
        self.check_positive_int("r", "num_basis")
        self.check_dropout()

    def validate_site(self, site: Site) -> None:
        site.check_rank(self.r, "NOLA")

    def build(self, site: Site, stats=None, initialize: bool = True) -> NOLAAdapter:
        site_seed = stream_seed(self.seed, site.name)
        return NOLAAdapter(site.kind, site.in_features, site.out_features, self.r, self.num_basis, self.alpha / self.r,
                           site_seed, self.dropout, self.bases_in_memory, site.weight.dtype)
