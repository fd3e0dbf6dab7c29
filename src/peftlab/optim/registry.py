"""Optimizers by name, registered the way methods are: one file each, a config with checked fields.

    opt = peftlab.optimizer("galore", model.parameters(), lr=1e-3, rank=8)
    peftlab.optimizers()    # {name: one-line description}

A registered optimizer is a dataclass subclassing `OptimizerConfig`, decorated with
`@register_optimizer("name")`. Its fields are the optimizer's hyperparameters (`lr` first, shared
by all); `__post_init__` checks their types (numbers finite) and `validate()` their ranges, so a
bad value is refused, naming the field, before any parameter is touched. `build(params)` returns
the torch optimizer. The run config's `optimizer:` section reads the same names
(recipe/config.py), and its fields are these dataclass fields.

Parameter groups may carry `project: False`: the memory-efficient optimizers (GaLore, Fira,
FRUGAL) then treat that group's matrices as plain AdamW would (embeddings, heads). Every other
2-d parameter is projected, and a projection rank a matrix cannot hold is refused when the
optimizer is built (the first moment the parameters are known).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable, ClassVar, Iterable

import torch

from ..errors import PeftlabError


@dataclasses.dataclass
class OptimizerConfig:
    """Fields every optimizer shares; subclasses add their own after `lr`."""

    lr: float = 1e-3

    name: ClassVar[str] = ""  # set by @register_optimizer
    description: ClassVar[str] = ""  # one line for `peftlab optimizers`
    # each step needs a second forward and backward (SAM): the recipe runs it, and refuses
    # gradient accumulation with it
    two_pass: ClassVar[bool] = False

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_type(f"optimizer {self.name!r} field {f.name}", getattr(self, f.name), str(f.type))
        self.check_positive("lr")
        self.validate()

    def validate(self) -> None:
        """Field ranges; raise PeftlabError naming the field, the value and what is allowed."""

    def build(self, params: Iterable) -> torch.optim.Optimizer:
        """The torch optimizer over `params`; every registered optimizer defines it."""
        raise NotImplementedError(f"{type(self).__name__} must define build(params)")

    def kwargs(self) -> dict[str, Any]:
        """The fields as keyword arguments (lists made tuples, as torch's betas are)."""
        return {f.name: tuple(v) if isinstance(v := getattr(self, f.name), list) else v
                for f in dataclasses.fields(self)}

    # checks several optimizers share; errors name the optimizer, the field and the value

    def _fail(self, field: str, wanted: str) -> None:
        raise PeftlabError(f"optimizer {self.name!r} field {field} = {getattr(self, field)!r} must be {wanted}")

    def check_positive(self, *fields: str, allow_zero: bool = False) -> None:
        for field in fields:
            value = getattr(self, field)
            if value < 0 or (value == 0 and not allow_zero):
                self._fail(field, ">= 0" if allow_zero else "> 0")

    def check_betas(self, field: str = "betas") -> None:
        betas = getattr(self, field)
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            self._fail(field, "two numbers in [0, 1), e.g. [0.9, 0.999]")

    def check_choice(self, field: str, allowed: tuple[str, ...]) -> None:
        if getattr(self, field) not in allowed:
            self._fail(field, f"one of {', '.join(allowed)}")


_DECLARED = {"int": (numbers.Integral,), "float": (numbers.Real,), "str": (str,), "bool": (bool,),
             "tuple": (list, tuple), "dict": (dict,)}
_NAMES = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
          "tuple": "a list", "dict": "a mapping", "None": "empty (null)"}


def _check_type(where: str, value: Any, annotation: str) -> None:
    """`value` fits its declared type ('float | None', 'tuple', ...) and holds no nan or infinity."""
    options = [o.strip() for o in annotation.split("|")]
    fits = (value is None and "None" in options) or any(
        isinstance(value, _DECLARED.get(o, ())) and not (isinstance(value, bool) and o != "bool") for o in options)
    if not fits:
        raise PeftlabError(f"{where} = {value!r} has the wrong type: give {' or '.join(_NAMES[o] for o in options)}")
    items = value if isinstance(value, (list, tuple)) else [value]
    for item in items:
        if isinstance(item, float) and not math.isfinite(item):
            raise PeftlabError(f"{where} = {value!r} is not finite: give finite numbers")
        if isinstance(value, (list, tuple)) and item is not None and not isinstance(item, numbers.Real):
            raise PeftlabError(f"{where} = {value!r} must hold numbers")


_OPTIMIZERS: dict[str, type[OptimizerConfig]] = {}


def register_optimizer(name: str) -> Callable[[type], type]:
    """Class decorator: make an OptimizerConfig dataclass available as `name`."""

    def decorate(cls: type) -> type:
        if name in _OPTIMIZERS:
            raise RuntimeError(f"optimizer name {name!r} is registered twice")
        cls.name = name
        _OPTIMIZERS[name] = cls
        return cls

    return decorate


def _load_builtin() -> None:
    from . import adam_atan2, builtin, fira, frugal, galore, sam  # noqa: F401  (registers each file)


def optimizers() -> dict[str, str]:
    """Every registered optimizer name and its one-line description, sorted by name."""
    _load_builtin()
    return {name: _OPTIMIZERS[name].description for name in sorted(_OPTIMIZERS)}


def optimizer_config_class(name: str) -> type[OptimizerConfig]:
    _load_builtin()
    if name not in _OPTIMIZERS:
        raise PeftlabError(f"unknown optimizer {name!r}; registered optimizers: {', '.join(sorted(_OPTIMIZERS))}")
    return _OPTIMIZERS[name]


def optimizer_config(name: str, **fields: Any) -> OptimizerConfig:
    """The checked config of a registered optimizer; unknown fields are refused with the allowed ones."""
    cls = optimizer_config_class(name)
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(fields) - set(allowed))
    if unknown:
        raise PeftlabError(f"optimizer {name!r}: unknown field(s) {unknown}; allowed: {', '.join(allowed)}")
    return cls(**fields)


def optimizer(name: str, params: Iterable, **fields: Any) -> torch.optim.Optimizer:
    """A torch optimizer by registry name over `params` (tensors or parameter-group dicts)."""
    return optimizer_config(name, **fields).build(params)


# ---- helpers the projecting optimizers share ----------------------------------------------------


def is_projected(p: torch.Tensor, group: dict) -> bool:
    """A 2-d parameter in a group that does not say `project: False`."""
    return p.dim() == 2 and group.get("project", True)


def check_ranks(opt: torch.optim.Optimizer, rank_of: Callable[[dict], int], who: str, field: str = "rank") -> None:
    """Every projected matrix can hold the group's rank; the error names the parameter's shape and place."""
    for g, group in enumerate(opt.param_groups):
        for i, p in enumerate(group["params"]):
            if is_projected(p, group) and rank_of(group) > min(p.shape):
                raise PeftlabError(
                    f"{who} {field} {rank_of(group)} is larger than a {tuple(p.shape)} parameter allows (parameter "
                    f"{i} of group {g}): use optimizer.{field} <= {min(p.shape)}, or put it in a group with "
                    "project: False (method full-galore/full-fira/full-frugal projects only the linear layers' "
                    "weights)")
