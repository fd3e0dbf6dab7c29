"""S2FT: structured sparse fine-tuning (Yang et al. 2024, arXiv 2412.06289).

Paper: Xinyu Yang, Jixuan Leng, Geyang Guo, Jiawei Zhao, Ryumei Nakada, Linjun Zhang, Huaxiu
Yao, Beidi Chen, "S2FT: Efficient, Scalable and Generalizable LLM Fine-tuning by Structured
Sparsity", NeurIPS 2024. Official code: Infini-AI-Lab/S2FT (`s2ft/s2.py`).

Chosen attention heads and FFN channels train as dense blocks; everything else is frozen. A
head (or channel) is `unit` consecutive rows of a layer that writes it (value, up, gate) and
the same columns of the layer that reads it (output projection, down):

    rows    (axis "out"):  W' = W0 + P_rows^T Delta      Delta: (k, in)    h = W0 x + scatter_rows(Delta x)
    columns (axis "in"):   W' = W0 + Delta P_cols        Delta: (out, k)   h = W0 x + Delta x[cols]

    k = units chosen x unit rows or columns; P the 0/1 selection. Trained: Delta only, from 0
    (the output is unchanged at attach). Merge adds Delta into the chosen rows or columns.

Selection (static, as the official default): `count` units per site, or `fraction` of the
site's units, drawn uniformly at random. The draw is seeded by `seed`, the site's layer number
and its number of units, so the layers of one block that write and read the same heads or
channels (value and output projection; up, gate and down) pick the same ones. `axis` "auto"
takes columns on layers that read heads or channels back into the hidden state (o_proj,
down_proj, BERT's output.dense, GPT-2's c_proj) and rows elsewhere; set `unit` to the head
size on attention sites (e.g. overrides={"re:.*(v_proj|o_proj)$": {"unit": 64}}).

The change is a product of a 0/1 selection and the block, so it is written to `peft`'s format
as a LoRA of rank k.
"""
from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core import Adapter
from ..errors import PeftlabError
from ..hosts import LINEAR_LIKE, HostKind
from ..registry import MethodConfig, Site, register

AXES = ("auto", "out", "in")
# Layers that read heads or channels back into the hidden state: their columns are selected.
READS_UNITS = re.compile(r"(o_proj|down_proj|output\.dense|c_proj|out_proj|fc2)$")


class S2FTAdapter(Adapter):
    def __init__(self, kind: HostKind, in_features: int, out_features: int, axis: str, selected: int,
                 dtype: torch.dtype):
        super().__init__(kind)
        self.axis, self.in_features, self.out_features = axis, in_features, out_features
        self.register_buffer("index", torch.zeros(selected, dtype=torch.int64))  # chosen rows or columns, (k,)
        shape = (selected, in_features) if axis == "out" else (out_features, selected)
        self.delta = nn.Parameter(torch.zeros(shape, dtype=dtype))  # (k, in) rows or (out, k) columns

    def forward(self, host: nn.Module, x: Tensor, base) -> Tensor:
        if self.axis == "out":
            h = self.kind.apply_in(host, x, self.delta)  # (..., k): the chosen outputs' change
            return base(x).index_add(-1, self.index, h)
        return self.kind.add_out(host, base(x), x.index_select(-1, self.index), self.delta)

    def selection(self) -> Tensor:
        """P: the 0/1 map from the k chosen rows or columns to the layer's, (out, k) or (k, in)."""
        k = self.index.numel()
        picks = torch.arange(k, device=self.index.device)
        if self.axis == "out":
            P = self.delta.new_zeros(self.out_features, k)
            P[self.index, picks] = 1
        else:
            P = self.delta.new_zeros(k, self.in_features)
            P[picks, self.index] = 1
        return P

    def delta_weight(self) -> Tensor:
        A, B = self.lora_factors()
        return B @ A  # (out, in): only the chosen rows or columns are non-zero

    def lora_factors(self) -> tuple[Tensor, Tensor]:
        if self.axis == "out":
            return self.delta, self.selection()  # A = Delta (k, in), B = P (out, k)
        return self.selection(), self.delta  # A = P (k, in), B = Delta (out, k)


@register("s2ft")
@dataclass
class S2FT(MethodConfig):
    fraction: float = 0.1  # share of each site's units trained
    count: int | None = None  # units per site; overrides fraction
    unit: int = 1  # rows or columns per unit: 1 for FFN channels, the head size for attention heads
    axis: str = "auto"  # "out": rows, "in": columns, "auto": by the layer's name (see above)
    seed: int = 0

    hosts = LINEAR_LIKE
    trainable_formula = "units chosen x unit x in (rows) or x out (columns) per site"

    def validate(self) -> None:
        if not isinstance(self.fraction, (int, float)) or not 0 < self.fraction <= 1:
            raise PeftlabError(f"S2FT fraction must be in (0, 1], got {self.fraction!r}")
        self.check_positive_int("count", optional=True)
        self.check_positive_int("unit")
        if self.axis not in AXES:
            raise PeftlabError(f"S2FT axis {self.axis!r} is unknown; choose one of {AXES}")

    def site_axis(self, site: Site) -> str:
        if self.axis != "auto":
            return self.axis
        return "in" if READS_UNITS.search(site.name) else "out"

    def units(self, site: Site) -> int:
        """How many units the site's selected side holds."""
        return (site.out_features if self.site_axis(site) == "out" else site.in_features) // self.unit

    def chosen(self, site: Site) -> int:
        return self.count if self.count is not None else max(1, round(self.fraction * self.units(site)))

    def validate_site(self, site: Site) -> None:
        side = site.out_features if self.site_axis(site) == "out" else site.in_features
        if side % self.unit:
            raise PeftlabError(f"S2FT unit={self.unit} does not divide {site.name}'s {side} "
                               f"{'rows' if self.site_axis(site) == 'out' else 'columns'}: use a divisor of {side} "
                               "(the head size on attention layers, 1 on FFN layers) or an override for this site")
        if self.chosen(site) > self.units(site):
            raise PeftlabError(f"S2FT count={self.count} is more units than {site.name} has ({self.units(site)} of "
                               f"unit {self.unit}): use count <= {self.units(site)} or an override for this site")

    def build(self, site: Site, stats=None, initialize: bool = True) -> S2FTAdapter:
        chosen = self.chosen(site)
        adapter = S2FTAdapter(site.kind, site.in_features, site.out_features, self.site_axis(site),
                              chosen * self.unit, site.weight.dtype)
        if initialize:
            layer = re.search(r"\d+", site.name)
            key = f"{self.seed}/{layer.group() if layer else ''}/{self.units(site)}/{self.unit}"
            generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
            units = torch.randperm(self.units(site), generator=generator)[:chosen].sort().values
            rows = (units[:, None] * self.unit + torch.arange(self.unit)).reshape(-1)  # (chosen * unit,)
            with torch.no_grad():
                adapter.index.copy_(rows)
        return adapter
