"""Site selection: which modules of a model an adapter attaches to.

A pure function of (module names and types, patterns): no state, no model mutation.

A pattern is one of
    "query"                 a name: the module's full dotted name, or its last components
                            ("attention.self.query" matches "encoder.layer.0.attention.self.query")
    "layer.*.query"         a glob (fnmatch over the full dotted name) when it holds * ? or [
    "re:.*\\.(query|value)$" a regular expression (re.fullmatch over the full name)
    "all-linear"            every linear-like layer (Linear, Conv1D) except the model's output head
    a callable              f(name, module) -> bool

`exclude` takes the same forms and wins over `targets`. `overrides` maps a pattern to field
values that apply at matching sites (the first matching pattern wins), e.g. {"value": {"r": 16}}.
"""
from __future__ import annotations

import fnmatch
import re
from typing import Any, Callable, Iterable, Union

from torch import nn

from .errors import PeftlabError
from .hosts import host_kind

Pattern = Union[str, Callable[[str, nn.Module], bool]]

# Output heads that "all-linear" leaves alone: they map hidden states to labels or tokens.
_HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs", "cls", "pooler")


def matches(pattern: Pattern, name: str, module: nn.Module) -> bool:
    if callable(pattern):
        return bool(pattern(name, module))
    if pattern == "all-linear":
        kind = host_kind(module)
        return kind is not None and kind.name in ("linear", "conv1d") and not any(
            part in _HEAD_NAMES for part in name.split(".")
        )
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    if any(ch in pattern for ch in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern or name.endswith("." + pattern)


PATTERN_FORMS = "a name, a glob, a 're:' regular expression, 'all-linear' or a callable f(name, module)"


def check_patterns(where: str, patterns: Any) -> None:
    """Refuse what `select` cannot read, naming `where` (e.g. "LoRA targets"): None, one pattern,
    or a flat list of them; a nested list, a number or a broken regular expression are mistakes."""
    if patterns is None or isinstance(patterns, str) or callable(patterns):
        items = [] if patterns is None else [patterns]
    elif isinstance(patterns, (list, tuple, set, frozenset)):
        items = list(patterns)
    else:
        raise PeftlabError(f"{where} = {patterns!r} must be a pattern or a list of patterns (each {PATTERN_FORMS}), "
                           "e.g. ['query', 'value']")
    for item in items:
        if callable(item):
            continue
        if not isinstance(item, str) or not item:
            raise PeftlabError(f"{where} = {patterns!r} holds {item!r}, which is not a pattern: each item is "
                               f"{PATTERN_FORMS}, e.g. ['query', 'value']")
        if item.startswith("re:"):
            try:
                re.compile(item[3:])
            except re.error as err:
                raise PeftlabError(f"{where}: {item!r} is not a valid regular expression ({err}): "
                                   "fix it, or use a name or a glob") from None


def _as_list(patterns: Pattern | Iterable[Pattern] | None) -> list[Pattern]:
    if patterns is None:
        return []
    if isinstance(patterns, str) or callable(patterns):
        return [patterns]
    return list(patterns)


def adaptable_names(model: nn.Module) -> list[str]:
    """Names of every module whose weight peftlab can adapt, in model order."""
    return [name for name, module in model.named_modules() if name and host_kind(module) is not None]


def _examples(model: nn.Module, limit: int = 12) -> str:
    """What a user can target: distinct last name components, each with one full name."""
    first: dict[str, str] = {}
    for name in adaptable_names(model):
        first.setdefault(name.rsplit(".", 1)[-1], name)
    shown = list(first.items())[:limit]
    more = " ..." if len(first) > limit else ""
    return ", ".join(f"{short} (e.g. {full})" for short, full in shown) + more


def select(model: nn.Module, targets, exclude=None) -> list[str]:
    """Dotted names of the modules matched by `targets` and not by `exclude`, in model order.

    Raises PeftlabError when nothing matches, listing what the model has.
    """
    check_patterns("targets", targets)
    check_patterns("exclude", exclude)
    include, skip = _as_list(targets), _as_list(exclude)
    if not include:
        raise PeftlabError("no targets given: set targets, e.g. targets=['query', 'value'] or 'all-linear'")
    chosen = []
    for name, module in model.named_modules():
        if not name or not any(matches(p, name, module) for p in include):
            continue
        if any(matches(p, name, module) for p in skip):
            continue
        chosen.append(name)
    if not chosen:
        raise PeftlabError(
            f"targets {include!r} matched no module (exclude={skip!r}). "
            f"Layers this model has: {_examples(model)}"
        )
    return chosen


def overrides_for(name: str, module: nn.Module, overrides: dict[str, dict[str, Any]] | None) -> dict[str, Any]:
    """Field values that apply at site `name`: those of the first matching pattern, else {}."""
    for pattern, fields in (overrides or {}).items():
        if matches(pattern, name, module):
            return dict(fields)
    return {}
