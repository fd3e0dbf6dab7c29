"""Attaching what was read: the one path from disk to model that both formats load through.

A format's reader turns a directory into `Plan`s (config, tensors, fingerprint), touching no
model. `install` checks every plan against the model first, then attaches them all; on any
error the model is left exactly as it was.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from torch import Tensor, nn

from .. import core
from ..core import ADAPTERS
from ..errors import PeftlabError
from ..hosts import host_kind
from ..registry import MethodConfig
from ..targets import overrides_for
from .files import DAMAGED


@dataclass
class Plan:
    """One adapter read from disk and converted, ready to attach; the model is not touched yet."""

    name: str
    config: MethodConfig
    tensors: dict[str, Tensor]  # `<site>.adapters.<name>.<key>` -> value, as core.attach(state_dict=) takes
    sites: dict[str, tuple[str | None, tuple[int, ...]]]  # fingerprint: site -> (host kind or None, (out, in))
    source: Path
    also_train: dict[str, Tensor] = field(default_factory=dict)  # parameter name -> value
    initial_from_base: bool = False  # residual init saved by peft: recompute A0, B0 from the base weights

    @property
    def label(self) -> str:
        return f"adapter {self.name!r} in {self.source}"


def pick(available: Iterable[str], name: str | Iterable[str] | None, where: Path) -> list[str]:
    """The adapter names asked for (None: all available); raises on one `where` does not hold."""
    available = list(available)
    if name is None:
        return available
    wanted = [name] if isinstance(name, str) else list(name)
    unknown = [n for n in wanted if n not in available]
    if unknown:
        raise PeftlabError(f"{where} holds no adapter named {unknown[0]!r}; it holds {available}")
    return wanted


def install(model: nn.Module, plans: list[Plan], active: list[str] | None) -> nn.Module:
    """Attach every plan (all checked first) and their also_train values; `active`: the saved active set."""
    for plan in plans:  # every check before the first change
        check_fits(model, plan)
    for plan in plans:
        if plan.initial_from_base:
            plan.tensors.update(_initial_factors(model, plan))
    attached: list[str] = []
    try:
        for plan in plans:
            core.attach(model, plan.config, plan.name, state_dict=plan.tensors)
            attached.append(plan.name)
    except BaseException:
        if attached:
            core.detach(model, attached)  # removes `_peftlab` too when nothing else was attached
        raise
    # attach remembered the base values of also_train parameters (detach restores them); now the saved ones
    params = dict(model.named_parameters())
    with torch.no_grad():
        for plan in plans:
            for key, value in plan.also_train.items():
                params[key].copy_(value)
    if active is not None:
        state = core.state_of(model)
        core.set_active(model, [n for n in state.active if n not in attached or n in active])
    return model


def not_adaptable(label: str, site: str, module: nn.Module | None) -> PeftlabError:
    """The error for a saved site this model has no adaptable layer at."""
    what = "no layer" if module is None else f"a {type(module).__name__}, which peftlab cannot adapt, at"
    return PeftlabError(f"{label} was made for another model: this model has {what} {site!r}. "
                        "Load it onto the base model it was trained on")


def check_fits(model: nn.Module, plan: Plan) -> None:
    """Raise unless `plan` attaches to this model exactly as it was saved."""
    label = plan.label
    if plan.name in core.adapter_configs(model):
        raise PeftlabError(f"{label}: an adapter named {plan.name!r} is attached already; detach it first "
                           f"(peftlab.detach(model, {plan.name!r})) or load the others with name=[...]")
    _check_layers(model, plan)
    try:
        selected = [s.name for s in core.sites_for(model, plan.config)] if plan.config.site_adapters else []
        trained = core.in_place_parameters(model, plan.config)
    except PeftlabError as err:
        raise PeftlabError(f"{label} does not fit this model: {err}") from None
    extra = [s for s in selected if s not in plan.sites]
    if extra:
        raise PeftlabError(f"{label} was made for another model: its targets select {len(extra)} layer(s) here that "
                           f"the saved adapter does not cover, e.g. {extra[0]!r}. Load it onto the base model it was "
                           "trained on")
    unselected = [s for s in plan.sites if s not in selected]
    if unselected:
        raise PeftlabError(f"{label} is inconsistent: it holds layer {unselected[0]!r}, which its own targets do not "
                           f"select; {DAMAGED}")
    _check_in_place_values(model, plan, trained)


def _check_in_place_values(model: nn.Module, plan: Plan, trained: dict[str, nn.Parameter]) -> None:
    """The file's in-place values are those of this model's parameters the config trains, all of the
    model-level adapter's among them (a missing one would silently keep the base value)."""
    label = plan.label
    own = set(trained) - set(core.also_train_parameters(model, list(plan.config.also_train)))
    missing = sorted(own - set(plan.also_train))
    if missing:
        raise PeftlabError(f"{label} lacks the value of {missing[0]!r} ({len(missing)} parameter(s) in all), which "
                           f"method {plan.config.method!r} trains in place on this model: it was made for another "
                           "model. Load it onto the base model it was trained on")
    for key, value in plan.also_train.items():
        if key not in trained:
            raise PeftlabError(f"{label} was made for another model: it holds a value for parameter {key!r}, which "
                               "the adapter does not train on this model. Load it onto the base model it was "
                               "trained on")
        if tuple(trained[key].shape) != tuple(value.shape):
            raise PeftlabError(f"{label} was made for another model: parameter {key!r} has shape "
                               f"{tuple(trained[key].shape)} here, the file holds {tuple(value.shape)}. Load it onto "
                               "the base model it was trained on")


def _check_layers(model: nn.Module, plan: Plan) -> None:
    """Each saved site is a layer of the same kind and (out, in) shape here."""
    modules = dict(model.named_modules())
    for site, (kind, shape) in plan.sites.items():
        module = modules.get(site)
        here = host_kind(module) if module is not None else None
        if here is None:
            raise not_adaptable(plan.label, site, module)
        if kind is not None and here.name != kind:
            raise PeftlabError(f"{plan.label} was made for another model: {site!r} is a {here.name} layer here, the "
                               f"adapter was made for a {kind} layer. Load it onto the base model it was trained on")
        actual = tuple(here.matrix(module).shape)
        if actual != tuple(shape):
            raise PeftlabError(
                f"{plan.label} was made for another model: layer {site!r} is {actual[0]} x {actual[1]} (out x in) "
                f"here, the adapter was made for {shape[0]} x {shape[1]}. Load it onto the base model it was trained on"
            )


def _initial_factors(model: nn.Module, plan: Plan) -> dict[str, Tensor]:
    """The buffers of a residual init (PiSSA's, OLoRA's A0 and B0), computed from this model's base
    weights as attach would."""
    config = plan.config
    factors = {}
    for site in core.sites_for(model, config):
        adapter = config.at_site(overrides_for(site.name, site.host, config.overrides)).build(site, None, True)
        prefix = f"{site.name}.{ADAPTERS}.{plan.name}."
        factors.update({prefix + key: value for key, value in adapter.named_buffers()})
    return factors
