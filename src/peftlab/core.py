"""The core: attach adapters to a model, merge them, switch them, take them off.

The model is never wrapped or subclassed, and its own state-dict keys never change. At each
chosen site (a host layer such as `encoder.layer.0.attention.self.query`) attach adds

    host.adapters            an `AdapterSlot` (a ModuleDict: adapter name -> Adapter)
    host.forward             an instance attribute that routes through the slot

so adapter parameters appear under `<site>.adapters.<name>.*` and removing both restores
the layer exactly. Model-wide bookkeeping (configs, active set, flags to restore) lives in
one `State` object at `model._peftlab`.

A method may also act on the whole model (peftlab.model_level): a `ModelAdapter` sits at
`model.adapters.<name>` (parameters under `adapters.<name>.*`), installs forward hooks that
detach removes, and may train some of the model's own parameters in place; their values are
snapshotted at attach and put back on detach, like `also_train` modules.

An `Adapter` is one method's change at one site: a fast path `forward(host, x, base)` and,
when the method has one, a weight form W' = f(W) used by merge. The contract tests prove
fast path == merged path for every method.

The stacked path: on an nn.Linear host (HostKind.stackable) whose first adapter offers rows to
stack (`stack_rows()`: LoRA's A, (r, in)), attach keeps the frozen W (out, in) and those rows in
one (out + r, in) buffer; the host's `weight` and the adapter's parameter become views into it
(`.data`), so state-dict keys and values, parameter objects and the optimizer's in-place updates
are unchanged. When that adapter runs alone (no other active adapter at the site, no mixed batch,
not disabled, no residual to give back, not under torch.compile or autocast) and the buffer is
still whole (`stacked_matrix`: W and the rows still adjacent in one storage, W frozen), the slot
calls `forward_stacked(host, x, [W; A])`: one autograd node whose backward computes dx through
[W; A] in one GEMM (LoRA: lora.StackedLoRA).
Anything that breaks the relation (model.to(dtype or device), load_state_dict(assign=True),
`param.data = ...`) falls back to the chain, decided per call by that cheap check. Detach gives
the host weight its own storage back. PEFTLAB_FUSED=0 in the environment (or `core.FUSED =
False`) turns the path off: attach stacks nothing and the forward takes the chain.
"""
from __future__ import annotations

import contextlib
import copy
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Iterator

import torch
from torch import Tensor, nn

from .errors import PeftlabError
from .hosts import HostKind, host_kind
from .model_level import MODEL, ROOT, ModelAdapter, ModelHooks
from .registry import MethodConfig, Site
from .targets import matches, overrides_for, select

ADAPTERS = "adapters"  # the child module name under each host
FUSED = os.environ.get("PEFTLAB_FUSED", "1") != "0"  # the stacked path (see the module docstring)


class Adapter(nn.Module):
    """One method's change at one site. Methods subclass this and declare what they can do.

    forward(host, x, base) -> y    the fast path; `base(x)` is the host's output without this adapter
    delta_weight() -> (out, in)    additive methods: W' = W + delta
    merged_weight(W) -> (out, in)  every method with a weight form: W' = f(W)
    residual() -> (out, in)        methods that move part of W0 into the adapter (PiSSA, OLoRA):
                                   while attached the host holds W0 - residual
    lora_factors() -> (A, B)       low-rank additive methods: A (k, in), B (out, k) with B @ A the
                                   change of the ORIGINAL weight, residual included; None for the
                                   rest. Any method with factors can be written as a LoRA (peft format)
    merged_bias(b) -> (out,)       methods whose weight form also changes the host bias (changes_bias):
                                   b' = g(b), e.g. SSF's gamma * b + beta; merge folds both, unmerge
                                   restores both
    """

    weight_form: ClassVar[bool] = True  # merge is possible
    additive: ClassVar[bool] = True  # merged_weight(W) == W + delta_weight(): unmerge may subtract
    identity_at_init: ClassVar[bool] = True  # output unchanged right after attach
    has_residual: ClassVar[bool] = False  # attach rewrites the host weight to W0 - residual()
    changes_bias: ClassVar[bool] = False  # merge also writes merged_bias(b) into the host bias

    def __init__(self, kind: HostKind):
        super().__init__()
        self.kind = kind

    def delta_weight(self) -> Tensor:
        raise PeftlabError(f"{type(self).__name__} has no additive weight form")

    def merged_weight(self, weight: Tensor) -> Tensor:
        return weight + self.delta_weight().to(weight.dtype)

    def residual(self) -> Tensor:
        raise PeftlabError(f"{type(self).__name__} moves no part of the base weight")

    def merged_bias(self, bias: Tensor) -> Tensor:
        raise PeftlabError(f"{type(self).__name__} does not change the host bias")

    def lora_factors(self) -> tuple[Tensor, Tensor] | None:
        return None

    def stack_rows(self) -> nn.Parameter | None:
        """A trained (k, in) parameter that attach may keep below the host weight in one (out + k, in)
        buffer (the stacked path); None (the default): nothing to stack."""
        return None

    def forward_stacked(self, host: nn.Module, x: Tensor, stacked: Tensor) -> Tensor | None:
        """The forward when this adapter runs alone on a host whose weight and stack_rows() are the one
        matrix `stacked` = [W; rows] (out + k, in), with the host's own forward as the base. None: not
        now (e.g. dropout in training), the slot takes the chain."""
        return None


def stacked_matrix(weight: Tensor, rows: Tensor) -> Tensor | None:
    """[weight; rows] as one (out + k, in) tensor when `rows` (k, in) still sit right below the frozen
    `weight` (out, in) in one storage, else None. A cheap check: pointers, offsets and flags, no data."""
    if weight.requires_grad or weight.dim() != 2 or rows.dim() != 2 or rows.shape[1] != weight.shape[1]:
        return None
    if weight.dtype != rows.dtype or weight.device != rows.device:
        return None
    if not (weight.is_contiguous() and rows.is_contiguous()):
        return None
    if rows.storage_offset() != weight.storage_offset() + weight.numel():
        return None
    if rows.untyped_storage().data_ptr() != weight.untyped_storage().data_ptr():
        return None
    return weight.detach().as_strided((weight.shape[0] + rows.shape[0], weight.shape[1]), (weight.shape[1], 1))


def _owns_storage(tensor: Tensor) -> bool:
    """The tensor is its storage, whole: no view into a larger buffer."""
    return tensor.storage_offset() == 0 and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()


@dataclass
class PeftLoRA:
    """An adapter at one site as `peft`'s LoRA layer holds it; peftlab.io.peft writes it as is.

    A method that peft's LoRA layer computes as itself (LoRA, DoRA) returns one from its
    config's `peft_lora(adapter)`; any other low-rank method is written from its adapters'
    lora_factors(), as PeftLoRA(A, B) at scale 1.

    peft computes W0 + s B @ A at the site, s = lora_alpha / r (use_rslora: / sqrt(r)),
    r = A.shape[0]. The method's own scale is stated as its config states it, alpha over rank
    (over sqrt(rank) with rslora), so that io can write the lora_alpha that gives the same s
    without a rounding step.
    """

    A: Tensor  # (r, in): with B, the change of the ORIGINAL weight (a residual init's part included)
    B: Tensor  # (out, r)
    alpha: float = 1.0  # scale = alpha / rank, or alpha / sqrt(rank) with rslora
    rank: int = 1
    rslora: bool = False
    dropout: float = 0.0  # on the input at this site (peft: lora_dropout, one value for all sites)
    tensors: dict[str, Tensor] = field(default_factory=dict)  # more peft tensors by name suffix, e.g.
    # {"lora_magnitude_vector": m (out,)} for DoRA


@dataclass
class Group:
    """Every adapter attached under one name."""

    config: MethodConfig
    sites: dict[str, Adapter]  # site name -> adapter
    trainable: dict[str, bool]  # parameter name -> requires_grad while active (restored on set_active)
    model: ModelAdapter | None = None  # the model-level part, at `adapters.<name>`
    hooks: ModelHooks | None = None  # its forward hooks, removed on detach

    def adapters(self) -> dict[str, Adapter | ModelAdapter]:
        """What the method's hooks (after_step, loss, param_groups) see: site name -> adapter, and
        the model-level adapter under MODEL ("")."""
        return self.sites if self.model is None else {**self.sites, MODEL: self.model}


@dataclass
class Snapshot:
    """A host's values before an operation that rewrote them; popped to undo it exactly."""

    reason: str  # "merge" | "residual"
    name: str  # the adapter
    weight: Tensor | None  # None: merged without a copy (additive: unmerge subtracts the delta)
    bias: Tensor | None = None  # the host bias, when the operation changed it


@dataclass
class State:
    """Model-wide bookkeeping, kept at `model._peftlab`."""

    groups: dict[str, Group] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    disabled: bool = False
    routing: list[str | None] | None = None  # per-example adapter names for a mixed batch
    requires_grad: dict[str, bool] = field(default_factory=dict)  # the model's flags before attach
    # group -> original values of the model parameters it trains in place (also_train modules and
    # a model-level adapter's in_place): put back on detach, swapped in by disabled()
    in_place: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    # adapter -> site -> (max abs, relative Frobenius) error a merge into a quantized layer added by
    # requantizing (peftlab.quantize.merge_errors); dropped on unmerge
    merge_errors: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)


class AdapterSlot(nn.ModuleDict):
    """The adapters of one host, and the forward that runs them.

    `history` is a stack of `Snapshot`s pushed by operations that rewrite the host weight
    (merge, residual attach) and popped to undo them exactly; undoing out of order is refused
    rather than guessed.
    """

    def __init__(self, host: nn.Module, kind: HostKind, state: State):
        super().__init__()
        self.__dict__["host"] = host  # plain references: not submodules, not in the state dict
        self.__dict__["state"] = state
        self.kind = kind
        self.merged: list[str] = []
        self.history: list[Snapshot] = []
        self.stacked: str | None = None  # the adapter whose rows share the host weight's buffer

    # ---- forward -------------------------------------------------------------------------

    def host_forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        state = self.state
        if state.routing is not None:
            return self._routed(x, state.routing, *args, **kwargs)
        if state.disabled:
            if self.merged:
                raise PeftlabError("adapters are merged into the weights: unmerge before using disabled()")
            return self._run(x, [], args, kwargs)
        return self._run(x, [n for n in state.active if n in self and n not in self.merged], args, kwargs,
                         stack=True)

    def _run(self, x: Tensor, names: list[str], args: tuple, kwargs: dict, stack: bool = False) -> Tensor:
        host = self.host
        # Residual adapters that are off must give back the part of W0 they hold.
        returned = [self[n] for n in self if self[n].has_residual and n not in names and n not in self.merged]
        if stack and len(names) == 1 and not returned and not args and not kwargs:
            y = self._stacked_forward(self[names[0]], x)
            if y is not None:
                return y
        if returned:
            weight = self.kind.matrix(host) + sum(a.residual() for a in returned)
            base: Callable[[Tensor], Tensor] = lambda inp: self.kind.forward_with(host, inp, weight)
        else:
            base = lambda inp: type(host).forward(host, inp, *args, **kwargs)
        for name in names:
            base = _chain(self[name], host, base)
        return base(x)

    def _routed(self, x: Tensor, routing: list[str | None], *args: Any, **kwargs: Any) -> Tensor:
        if self.merged:
            raise PeftlabError("a mixed-adapter batch needs unmerged adapters: call peftlab.unmerge(model) first")
        if len(routing) != x.shape[0]:
            raise PeftlabError(f"per_example got {len(routing)} names for a batch of {x.shape[0]} examples")
        out = None
        for name in dict.fromkeys(routing):
            rows = torch.tensor([i for i, n in enumerate(routing) if n == name], device=x.device)
            part = self._run(x.index_select(0, rows), [name] if name in self else [], args, kwargs)
            if out is None:
                out = part.new_empty((x.shape[0], *part.shape[1:]))
            out[rows] = part
        return out

    def _stacked_forward(self, adapter: Adapter, x: Tensor) -> Tensor | None:
        """The stacked path, when it applies now (see the module docstring); None: take the chain."""
        if not FUSED or torch.compiler.is_compiling() or torch.is_autocast_enabled(x.device.type):
            return None  # compiled graphs plan their own fusion; autocast casts per op
        rows = adapter.stack_rows()
        stacked = None if rows is None else stacked_matrix(self.kind.matrix(self.host), rows)
        if stacked is None or x.dtype != stacked.dtype:
            return None
        return adapter.forward_stacked(self.host, x, stacked)

    def stack(self, name: str) -> None:
        """Keep the host weight W (out, in) and adapter `name`'s stack_rows() (k, in) in one buffer, both
        parameters becoming views into it (same objects, same values)."""
        weight, rows = self.kind.matrix(self.host), self[name].stack_rows()
        if rows.dtype != weight.dtype or rows.device != weight.device or rows.shape[1:] != weight.shape[1:]:
            return  # nothing to share: the chain serves this site
        buffer = torch.cat([weight.detach(), rows.detach()])  # (out + k, in)
        weight.data, rows.data = buffer[: weight.shape[0]], buffer[weight.shape[0]:]
        self.stacked = name

    def unstack(self) -> None:
        """Give the host weight and the stacked rows contiguous storages of their own again (same values)."""
        for tensor in (self.kind.matrix(self.host), self[self.stacked].stack_rows()):
            if tensor is not None and not _owns_storage(tensor):
                tensor.data = tensor.detach().clone(memory_format=torch.contiguous_format)
        self.stacked = None


class ModelSlot(nn.ModuleDict):
    """The model-level adapters of a model, by name: the model's child `adapters`."""


def _chain(adapter: Adapter, host: nn.Module, base: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    return lambda inp: adapter(host, inp, base)


# ---- model-level helpers -------------------------------------------------------------------


def state_of(model: nn.Module, create: bool = False) -> State:
    """The model's `State` (what is attached, what is active); raises when nothing is attached
    (create=True: makes an empty one)."""
    if _compiled_wrapper(model):
        raise PeftlabError("this is the wrapper torch.compile(model) returns: give peftlab the model you compiled "
                           "(wrapper._orig_mod), whose changes the compiled one follows, or compile in place "
                           "with model.compile()")
    state = model.__dict__.get("_peftlab")
    if state is None:
        if not create:
            raise PeftlabError("this model has no peftlab adapters: call peftlab.attach(model, config) first")
        state = State()
        model.__dict__["_peftlab"] = state
    return state


def _compiled_wrapper(model: nn.Module) -> bool:
    """What torch.compile(model) returns: a module around the model (whose parameter names start with
    `_orig_mod.`). Its class is looked up only once torch.compile has been used."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    return eval_frame is not None and isinstance(model, eval_frame.OptimizedModule)


def _slot(host: nn.Module) -> AdapterSlot | None:
    slot = host._modules.get(ADAPTERS)
    return slot if isinstance(slot, AdapterSlot) else None


def adapter_names(state: State, name: str | Iterable[str] | None) -> list[str]:
    """The attached names `name` asks for (None: all, in attach order); raises on an unknown one."""
    if name is None:
        return list(state.groups)
    names = [name] if isinstance(name, str) else list(name)
    for n in names:
        if n not in state.groups:
            raise PeftlabError(f"no adapter named {n!r}; attached: {list(state.groups)}")
    return names


def sites_for(model: nn.Module, config: MethodConfig) -> list[Site]:
    """The sites a config selects, each checked against what the method supports."""
    modules = dict(model.named_modules())
    sites, unsupported = [], []
    for name in select(model, config.targets, config.exclude):
        module = modules[name]
        kind = host_kind(module)
        if kind is None:
            if isinstance(getattr(module, "weight", None), nn.Parameter):
                unsupported.append(f"{name} ({type(module).__name__})")
            continue  # a container matched by a glob: its children are the sites
        if kind.name not in config.hosts:
            unsupported.append(f"{name} ({kind.name})")
            continue
        sites.append(Site(name, module, kind))
    if unsupported:
        raise PeftlabError(
            f"method {config.method!r} supports {', '.join(config.hosts)} layers, but targets also matched: "
            f"{', '.join(unsupported[:6])}{' ...' if len(unsupported) > 6 else ''}. Narrow targets or add them to exclude"
        )
    if not sites:
        raise PeftlabError(f"targets {config.targets!r} matched only containers, no layer with a weight")
    return sites


def also_train_parameters(model: nn.Module, patterns: list[str]) -> dict[str, nn.Parameter]:
    """name -> parameter of the modules that `also_train` patterns select (tied weights once)."""
    if not patterns:
        return {}
    modules = dict(model.named_modules())
    canonical = {id(p): n for n, p in model.named_parameters()}  # tied weights: one name each
    params = {}
    for name in select_modules(model, patterns):
        for p in modules[name].parameters():
            params[canonical[id(p)]] = p
    return params


def in_place_parameters(model: nn.Module, config: MethodConfig,
                        model_adapter: ModelAdapter | None = None) -> dict[str, nn.Parameter]:
    """name -> parameter of everything `config` trains in the model's own parameters: its also_train
    modules and its model-level adapter's in_place (built here, touching nothing, unless given)."""
    params = also_train_parameters(model, list(config.also_train))
    if config.model_adapter:
        if model_adapter is None:
            model_adapter = config.build_model(model, initialize=False)
        params.update(model_adapter.in_place)
    return params


def host_bias(host: nn.Module) -> nn.Parameter | None:
    """The host layer's own bias parameter, None when it has none (bias=False, Embedding)."""
    return host._parameters.get("bias")


def select_modules(model: nn.Module, patterns: list[str]) -> list[str]:
    """Names of the modules `also_train` patterns select; raises when none matches."""
    # also_train may name any module (a head, a LayerNorm), not only adaptable layers;
    # keep the outermost match so a parameter is never listed twice.
    chosen: list[str] = []
    for name, module in model.named_modules():
        if name and any(matches(p, name, module) for p in patterns):
            if not any(name.startswith(c + ".") for c in chosen):
                chosen.append(name)
    if not chosen:
        raise PeftlabError(f"also_train {patterns!r} matched no module; e.g. also_train=['classifier']")
    return chosen


# ---- the public operations -----------------------------------------------------------------


def attach(model: nn.Module, config: MethodConfig, name: str = "default", calibration: Any = None,
           *, state_dict: dict[str, Tensor] | None = None) -> nn.Module:
    """Attach `config`'s method to the sites it targets, under `name`. In place; returns model.

    Everything is built and checked before the model is touched, so a failure leaves the
    model exactly as it was. `state_dict` (used by peftlab.load) fills the adapters with saved
    values instead of running the method's initialisation.
    """
    if not isinstance(config, MethodConfig):
        raise PeftlabError(f"attach needs a method config such as peftlab.LoRA(...), got {type(config).__name__}")
    # Each attached adapter owns its config: calibration may record per-site results in it
    # (EVA's ranks), and the caller's object must not change under their feet.
    config = copy.deepcopy(config)
    existing = model.__dict__.get("_peftlab")
    if existing is not None and name in existing.groups:
        raise PeftlabError(f"an adapter named {name!r} is attached already: pick another name or detach it")
    if not name or "." in name:
        raise PeftlabError(f"adapter name {name!r} must be non-empty and contain no '.'")
    sites, built, whole, in_place = _build(model, config, name, calibration, state_dict)
    _install(model, config, name, sites, built, whole, in_place)
    return model


def _build(model: nn.Module, config: MethodConfig, name: str, calibration: Any, state_dict: dict[str, Tensor] | None
           ) -> tuple[list[Site], dict[str, Adapter], ModelAdapter | None, dict[str, nn.Parameter]]:
    """(sites, adapter by site name, model-level adapter, parameters trained in place), checked, with
    the model untouched."""
    sites = sites_for(model, config) if config.site_adapters else []
    per_site = {s.name: config.at_site(overrides_for(s.name, s.host, config.overrides)) for s in sites}
    _check_declared_quantized(config, sites)
    for s in sites:
        per_site[s.name].validate_site(s)
        if ADAPTERS in s.host.__dict__ or (ADAPTERS in s.host._modules and _slot(s.host) is None):
            raise PeftlabError(f"{s.name} already has an attribute {ADAPTERS!r}; peftlab cannot attach there")

    initialize = state_dict is None
    stats: dict[str, Any] = {}
    if config.needs_calibration and initialize:
        if calibration is None:
            raise PeftlabError(
                f"method {config.method!r} initialises from data: pass calibration=<iterable of model input batches>"
            )
        stats = config.calibrate(model, sites, calibration)
    built = {s.name: per_site[s.name].build(s, stats.get(s.name), initialize) for s in sites}
    whole = _build_model_adapter(model, config, name, initialize)
    in_place = in_place_parameters(model, config, whole)
    _check_quantized_base(config, sites, built, in_place)
    if whole is not None:
        _check_in_place_free(model, whole.in_place, config)
    if state_dict is not None:
        _fill(built, whole, state_dict, name)
    return sites, built, whole, in_place


def _check_declared_quantized(config: MethodConfig, sites: list[Site]) -> None:
    """A method declared not to work on a quantized layer (quantized_base = "no") is refused before its
    calibration runs."""
    quantized = [s.name for s in sites if s.quantized]
    if quantized and config.quantized_base == "no":
        raise PeftlabError(f"method {config.method!r} needs the full-precision weight of {quantized[0]}, which is "
                           "quantized: attach before quantizing, or leave the quantized layers out of targets")


def _check_quantized_base(config: MethodConfig, sites: list[Site], built: dict[str, Adapter],
                          in_place: dict[str, nn.Parameter]) -> None:
    """Refuse, after the build and before any change, what cannot work on a quantized layer (peftlab.quantize):
    an init that would rewrite its weight (requantizing it), training it in place."""
    for s in sites:
        if s.quantized and built[s.name].has_residual:
            raise PeftlabError(f"method {config.method!r} starts by moving part of {s.name}'s weight into the adapter "
                               "(a residual init such as PiSSA's), which would requantize the quantized weight: use an "
                               "init that leaves W alone (e.g. init: gaussian), or attach before quantizing")
    frozen = sorted(n for n, p in in_place.items() if not p.is_floating_point())
    if frozen:
        raise PeftlabError(f"method {config.method!r} would train {frozen[0]} in place, which is quantized: "
                           "leave it out (targets, also_train), or attach before quantizing")


def _build_model_adapter(model: nn.Module, config: MethodConfig, name: str, initialize: bool) -> ModelAdapter | None:
    if not config.model_adapter:
        return None
    root = model._modules.get(ROOT)
    if ROOT in model.__dict__ or (root is not None and not isinstance(root, ModelSlot)):
        raise PeftlabError(f"the model already has an attribute {ROOT!r}; peftlab cannot attach "
                           f"method {config.method!r} (a model-level adapter) there")
    return config.build_model(model, initialize)


def _check_in_place_free(model: nn.Module, in_place: dict[str, nn.Parameter], config: MethodConfig) -> None:
    """A model-level adapter never trains a parameter another adapter trains in place: each detach puts
    back its own snapshot, so two claims on one parameter would undo each other."""
    state = model.__dict__.get("_peftlab")
    for other, values in (state.in_place.items() if state else ()):
        shared = sorted(set(values) & set(in_place))
        if shared:
            raise PeftlabError(f"method {config.method!r} would train {shared[0]} in place, which adapter {other!r} "
                               "trains already: detach it first, or narrow targets/also_train")


def _install(model: nn.Module, config: MethodConfig, name: str, sites: list[Site], built: dict[str, Adapter],
             whole: ModelAdapter | None, in_place: dict[str, nn.Parameter]) -> None:
    """Put built adapters in place: freeze the base, subtract residuals, mark `in_place` trainable,
    install the model-level adapter and its hooks.

    Nothing here can fail on bad input; `_build` checked it all.
    """
    state = state_of(model, create=True)
    if not state.groups:
        state.requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
    for s in sites:
        slot = _slot(s.host)
        if slot is None:
            slot = AdapterSlot(s.host, s.kind, state)
            s.host.add_module(ADAPTERS, slot)
            s.host.__dict__["forward"] = slot.host_forward
        adapter = built[s.name].to(device=s.kind.matrix(s.host).device).train(s.host.training)
        if adapter.has_residual:
            weight = s.kind.matrix(s.host)
            slot.history.append(Snapshot("residual", name, weight.detach().clone()))
            s.kind.write(s.host, weight - adapter.residual().to(weight.dtype))
        slot[name] = adapter
        if FUSED and s.kind.stackable and len(slot) == 1 and adapter.stack_rows() is not None:
            slot.stack(name)
    state.in_place[name] = {k: p.detach().clone() for k, p in in_place.items()}
    for p in in_place.values():
        p.requires_grad_(True)
    group = Group(config, built, {})
    if whole is not None:
        _install_model_adapter(model, state, name, group, whole)
    group.trainable = {f"{prefix}{k}": p.requires_grad for prefix, a in _prefixed(built, whole, name)
                       for k, p in a.named_parameters()}
    state.groups[name] = group
    state.active.append(name)


def _install_model_adapter(model: nn.Module, state: State, name: str, group: Group, whole: ModelAdapter) -> None:
    root = model._modules.get(ROOT)
    if root is None:
        root = ModelSlot()
        model.add_module(ROOT, root)
    device = next((p.device for p in model.parameters()), None)
    root[name] = whole.to(device=device).train(model.training)
    group.model = whole
    group.hooks = ModelHooks(lambda: name in state.active and not state.disabled)
    whole.install(model, group.hooks)


def _prefixed(sites: dict[str, Adapter], whole: ModelAdapter | None, name: str) -> list[tuple[str, nn.Module]]:
    """(state-dict prefix, adapter) for every adapter under one name: `<site>.adapters.<name>.` for a site
    adapter, `adapters.<name>.` for the model-level one."""
    pairs: list[tuple[str, nn.Module]] = [(f"{site}.{ADAPTERS}.{name}.", a) for site, a in sites.items()]
    if whole is not None:
        pairs.append((f"{ROOT}.{name}.", whole))
    return pairs


def adapter_tensors(group: Group, name: str) -> dict[str, Tensor]:
    """Every adapter tensor of a group under the key model.state_dict() gives it (what native save writes)."""
    return {prefix + k: t for prefix, a in _prefixed(group.sites, group.model, name) for k, t in a.state_dict().items()}


def _fill(built: dict[str, Adapter], whole: ModelAdapter | None, state_dict: dict[str, Tensor], name: str) -> None:
    """Load saved values into freshly built adapters, checking every key and shape first."""
    owners = _prefixed(built, whole, name)
    expected = {prefix + k: t for prefix, a in owners for k, t in a.state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    marker = f".{ADAPTERS}.{name}."
    unexpected = sorted(k for k in state_dict if marker in "." + k and k not in expected)
    if unexpected:
        raise PeftlabError(f"saved adapter has {len(unexpected)} tensor(s) this model has no place for, e.g. "
                           f"{unexpected[0]}: it was made for another model or config")
    if missing:
        raise PeftlabError(f"saved adapter lacks {len(missing)} tensor(s), e.g. {missing[0]}: it was made for another model or config")
    for key, tensor in expected.items():
        if tuple(state_dict[key].shape) != tuple(tensor.shape):
            raise PeftlabError(
                f"saved tensor {key} has shape {tuple(state_dict[key].shape)}, this model needs {tuple(tensor.shape)}: "
                "the adapter was made for another model"
            )
    for prefix, adapter in owners:
        adapter.load_state_dict({k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}, strict=False)


def detach(model: nn.Module, name: str | Iterable[str] | None = None, keep_merged: bool = False) -> nn.Module:
    """Remove adapters (all when name is None) and restore what they changed, exactly.

    keep_merged=True keeps what they learned instead: every adapter is merged into its host
    weights (W <- f(W)) and the also_train modules keep their trained values, so the plain
    model computes what the adapted one did (`peft`'s merge_and_unload). It applies to all
    adapters at once, and is refused, changing nothing, if one has no weight form.
    """
    state = state_of(model)
    names = adapter_names(state, name)
    if keep_merged:
        if set(names) != set(state.groups):
            raise PeftlabError(f"detach(keep_merged=True) removes every adapter at once; attached: "
                               f"{list(state.groups)}. Detach the others first (plainly) or leave name=None")
        merge(model, names)  # refuses weightless methods before touching anything
        kept = _learned_tensors(model, state)
        packed = _merged_packed(model, state)
    # Undo in reverse order of attach so weight snapshots pop from the top of each stack.
    for n in reversed([g for g in state.groups if g in names]):
        unmerge(model, n)
        group = state.groups[n]
        for site in group.sites:
            slot = _slot(model.get_submodule(site))
            adapter = slot[n]
            if adapter.has_residual:
                _restore(slot, "residual", n)
            if slot.stacked == n:
                slot.unstack()
            del slot[n]
            if not len(slot):
                host = slot.host
                del host._modules[ADAPTERS]
                del host.__dict__["forward"]
        if group.model is not None:
            _uninstall_model_adapter(model, group, n)
        _put_back(model, state.in_place.pop(n))
        del state.groups[n]
        if n in state.active:
            state.active.remove(n)
    if not state.groups:
        for pname, p in model.named_parameters():
            p.requires_grad_(state.requires_grad.get(pname, p.requires_grad))
        del model.__dict__["_peftlab"]
    if keep_merged:
        _put_back(model, kept)
        for site, (kind, saved) in packed.items():
            kind.restore_weight(model.get_submodule(site), saved)
    return model


def _uninstall_model_adapter(model: nn.Module, group: Group, name: str) -> None:
    group.hooks.remove()
    root = model._modules[ROOT]
    del root[name]
    if not len(root):
        del model._modules[ROOT]


def _learned_tensors(model: nn.Module, state: State) -> dict[str, Tensor]:
    """Copies of what the adapters changed: merged host weights and parameters trained in place."""
    learned = {}
    for group_name, group in state.groups.items():
        for site in group.sites:
            host = model.get_submodule(site)
            for pname, p in host.named_parameters(recurse=False):
                if not (pname == "weight" and _slot(host).kind.quantized):  # packed: see _merged_packed
                    learned[f"{site}.{pname}"] = p.detach().clone()
        params = dict(model.named_parameters())
        learned.update({k: params[k].detach().clone() for k in state.in_place[group_name]})
    return learned


def _merged_packed(model: nn.Module, state: State) -> dict[str, tuple[HostKind, Any]]:
    """site -> (kind, packed weight) of the quantized hosts, merged: a packed weight is put back whole
    (its scales with it), not copied into the original's storage."""
    hosts = {site: model.get_submodule(site) for group in state.groups.values() for site in group.sites}
    return {site: (_slot(h).kind, _slot(h).kind.save_weight(h)) for site, h in hosts.items() if _slot(h).kind.quantized}


def check_rehost(model: nn.Module, names: list[str]) -> None:
    """Refuse to replace layers whose weights hold a merged adapter or a residual init (see rehost)."""
    for name in names:
        slot = _slot(model.get_submodule(name))
        if slot is not None and slot.history:
            raise PeftlabError(f"{name}'s weight holds adapter {slot.history[-1].name!r} ({slot.history[-1].reason}): "
                               "unmerge (or detach) it before replacing the layer")


def rehost(model: nn.Module, name: str, new_host: nn.Module, kind: HostKind) -> None:
    """Move the adapters attached at layer `name` to `new_host`, seen as `kind`, before the caller puts
    new_host in the layer's place (peftlab.quantize.dequantize_model). Adapter parameters, state-dict
    keys and the active set do not change; check_rehost first."""
    old = model.get_submodule(name)
    slot = _slot(old)
    if slot is None:
        return
    del old._modules[ADAPTERS]
    del old.__dict__["forward"]
    slot.__dict__["host"] = new_host
    slot.kind = kind
    for module in slot.modules():
        if isinstance(module, Adapter):
            module.kind = kind
    new_host.add_module(ADAPTERS, slot)
    new_host.__dict__["forward"] = slot.host_forward


def _put_back(model: nn.Module, values: dict[str, Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in values.items():
            params[k].copy_(v)


def _restore(slot: AdapterSlot, reason: str, name: str) -> None:
    if not slot.history or (slot.history[-1].reason, slot.history[-1].name) != (reason, name):
        top = (slot.history[-1].reason, slot.history[-1].name) if slot.history else None
        raise PeftlabError(
            f"cannot undo {reason} of {name!r} on {type(slot.host).__name__}: {top} was applied after it; "
            "undo in reverse order (unmerge/detach the later adapter first)"
        )
    snapshot = slot.history.pop()
    if snapshot.weight is not None:
        slot.kind.restore_weight(slot.host, snapshot.weight)
    else:  # merged without a snapshot: additive methods subtract their delta
        slot.kind.write(slot.host, slot.kind.matrix(slot.host) - slot[name].delta_weight())
    if snapshot.bias is not None:
        host_bias(slot.host).data.copy_(snapshot.bias)


def merge(model: nn.Module, name: str | Iterable[str] | None = None, keep_original: bool = True) -> nn.Module:
    """Write adapters into the host weights: W <- f(W). Later forwards skip them.

    With keep_original (the default) the pre-merge weight is kept so unmerge is exact; without
    it memory is saved and unmerge subtracts the delta (additive methods only).
    """
    state = state_of(model)
    names = adapter_names(state, name)
    for n in names:  # refuse before touching anything
        _check_mergeable(model, n, state.groups[n], keep_original)
    with torch.no_grad():
        for n in names:
            for site, adapter in state.groups[n].sites.items():
                slot = _slot(model.get_submodule(site))
                if n in slot.merged:
                    continue
                weight, bias = slot.kind.matrix(slot.host), host_bias(slot.host) if adapter.changes_bias else None
                merged_weight = adapter.merged_weight(weight)
                # A quantized layer's snapshot is its packed weight itself (no copy): always kept, so
                # unmerge never requantizes a second time.
                kept = slot.kind.save_weight(slot.host) if keep_original or slot.kind.quantized else None
                slot.history.append(Snapshot("merge", n, kept, None if bias is None else bias.detach().clone()))
                if bias is not None:
                    bias.copy_(adapter.merged_bias(bias))
                slot.kind.write(slot.host, merged_weight)
                if slot.kind.quantized:
                    state.merge_errors.setdefault(n, {})[site] = _requantization_error(slot, merged_weight)
                slot.merged.append(n)
    _warn_merge_errors(state, names)
    return model


def _requantization_error(slot: AdapterSlot, exact: Tensor) -> tuple[float, float]:
    """(max abs, relative Frobenius) of the requantized merged weight against the exact fp32 merge."""
    error = slot.kind.matrix(slot.host).float() - exact.float()  # (out, in)
    return error.abs().max().item(), (error.norm() / exact.float().norm().clamp_min(1e-30)).item()


def _warn_merge_errors(state: State, names: list[str]) -> None:
    for n in names:
        errors = state.merge_errors.get(n)
        if errors:
            site, (worst, relative) = max(errors.items(), key=lambda item: item[1][1])
            warnings.warn(f"merging adapter {n!r} into {len(errors)} quantized layer(s) requantized them: relative "
                          f"Frobenius error up to {relative:.2e} ({site}, max abs {worst:.2e}) against the exact merge; "
                          "peftlab.quantize.merge_errors(model) has every layer's, unmerge restores the packed weights "
                          "exactly, and dequantize_model before detach(keep_merged=True) merges without it",
                          stacklevel=3)


def _check_mergeable(model: nn.Module, name: str, group: Group, keep_original: bool) -> None:
    """Refuse a merge that cannot be done (or undone) exactly, naming the adapter, the method and why."""
    every = list(group.adapters().values())
    if not all(a.weight_form for a in every):
        raise PeftlabError(f"adapter {name!r} ({group.config.method}) has no weight form and cannot be merged: "
                           "its change is not a function of the weights alone; keep it unmerged, or export with "
                           "format='peftlab'")
    if not keep_original and not all(a.additive for a in every):
        raise PeftlabError(f"adapter {name!r} is not additive: merge it with keep_original=True to unmerge later")
    for site, adapter in group.sites.items():
        if adapter.changes_bias and host_bias(model.get_submodule(site)) is None:
            raise PeftlabError(f"adapter {name!r} ({group.config.method}) shifts the output of {site}, which has no "
                               "bias to fold the shift into: keep it unmerged, or leave that layer out of targets")


def unmerge(model: nn.Module, name: str | Iterable[str] | None = None) -> nn.Module:
    """Undo merge: the host weights return to what they were before (exactly, by default)."""
    state = state_of(model)
    names = adapter_names(state, name)
    with torch.no_grad():
        for site, slot in _slots(model):
            for n in reversed(list(slot.merged)):
                if n in names:
                    _restore(slot, "merge", n)
                    slot.merged.remove(n)
                    state.merge_errors.get(n, {}).pop(site, None)
    return model


def _slots(model: nn.Module) -> Iterator[tuple[str, AdapterSlot]]:
    for site, module in model.named_modules():
        slot = _slot(module)
        if slot is not None:
            yield site, slot


@contextlib.contextmanager
def disabled(model: nn.Module):
    """Within the block the model computes as the base model (also_train modules included)."""
    state = state_of(model)
    trained = {}
    for values in state.in_place.values():
        params = dict(model.named_parameters())
        trained.update({k: params[k].detach().clone() for k in values})
        _put_back(model, values)
    state.disabled = True
    try:
        yield model
    finally:
        state.disabled = False
        _put_back(model, trained)


def set_active(model: nn.Module, names: str | Iterable[str]) -> None:
    """Choose which attached adapters run (in attach order); only active ones train."""
    state = state_of(model)
    wanted = adapter_names(state, names)
    was_active = set(state.active)
    state.active = [n for n in state.groups if n in wanted]
    params = dict(model.named_parameters())
    for n, group in state.groups.items():
        for pname in group.trainable:
            if n in was_active:  # keep what training did to the flags (LaMDA freezing B, ...)
                group.trainable[pname] = params[pname].requires_grad
            params[pname].requires_grad_(group.trainable[pname] and n in wanted)


@contextlib.contextmanager
def per_example(model: nn.Module, names: list[str | None]):
    """A mixed batch: example i runs through adapter names[i] alone (None: the base model)."""
    state = state_of(model)
    unknown = {n for n in names if n is not None and n not in state.groups}
    if unknown:
        raise PeftlabError(f"per_example names unknown adapters {sorted(unknown)}; attached: {list(state.groups)}")
    whole = [n for n, g in state.groups.items() if g.model is not None]
    if whole:
        raise PeftlabError(f"per_example routes examples through host layers, but adapter {whole[0]!r} "
                           f"({state.groups[whole[0]].config.method}) acts on the whole model: detach it first")
    state.routing = list(names)
    try:
        yield model
    finally:
        state.routing = None


def adapters(model: nn.Module, name: str) -> dict[str, Adapter]:
    """Site name -> adapter for one attached name."""
    state = state_of(model)
    return state.groups[adapter_names(state, name)[0]].adapters()


def adapter_configs(model: nn.Module) -> dict[str, MethodConfig]:
    """Attached adapter names -> their configs, in attach order."""
    state = model.__dict__.get("_peftlab")
    return {n: g.config for n, g in state.groups.items()} if state else {}


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter that will receive gradients, by name."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def step(model: nn.Module, step: int, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Call after each optimizer step: methods that change during training act here.

    Methods that declare `step_needs_optimizer` (they reset or drop optimizer state for what they
    change: new ranks, re-drawn trainable sets) also get the optimizer; they refuse to run without it.
    """
    state = state_of(model)
    for n in state.active:
        group = state.groups[n]
        if not group.config.step_hook:
            continue
        if group.config.step_needs_optimizer:
            if optimizer is None:
                raise PeftlabError(f"method {group.config.method!r} changes optimizer state after each step: "
                                   "call peftlab.step(model, step, optimizer=<your optimizer>)")
            group.config.after_step(group.adapters(), step, optimizer=optimizer)
        else:
            group.config.after_step(group.adapters(), step)


def regularization(model: nn.Module) -> Tensor | None:
    """The sum of the active methods' regularisers (None if none adds one)."""
    state = state_of(model)
    terms = [state.groups[n].config.loss(state.groups[n].adapters()) for n in state.active
             if state.groups[n].config.adds_loss]
    terms = [t for t in terms if t is not None]
    return torch.stack(terms).sum() if terms else None


def param_groups(model: nn.Module, lr: float) -> list[dict]:
    """Optimizer parameter groups: each active method's own, then the parameters trained in place.

    Every in-place parameter joins, trainable now or not: a method that freezes and unfreezes them
    during training (LISA, HFT) finds them in the optimizer; a frozen one has no gradient, so the
    optimizer skips it and keeps no state for it.
    """
    state = state_of(model)
    groups = [g for n in state.active for g in state.groups[n].config.param_groups(state.groups[n].adapters(), lr)]
    params = dict(model.named_parameters())
    extra = [params[k] for n in state.active for k in state.in_place[n]]
    if extra:
        groups.append({"params": extra, "lr": lr})
    return [g for g in groups if g["params"]]


def summary(model: nn.Module) -> str:
    """A table of sites, methods and trainable parameters, with their share of the total."""
    state = model.__dict__.get("_peftlab")
    total = sum(p.numel() for p in model.parameters())
    rows = [("adapter", "method", "sites", "trainable", "share")]
    if state:
        params = dict(model.named_parameters())
        for n, group in state.groups.items():
            count = sum(params[k].numel() for k, flag in group.trainable.items() if flag)
            count += sum(v.numel() for v in state.in_place[n].values())
            rows.append((n + ("" if n in state.active else " (off)"), group.config.method, str(len(group.sites)),
                         f"{count:,}", f"{100 * count / total:.3f}%"))
    trainable = sum(p.numel() for p in trainable_parameters(model).values())
    rows.append(("trainable now", "", "", f"{trainable:,}", f"{100 * trainable / total:.3f}%"))
    rows.append(("total", "", "", f"{total:,}", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
