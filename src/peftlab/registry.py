"""Method configs, the registry of methods, and config <-> JSON.

A method is one dataclass, named after it (`LoRA`, `DoRA`, ...), decorated with
`@register("lora")`. The dataclass holds the method's hyperparameters plus the fields every
method shares (where to attach, what else to train) and knows how to build its adapter at
one site. That is all the core needs to know about a method:

    hosts            which layer kinds it supports ("linear", "conv1d", "embedding", "conv2d")
    build(...)       the adapter module for one site
    calibrate(...)   optional: statistics from calibration batches, before any build
    after_step(...)  optional: called by training after each optimizer step (with the optimizer,
                     when the method declares step_needs_optimizer)
    loss(...)        optional: a regulariser the training loss adds
    param_groups(...) optional: optimizer parameter groups (e.g. a different lr for B)
    run_fields       fields the training recipe fills from the run (total_steps, lr)
    peft_lora(...), peft_config()  optional: how the `peft` format writes it (see peftlab.io.peft)

Capabilities are declared with class attributes (`needs_calibration`, `step_hook`,
`adds_loss`), never discovered with hasattr.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from .errors import PeftlabError
from .targets import check_patterns

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor, nn

    from .core import Adapter, PeftLoRA
    from .hosts import HostKind
    from .model_level import ModelAdapter


@dataclass
class Site:
    """One place an adapter attaches to: the host module, its name and its kind.

    It answers the geometry every method asks about, through the kind's (out, in) matrix view of
    the host weight (see hosts.py), so a method need not know the layer's own layout.
    """

    name: str
    host: "nn.Module"
    kind: "HostKind"

    @property
    def weight(self) -> "Tensor":
        """W0 as an (out, in) matrix: a view of the host's weight, in its dtype and device (a
        quantized layer: a dequantized fp32 copy, see `quantized`)."""
        return self.kind.matrix(self.host)

    @property
    def quantized(self) -> bool:
        """The host holds its weight quantized (peftlab.quantize): `weight` is a dequantized copy."""
        return self.kind.quantized

    def as_matrix(self, tensor: "Tensor") -> "Tensor":
        """A tensor in the host weight's own layout (e.g. its gradient) viewed as (out, in), like `weight`."""
        return self.kind.matrix(SimpleNamespace(weight=tensor))

    @property
    def in_features(self) -> int:
        return self.kind.in_features(self.host)

    @property
    def out_features(self) -> int:
        return self.kind.out_features(self.host)

    @property
    def max_rank(self) -> int:
        """The largest rank an (out, in) matrix holds: min(out, in)."""
        return min(self.in_features, self.out_features)

    def check_rank(self, r: int, method: str = "", field: str = "r",
                   fix: str = "or an override for this site") -> None:
        """Refuse a rank the layer cannot hold (r <= min(out, in)), naming the site, the limit and the fix.

        `method` and `field` name what was asked for ("SoRA rank r=64", "init_r=64"); `fix` is what
        else the user can do beyond lowering `field`.
        """
        if r <= self.max_rank:
            return
        asked = f"{'rank ' if field == 'r' else ''}{field}={r}"
        raise PeftlabError(
            f"{method + ' ' if method else ''}{asked} is larger than {self.name} allows "
            f"({self.out_features} x {self.in_features}): use {field} <= {self.max_rank}, {fix}"
        )


@dataclass
class MethodConfig:
    """Fields every method shares. Subclasses add their hyperparameters after these."""

    targets: Any = None  # see peftlab.targets: names, globs, "re:" regexes, "all-linear", callables
    exclude: Any = None
    overrides: dict = field(default_factory=dict)  # {pattern: {field: value}} per-site values
    also_train: list = field(default_factory=list)  # modules trained in full and saved, e.g. ["classifier"]

    method: ClassVar[str] = ""  # the registry name, set by @register
    hosts: ClassVar[tuple[str, ...]] = ("linear", "conv1d")
    needs_calibration: ClassVar[bool] = False
    step_hook: ClassVar[bool] = False
    # after_step also takes `optimizer=` (the torch optimizer), to reset or drop state it owns
    step_needs_optimizer: ClassVar[bool] = False
    adds_loss: ClassVar[bool] = False
    # One line for `peftlab methods`: trainable parameters per site.
    trainable_formula: ClassVar[str] = ""
    # Fields that describe the run, not the method: "total_steps" (optimizer steps of the run,
    # for methods with a schedule over it) and "lr" (its learning rate). The training recipe
    # fills the ones a run config leaves unset (see RUN_FIELDS).
    run_fields: ClassVar[tuple[str, ...]] = ()
    # Where the method acts (peftlab.model_level): build() at each site `targets` selects, and/or
    # one build_model() for the whole model (inputs, attention, parameters trained in place).
    site_adapters: ClassVar[bool] = True
    model_adapter: ClassVar[bool] = False
    # torch.compile(model, fullgraph=True) traces the attached model's forward in one graph. False:
    # the method's forward reads values it changes during training in Python (IncreLoRA's grown
    # rank picks its blocks), so it compiles with graph breaks there, computing the same losses.
    compile_fullgraph: ClassVar[bool] = True
    # The peft adapter type save(format="peft") writes: "LORA" through peft_lora/peft_config (below);
    # any other type (IA3, LN_TUNING, ...) through peft_export and, for load, peft_import.
    peft_type: ClassVar[str] = "LORA"
    # On a quantized base (peftlab.quantize): "ok" when the method needs only the host's forward
    # W x and the layer's shape; "dequantize" when it also reads W (an SVD init, DoRA's column
    # norms), which a quantized layer gives as a dequantized fp32 copy (`Site.weight`); "no" when
    # it cannot work there (it needs gradients of W, or W in full precision): attach refuses it.
    # Whatever the declaration, attach refuses to rewrite a quantized weight (residual inits) or
    # train one in place, and says so.
    quantized_base: ClassVar[str] = "dequantize"

    def __post_init__(self) -> None:
        self.check_shapes()
        self.validate()

    def check_shapes(self) -> None:
        """What every field of every method must be, before the method's own checks read them:
        values of the declared types, finite numbers (nested ones too), pattern lists and an
        overrides mapping that targets.select and attach can use."""
        owner = type(self).__name__
        check_patterns(f"{owner} targets", self.targets)
        check_patterns(f"{owner} exclude", self.exclude)
        if not isinstance(self.also_train, (list, tuple)):
            raise PeftlabError(f"{owner} also_train = {self.also_train!r} must be a list of module names, "
                               "e.g. also_train=['classifier']")
        check_patterns(f"{owner} also_train", self.also_train)
        _check_overrides(f"{owner} overrides", self.overrides)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name not in _SHARED_FIELDS:  # checked above, each with its own example
                _check_declared_type(f"{owner} {f.name}", value, f.type)
            _check_finite(f"{owner} {f.name}", value)

    def validate(self) -> None:
        """Check field values; raise PeftlabError naming the field and what is allowed."""

    def validate_site(self, site: Site) -> None:
        """Check this config against one host (e.g. rank against the layer's size)."""

    # Checks many methods' validate() share; errors name the method, the field and the value.

    def check_positive_int(self, *names: str, optional: bool = False) -> None:
        """Each named field is an integer >= 1 (or None, when optional)."""
        for name in names:
            value = getattr(self, name)
            if optional and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                allowed = "a positive integer or None" if optional else "a positive integer"
                raise PeftlabError(f"{type(self).__name__} {name} must be {allowed}, got {value!r}")

    def check_dropout(self) -> None:
        """`dropout` is a probability in [0, 1)."""
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise PeftlabError(f"{type(self).__name__} dropout must be in [0, 1), got {self.dropout!r}")

    def build(self, site: Site, stats: Any = None, initialize: bool = True) -> "Adapter":
        raise PeftlabError(f"method {self.method!r} does not build adapters")

    def build_model(self, model: "nn.Module", initialize: bool = True) -> "ModelAdapter":
        """The model-level adapter (only called when model_adapter is True). Touches nothing: the
        core installs it; initialize=False when saved values will be loaded into it."""
        raise PeftlabError(f"method {self.method!r} has no model-level adapter")

    def calibrate(self, model: "nn.Module", sites: list[Site], calibration: Any) -> dict[str, Any]:
        """Per-site statistics from calibration batches; only called when needs_calibration."""
        return {}

    def after_step(self, adapters: dict[str, "Adapter"], step: int, optimizer: Any = None) -> None:
        """Called after each optimizer step when step_hook is True (with `optimizer=` when
        step_needs_optimizer is True)."""

    def loss(self, adapters: dict[str, "Adapter"]) -> "Tensor | None":
        """A regulariser added to the training loss when adds_loss is True."""
        return None

    def param_groups(self, adapters: dict[str, "Adapter"], lr: float) -> list[dict]:
        """Optimizer parameter groups for this method's trainable parameters."""
        params = [p for a in adapters.values() for p in a.parameters() if p.requires_grad]
        return [{"params": params, "lr": lr}]

    # The `peft` format (peftlab.io.peft) writes a method as a plain LoRA of its adapters'
    # lora_factors() at scale 1. A method peft's LoRA layer computes as itself overrides both.

    def peft_lora(self, adapter: "Adapter") -> "PeftLoRA | None":
        """One site (self: the site's config, overrides applied) as peft's LoRA layer holds it."""
        return None

    def peft_config(self) -> dict[str, Any]:
        """adapter_config.json values peft reads besides the factors (use_dora, use_rslora, lora_dropout)."""
        return {}

    def peft_export(self, model: "nn.Module", adapters: dict[str, Any],
                    in_place: dict[str, "Tensor"]) -> tuple[dict[str, Any], dict[str, "Tensor"]]:
        """A method whose peft_type is not LORA: (adapter_config.json keys besides peft_type and the
        common ones, tensors keyed as peft saves them without the "base_model.model." prefix), from
        the attached adapters (site -> adapter, "" -> the model-level one) and in-place values."""
        raise PeftlabError(f"method {self.method!r} has no peft {self.peft_type} form")

    @classmethod
    def peft_import(cls, model: "nn.Module", document: dict[str, Any], tensors: dict[str, "Tensor"],
                    exact_pattern: Callable[[str], str]
                    ) -> tuple["MethodConfig", dict[str, dict[str, "Tensor"]], dict[str, "Tensor"]]:
        """The reverse of peft_export for one peft directory (tensors without the "base_model.model."
        prefix): (config, site -> {adapter key: tensor} ("" for the model-level adapter), parameter
        name -> value trained in place). exact_pattern(name) is a targets pattern selecting that
        module alone."""
        raise PeftlabError(f"method {cls.method!r} cannot read peft {cls.peft_type} adapters")

    # ---- per-site values and JSON ---------------------------------------------------------

    def at_site(self, overrides: dict[str, Any]) -> "MethodConfig":
        """This config with one site's overrides applied (validated like the original)."""
        if not overrides:
            return self
        _check_fields(type(self), overrides, where="overrides")
        return dataclasses.replace(self, **overrides)

    def to_json(self) -> dict[str, Any]:
        data = {"method": self.method}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if callable(value) or (isinstance(value, (list, tuple)) and any(callable(v) for v in value)):
                raise PeftlabError(
                    f"{type(self).__name__}.{f.name} holds a callable, which cannot be saved as JSON: "
                    "use names, globs or 're:' regexes to save this adapter"
                )
            data[f.name] = list(value) if isinstance(value, tuple) else value
        return data


# ---- field checks every method shares (MethodConfig.check_shapes) ------------------------------

_SHARED_FIELDS = ("targets", "exclude", "overrides", "also_train")

# Declared field types (the annotations are strings) -> what a value may be; int is a number
# too, and bool, though an int to Python, is none of the numbers.
_DECLARED = {"int": (numbers.Integral,), "float": (numbers.Real,), "str": (str,), "bool": (bool,),
             "list": (list, tuple), "dict": (dict,)}
_DECLARED_NAMES = {"int": "an integer", "float": "a number", "str": "a string", "bool": "True or False",
                   "list": "a list", "dict": "a mapping", "None": "None"}


def _check_declared_type(where: str, value: Any, annotation: Any) -> None:
    """`value` is of a type its field declares (e.g. 'int | None'); other annotations (Any) are not checked."""
    options = [o.strip() for o in str(annotation).split("|")]
    if not all(o in _DECLARED or o == "None" for o in options):
        return
    if value is None and "None" in options:
        return
    for option in options:
        kinds = _DECLARED.get(option, ())
        if isinstance(value, kinds) and not (isinstance(value, bool) and option != "bool"):
            return
    wanted = " or ".join(_DECLARED_NAMES[o] for o in options)
    raise PeftlabError(f"{where} must be {wanted}, got {value!r}")


def _check_finite(where: str, value: Any) -> None:
    """No nan or infinity anywhere in `value` (lists and mappings are searched): they train to nan."""
    if isinstance(value, dict):
        for key, item in value.items():
            _check_finite(f"{where}[{key!r}]", item)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_finite(f"{where}[{index}]", item)
    elif isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral) and not math.isfinite(value):
        raise PeftlabError(f"{where} = {value!r} is not a finite number: give a finite value")


def _check_overrides(where: str, overrides: Any) -> None:
    """{pattern: {field: value}}; the fields themselves are checked per site, at attach (MethodConfig.at_site)."""
    example = "e.g. overrides={'value': {'r': 16}}"
    if overrides is None:
        return
    if not isinstance(overrides, dict):
        raise PeftlabError(f"{where} = {overrides!r} must be a mapping of pattern -> field values, {example}")
    for pattern, fields in overrides.items():
        if not (isinstance(pattern, str) or callable(pattern)):
            raise PeftlabError(f"{where} key {pattern!r} must be one pattern (a name, glob or 're:' regex), {example}")
        check_patterns(f"{where} key", pattern)
        if not isinstance(fields, dict) or not all(isinstance(k, str) for k in fields):
            raise PeftlabError(f"{where}[{pattern!r}] = {fields!r} must be a mapping of field names to values, "
                               f"{example}")


RUN_FIELDS = ("total_steps", "lr")
QUANTIZED_BASE = ("ok", "dequantize", "no")  # MethodConfig.quantized_base

_METHODS: dict[str, type[MethodConfig]] = {}
_ALIASES: dict[str, tuple[str, dict[str, Any]]] = {}


def register(name: str, **aliases: dict[str, Any]) -> Callable[[type], type]:
    """Class decorator: make a config dataclass available as `name`.

    `aliases` map further names to preset fields, e.g. register("lora", pissa={"init": "pissa"})
    lets `peftlab.config("pissa")` build LoRA(init="pissa").
    """

    def decorate(cls: type) -> type:
        for n in (name, *aliases):
            if n in _METHODS or n in _ALIASES:
                raise RuntimeError(f"method name {n!r} is registered twice")
        unknown = sorted(set(cls.run_fields) - set(RUN_FIELDS))
        if unknown:
            raise RuntimeError(f"{cls.__name__}.run_fields {unknown}: the recipe knows only {RUN_FIELDS}")
        if cls.quantized_base not in QUANTIZED_BASE:
            raise RuntimeError(f"{cls.__name__}.quantized_base = {cls.quantized_base!r}: declare one of {QUANTIZED_BASE}")
        cls.method = name
        _METHODS[name] = cls
        for alias, preset in aliases.items():
            _ALIASES[alias] = (name, dict(preset))
        return cls

    return decorate


def methods() -> list[str]:
    """Every name `config()` accepts: registered methods and their aliases, sorted."""
    _load_builtin_methods()
    return sorted([*_METHODS, *_ALIASES])


def method_class(name: str) -> type[MethodConfig]:
    _load_builtin_methods()
    if name in _ALIASES:
        name = _ALIASES[name][0]
    if name not in _METHODS:
        raise PeftlabError(f"unknown method {name!r}; registered methods: {', '.join(methods())}")
    return _METHODS[name]


def _check_fields(cls: type, fields: dict[str, Any], where: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise PeftlabError(
            f"{where}: unknown field(s) {unknown} for method {cls.method!r}; allowed: {sorted(known)}"
        )


def config(name: str, **fields: Any) -> MethodConfig:
    """Build the config of any registered method by its registry name (or alias)."""
    cls = method_class(name)
    preset = dict(_ALIASES[name][1]) if name in _ALIASES else {}
    _check_fields(cls, fields, where=f"config({name!r})")
    return cls(**{**preset, **fields})


def from_json(data: dict[str, Any] | str) -> MethodConfig:
    """The config saved by `to_json()` (a dict, or its JSON text)."""
    if isinstance(data, str):
        data = json.loads(data)
    if "method" not in data:
        raise PeftlabError("config JSON has no 'method' key; add e.g. \"method\": \"lora\"")
    data = dict(data)
    return config(data.pop("method"), **data)


_loaded = False


def _load_builtin_methods() -> None:
    # Importing the methods package registers every method file in it.
    global _loaded
    if not _loaded:
        _loaded = True
        from . import methods as _  # noqa: F401
