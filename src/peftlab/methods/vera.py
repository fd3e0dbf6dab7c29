"""VeRA: Vector-based Random Matrix Adaptation (Kopiczko, Blankevoort & Asano 2023, arXiv 2310.11454).

    h = W0 x + Λ_b B Λ_d A dropout(x)          W' = W0 + diag(b) B diag(d) A

    A: (r, in), B: (out, r)  frozen random matrices, the same pair for every layer
    d: (r,), b: (out,)       the only trained parameters (r + out per site)

Initialisation (as the paper and `peft`): A, B ~ kaiming-uniform (gain sqrt(2), fan-in mode)
drawn from one torch.Generator seeded with `seed` (peft's `projection_prng_key`): first A of
shape (r, in_max), then B of shape (out_max, r); each layer uses the slices A[:, :in] and
B[:out, :]. d = d_initial (0.1), b = 0, so the output is unchanged at attach.

Frozen bases are never parameters and never saved: every adapter keeps `seed` and
`basis_shape` (out_max, in_max) as small persistent buffers and regenerates A and B from
them on build and after loading. Adapters with equal (seed, shape, r) share one copy of the
bases in memory.

Choice where peft differs in mechanics: peft sizes the shared pair for the largest targeted
layer, which needs every site before any adapter exists. Here `basis_shape` says the size;
with None (the default) each site draws bases of its own shape from the same seed, which is
exactly peft's pair whenever all targeted layers have one shape (e.g. query/value of a BERT),
and shared across every layer of that shape otherwise. Set basis_shape=[out_max, in_max] to
get peft's bases bit for bit on layers of mixed shapes.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from ..core import Adapter
from ..errors import PeftlabError
from ..hosts import LINEAR_LIKE, HostKind
from ..registry import MethodConfig, Site, register

# (method, seed, out_max, in_max, r, ..., "A" | "B") -> a full-size basis; views keep their base alive.
_BASES: "weakref.WeakValueDictionary[tuple, Tensor]" = weakref.WeakValueDictionary()


def cached_pair(key: tuple, make: Callable[[], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """The pair of frozen bases (A, B) for `key`: made once, shared while any adapter holds a view of it."""
    A, B = _BASES.get(key + ("A",)), _BASES.get(key + ("B",))
    if A is None or B is None:
        A, B = make()
        _BASES[key + ("A",)], _BASES[key + ("B",)] = A, B
    return A, B


def _kaiming_uniform(shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    # Kaiming-uniform with gain sqrt(2) over the fan-in (the last dimension of a 2-d shape),
    # drawn from `generator` so the bases depend on the seed alone.
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[-1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def shared_bases(seed: int, out_max: int, in_max: int, r: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The frozen pair for one seed: A (r, in_max), B (out_max, r), drawn in that order."""

    def make() -> tuple[Tensor, Tensor]:
        generator = torch.Generator(device="cpu").manual_seed(seed)
        A = _kaiming_uniform((r, in_max), generator).to(dtype)
        return A, _kaiming_uniform((out_max, r), generator).to(dtype)

    return cached_pair(("vera", seed, out_max, in_max, r, dtype), make)


def keep_seed(adapter: Adapter, seed: int, basis_shape: tuple[int, int]) -> None:
    """Save what an adapter's bases are made from (a few bytes), make them, and remake them after each load.

    The adapter declares `regenerate_bases()`, which reads the `seed` and `basis_shape` buffers.
    """
    adapter.register_buffer("seed", torch.tensor(seed, dtype=torch.int64))
    adapter.register_buffer("basis_shape", torch.tensor(basis_shape, dtype=torch.int64))
    adapter.regenerate_bases()
    adapter.register_load_state_dict_post_hook(lambda module, _keys: module.regenerate_bases())


# VeRA and RandLoRA share the shape rule of their frozen bases: `basis_shape: [out_max, in_max]`
# draws one pair per seed and slices it for every site (peft's layout); None draws per shape.


def check_bases_config(config: MethodConfig) -> None:
    """The fields VeRA and RandLoRA share: r, dropout and basis_shape."""
    config.check_positive_int("r")
    config.check_dropout()
    shape = config.basis_shape
    if shape is not None and (len(shape) != 2 or not all(isinstance(n, int) and n > 0 for n in shape)):
        raise PeftlabError(f"{type(config).__name__} basis_shape must be [out_max, in_max] (positive integers) "
                           f"or None, got {shape!r}")


def basis_shape_at(config: MethodConfig, site: Site) -> tuple[int, int]:
    """(out, in) of the bases a site slices from: the suite-wide basis_shape, else its own shape."""
    if config.basis_shape is None:
        return site.out_features, site.in_features
    return int(config.basis_shape[0]), int(config.basis_shape[1])


def check_fits_basis(config: MethodConfig, site: Site) -> None:
    out_max, in_max = basis_shape_at(config, site)
    if site.out_features > out_max or site.in_features > in_max:
        raise PeftlabError(
            f"{type(config).__name__} basis_shape {[out_max, in_max]} is smaller than {site.name} "
            f"({site.out_features} x {site.in_features}): use basis_shape=None or at least the largest targeted "
            "[out, in]"
        )


class VeRAAdapter(Adapter):
    def __init__(self, kind: HostKind, in_features: int, out_features: int, r: int, seed: int,
                 basis_shape: tuple[int, int], d_initial: float, dropout: float, dtype: torch.dtype):
        super().__init__(kind)
        self.in_features, self.out_features, self.r = in_features, out_features, r
        self.lambda_d = nn.Parameter(torch.full((r,), float(d_initial), dtype=dtype))  # scales A's rows
        self.lambda_b = nn.Parameter(torch.zeros(out_features, dtype=dtype))  # scales B's rows; 0: identity
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        keep_seed(self, seed, basis_shape)

    def regenerate_bases(self) -> None:
        """(Re)build A (r, in) and B (out, r) from the seed buffers: views of the shared pair."""
        out_max, in_max = self.basis_shape.tolist()
        A, B = shared_bases(int(self.seed), out_max, in_max, self.r, self.lambda_d.dtype)
        device = self.lambda_d.device
        self.register_buffer("A", A[:, : self.in_features].to(device), persistent=False)
        self.register_buffer("B", B[: self.out_features].to(device), persistent=False)

    def forward(self, host: nn.Module, x: Tensor, base) -> Tensor:
        h = self.kind.apply_in(host, self.dropout(x), self.A) * self.lambda_d  # (..., r)
        return base(x) + self.kind.apply_out(host, h, self.B) * self.lambda_b  # (..., out)

    def delta_weight(self) -> Tensor:
        return (self.lambda_b[:, None] * self.B) @ (self.lambda_d[:, None] * self.A)  # (out, in)

    def lora_factors(self) -> tuple[Tensor, Tensor]:
        return self.lambda_d[:, None] * self.A, self.lambda_b[:, None] * self.B


@register("vera")
@dataclass
class VeRA(MethodConfig):
    r: int = 256
    d_initial: float = 0.1
    dropout: float = 0.0
    seed: int = 0  # peft's projection_prng_key
    basis_shape: list | None = None  # [out_max, in_max] of the shared bases; None: each site's own shape

    hosts = LINEAR_LIKE
    trainable_formula = "r + out per site (frozen random A, B regenerated from one seed)"

    def validate(self) -> None:
        check_bases_config(self)

    def validate_site(self, site: Site) -> None:
        check_fits_basis(self, site)

    def build(self, site: Site, stats=None, initialize: bool = True) -> VeRAAdapter:
        return VeRAAdapter(site.kind, site.in_features, site.out_features, self.r, self.seed,
                           basis_shape_at(self, site), self.d_initial, self.dropout, site.weight.dtype)
