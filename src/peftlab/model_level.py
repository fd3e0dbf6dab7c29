"""Model-level adapters: a method's change of the whole model rather than of one host layer.

Site adapters (core.Adapter) sit beside one host layer and change its output. Some methods
act elsewhere:

    on the model's inputs or attention   prompt and prefix tuning: extra tokens, a longer
                                         attention mask, keys and values per layer
    on parameters the model already has  BitFit (biases), LN tuning (norm parameters), HFT and
                                         LISA (whole blocks, re-chosen during training)

A `ModelAdapter` covers both with two members, either of which may be empty:

    its own parameters and buffers   registered in the model at `adapters.<name>.*` (a
                                     ModuleDict at the root), so model.parameters(), the
                                     optimizer, the Trainer and state_dict() see them
    in_place                         {parameter name: the model's own nn.Parameter} it trains
                                     where it is; the core snapshots their values at attach,
                                     marks them trainable, puts the snapshot back on detach (and
                                     inside disabled()), and save writes only them

`install(model, hooks)` registers forward hooks through `hooks` (a `ModelHooks`), which runs
each one only while the adapter is on (active, not disabled) and removes every one on detach,
so detach undoes install exactly. A hook may be on the model itself (a pre-hook with kwargs
sees input_ids, attention_mask, past_key_values, ... and may return new ones) or on any
submodule (the input embedding, an attention layer).

A method declares `model_adapter = True` on its config and returns one from
`build_model(model, initialize)`; `site_adapters = False` when it has no per-site part.
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar

from torch import nn
from torch.utils.hooks import RemovableHandle

MODEL = ""  # the model's own name in named_modules(): a model-level adapter's key in adapter views
ROOT = "adapters"  # the model's child that holds model-level adapters: keys `adapters.<name>.<param>`

PreHook = Callable[[nn.Module, tuple, dict], "tuple[tuple, dict] | None"]
PostHook = Callable[[nn.Module, tuple, dict, Any], Any]


class ModelAdapter(nn.Module):
    """One method's change of the whole model. Methods subclass this and declare what they can do.

    in_place                 the model's own parameters this adapter trains where they are
    install(model, hooks)    register forward hooks (through `hooks`); may also set the initial
                             requires_grad of `in_place` parameters (LISA starts with a few blocks)
    weight_form              True only when the whole change lives in the model's own weights
                             (in_place, no hooks): merge then has nothing to fold and leaves it be
    """

    weight_form: ClassVar[bool] = False
    identity_at_init: ClassVar[bool] = True  # output unchanged right after attach
    # what the site-adapter protocol also asks of every adapter in a view (contract, io)
    additive: ClassVar[bool] = False
    has_residual: ClassVar[bool] = False

    def __init__(self, in_place: dict[str, nn.Parameter] | None = None):
        super().__init__()
        self.in_place = dict(in_place or {})  # a plain dict: the model owns these, not the adapter

    def install(self, model: nn.Module, hooks: "ModelHooks") -> None:
        """Register the adapter's forward hooks; the default has none (in-place methods)."""

    def lora_factors(self) -> None:
        return None


class InPlace(ModelAdapter):
    """A model-level adapter that only trains parameters the model already has (BitFit, LN tuning,
    HFT, LISA): its whole change lives in the model's weights, so merge has nothing to fold."""

    weight_form = True


def module_parameters(model: nn.Module, modules: list[str],
                      keep: Callable[[str, nn.Parameter], bool] = lambda name, p: True) -> dict[str, nn.Parameter]:
    """Canonical name -> parameter for the own (not nested) parameters of `modules` that `keep(local
    name, parameter)` accepts; a weight tied to another name is listed once, under its first name."""
    canonical = {id(p): n for n, p in model.named_parameters()}
    found: dict[str, nn.Parameter] = {}
    for module_name in modules:
        for local, p in model.get_submodule(module_name).named_parameters(recurse=False):
            if keep(local, p):
                found[canonical[id(p)]] = p
    return found


class ModelHooks:
    """The forward hooks of one model-level adapter: each runs only while `is_on()`; `remove` takes all off."""

    def __init__(self, is_on: Callable[[], bool]):
        self._is_on = is_on
        self.handles: list[RemovableHandle] = []

    def before(self, module: nn.Module, fn: PreHook) -> None:
        """fn(module, args, kwargs) -> None (unchanged) or (args, kwargs), before module.forward."""

        def hook(m: nn.Module, args: tuple, kwargs: dict):
            return fn(m, args, kwargs) if self._is_on() else None

        self.handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def after(self, module: nn.Module, fn: PostHook) -> None:
        """fn(module, args, kwargs, output) -> None (unchanged) or a new output, after module.forward."""

        def hook(m: nn.Module, args: tuple, kwargs: dict, output: Any):
            return fn(m, args, kwargs, output) if self._is_on() else None

        self.handles.append(module.register_forward_hook(hook, with_kwargs=True))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
