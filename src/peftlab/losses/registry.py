"""Classification losses by name: the config base class, the registry and the one call they share.

A loss is a dataclass named after it (`GCE`, `LDRKL`, ...) that subclasses `LossConfig` and is
decorated with `@register_loss("gce")`. Its fields are the loss's hyperparameters, checked when
the config is made; its instance is the loss itself:

    fn = peftlab.loss("gce", q=0.7)
    value = fn(logits, labels)                      # logits (n, K), labels (n,) -> a scalar
    value = fn(logits, labels, example_ids=ids)     # a batch's extra fields go by keyword

A loss writes one method, `per_example(logits, labels, **batch) -> (n,)`, for rows that all
carry a label; `__call__` leaves out the rows labelled `ignore_index` (prompt and padding
tokens) and reduces ("mean", "sum", or "none": one value per row, 0 where ignored, as
torch.nn.functional's losses do). Declared capabilities:

    needs_example_ids   the loss keeps per-example state (ALDR-KL's lambdas) and reads
                        `example_ids` (n,) from the batch while training
    formula             one line for `peftlab losses`
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor

from ..errors import PeftlabError

IGNORE_INDEX = -100  # torch's default: rows with this label carry no loss
REDUCTIONS = ("mean", "sum", "none")

# Declared field types (the annotations are strings) -> what a value may be; bool is not a number.
_KINDS = {"float": (numbers.Real, "a number"), "int": (numbers.Integral, "an integer"), "bool": (bool, "true or false")}


@dataclasses.dataclass
class LossConfig:
    """A loss's hyperparameters; subclasses add fields and write `per_example` (and `validate`)."""

    name: ClassVar[str] = ""  # the registry name, set by @register_loss
    needs_example_ids: ClassVar[bool] = False
    formula: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.check_types()
        self.validate()

    def check_types(self) -> None:
        """Every field holds a finite value of its declared type (a number for a float, ...)."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind, wanted = _KINDS[str(f.type)]
            if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
                raise PeftlabError(f"loss {self.name} {f.name} = {value!r} must be {wanted}")
            if isinstance(value, float) and not math.isfinite(value):
                raise PeftlabError(f"loss {self.name} {f.name} = {value!r} must be a finite number")

    def validate(self) -> None:
        """Ranges of the fields; raise PeftlabError naming the field, the value and what is allowed."""

    def check_range(self, field: str, low: float, high: float, *, low_open: bool = False,
                    high_open: bool = False) -> None:
        """`field` lies in [low, high]; an open end excludes its bound (inf: no bound)."""
        value = getattr(self, field)
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if not (above and below):
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            raise PeftlabError(f"loss {self.name} {field} = {value!r} must be in {interval}")

    def per_example(self, logits: Tensor, labels: Tensor, **batch: Any) -> Tensor:
        """(n,) losses of n labelled rows: logits (n, K), labels (n,) in [0, K); every registered loss defines it."""
        raise NotImplementedError(f"{type(self).__name__} must define per_example(logits, labels)")

    def __call__(self, logits: Tensor, labels: Tensor, *, reduction: str = "mean",
                 ignore_index: int = IGNORE_INDEX, **batch: Any) -> Tensor:
        if reduction not in REDUCTIONS:
            raise PeftlabError(f"loss {self.name}: reduction = {reduction!r} is unknown; allowed: {', '.join(REDUCTIONS)}")
        if logits.dim() != 2 or labels.shape != logits.shape[:1]:
            raise PeftlabError(f"loss {self.name} takes logits (n, classes) and labels (n,), got "
                               f"{tuple(logits.shape)} and {tuple(labels.shape)}: flatten the token axis first")
        kept = labels != ignore_index  # (n,)
        rows = {key: value[kept] if isinstance(value, Tensor) and value.shape[:1] == labels.shape else value
                for key, value in batch.items()}  # per-row fields (example ids) follow their rows
        values = self.per_example(logits[kept], labels[kept], **rows)
        if reduction == "none":
            return torch.zeros(labels.shape, dtype=values.dtype, device=values.device).masked_scatter(kept, values)
        total = values.sum()
        return total if reduction == "sum" else total / kept.sum().clamp(min=1)


_LOSSES: dict[str, type[LossConfig]] = {}


def register_loss(name: str) -> Callable[[type], type]:
    """Class decorator: make a loss config dataclass available as `name`."""

    def decorate(cls: type) -> type:
        if name in _LOSSES:
            raise RuntimeError(f"loss name {name!r} is registered twice")
        for f in dataclasses.fields(cls):
            if str(f.type) not in _KINDS:
                raise RuntimeError(f"{cls.__name__}.{f.name}: declare float, int or bool, not {f.type}")
        cls.name = name
        _LOSSES[name] = cls
        return cls

    return decorate


def losses() -> list[str]:
    """Every registered loss name, in registration order."""
    return list(_LOSSES)


def loss_class(name: str) -> type[LossConfig]:
    if name not in _LOSSES:
        raise PeftlabError(f"unknown loss {name!r}; registered losses: {', '.join(_LOSSES)}")
    return _LOSSES[name]


def loss(name: str, **fields: Any) -> LossConfig:
    """The loss `name` with its fields: a callable (logits, labels, **batch) -> scalar."""
    cls = loss_class(name)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise PeftlabError(f"unknown field(s) {unknown} for loss {name!r}; it takes: {', '.join(known) or 'none'}")
    return cls(**fields)


# ---- pieces several losses share ------------------------------------------------------------------


def true_class(values: Tensor, labels: Tensor) -> Tensor:
    """values[i, labels[i]]: (n, K), (n,) -> (n,)."""
    return values.gather(1, labels[:, None]).squeeze(1)


def rce(logits: Tensor, labels: Tensor, log_zero: float) -> Tensor:
    """Reverse cross entropy (Wang et al. 2019): -sum_k p_k log q_k with q the one-hot label and
    log 0 taken as `log_zero`, which is -log_zero * (1 - p_y). (n,)"""
    return -log_zero * (1 - true_class(torch.softmax(logits, dim=1), labels))
