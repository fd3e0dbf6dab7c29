"""The run config of `peftlab train`: its schema, defaults, overrides and validation.

A run config is a YAML mapping with these sections (every key optional). The dataclasses
below are the defaults' one source: the embedded default job (`default_dict`) is generated
from them, and `peftlab train --print-config` shows them all:

    model:     minilm-l6 | smollm2-135m | a local transformers checkpoint directory; or
               {name: <one of those>, quantize: nf4 | int8}: the base's linear layers quantized
               (peftlab.quantize), the adapter trained on top (QLoRA)
    task:      a registered task (data.py: movie-sentiment, trec-coarse, ...) | file
    data:      path/kind/columns of a `file` task, max_length, split fractions, limit
    method:    {name: <registered method>, <its fields>...}
    optimizer: {name: <a peftlab.optim name: adamw, galore, sam, ...; or a torch.optim class>, lr, <its fields>...}
    loss:      {name: <a peftlab.losses name, or a torch.nn.functional function>, <its fields>...}
    schedule:  {name: constant | linear | cosine | ..., warmup_ratio}
    train:     batch_size (per process), epochs or steps, eval/save/log cadence, ...
    seed:      one integer seeds the split, the initialisation and the data order
    noise:     {kind: uniform | class_dependent, rate, seed}: label noise on the training split
               (absent or null: none; data.label_noise says how)
    output:    the run directory (default: runs/<model>-<task>-<method>-<time>)

`validate` checks everything that can be checked without loading a model: unknown keys,
types and ranges, that the method and its fields exist, that the optimizer and loss exist
and accept the given arguments, that the data packages and files are present. Each error
names the key and what is allowed.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import os
import pathlib
import re
from typing import Any

import yaml

from . import data as tasks
from ..errors import PeftlabError

SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
             "inverse_sqrt")

# The sections named by their `name` key: the default of each (a new name starts its section afresh).
DEFAULT_METHOD = {"name": "lora", "r": 8, "alpha": 16, "targets": ["query", "value"]}
DEFAULT_OPTIMIZER = {"name": "adamw", "lr": 2.0e-3, "weight_decay": 0.0}
DEFAULT_LOSS = {"name": "cross_entropy"}
NAMED_SECTIONS = ("method", "optimizer", "loss")

# Fields marked JOB are written out in the embedded default job (`default_dict`); the others
# take their defaults silently. `peftlab train --print-config` shows every field.
JOB = {"job": True}


def _job(default: Any) -> Any:
    """A field shown in the default job."""
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):  # mutable: a copy per config
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=JOB)
    return dataclasses.field(default=default, metadata=JOB)


# ---- the schema: one dataclass per section with typed, documented fields -------------------


@dataclasses.dataclass
class Data:
    path: str | None = None  # the file of task `file` (.csv or .jsonl)
    kind: str | None = None  # task `file`: classification | sft
    text_column: str = "text"
    label_column: str = "label"
    prompt_column: str = "prompt"
    response_column: str = "response"
    max_length: int = _job(64)  # tokens per example (longer ones are cut)
    split: list = _job([0.8, 0.1, 0.1])  # train/validation/test
    limit: int | None = None  # use only this many examples (before the split): quick trials


@dataclasses.dataclass
class Schedule:
    name: str = _job("linear")
    warmup_ratio: float = _job(0.0)


@dataclasses.dataclass
class Train:
    batch_size: int = _job(32)  # per process
    eval_batch_size: int = 64
    epochs: float = _job(1)  # the default job writes `epochs: 1`; validation reads every value as a float
    steps: int | None = None  # when set, overrides epochs
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    eval_every: int | None = None  # steps between validation runs (None: once, at the end)
    save_every: int = 50  # steps between checkpoints
    log_every: int = 10  # steps between metric lines
    keep_checkpoints: int = 2
    # the loss guard: a logged training loss over this many times the first logged one stops the run
    # (a too high learning rate); null or 0 turns it off. A NaN/inf loss always stops the run.
    max_loss_ratio: float | None = 100.0
    calibration_batches: int = 8  # training batches handed to data-driven initialisations
    progress: bool = True  # progress bars
    group_by_length: bool = False  # batches of similar lengths: less padding, less compute
    # recompute each transformer layer's activations in the backward instead of keeping them
    # (transformers' non-reentrant checkpointing): activation memory of one layer, about a third more compute
    gradient_checkpointing: bool = False


NOISE_KINDS = ("uniform", "class_dependent")


@dataclasses.dataclass
class Noise:
    """Label noise on the training split; validation and test stay clean."""

    kind: str = "uniform"  # uniform: to another class at random | class_dependent: label y -> y + 1 mod K
    rate: float = 0.0  # the share of training labels changed, in [0, 1)
    seed: int | None = None  # None: the run's seed


class ModelName(str):
    """The run's model: its name, a str as every reader of `run.model` expects, and the quantization of
    its base (None: full precision), from `model: {name: ..., quantize: nf4}`."""

    quantize: str | None

    def __new__(cls, name: str, quantize: str | None = None) -> "ModelName":
        model = super().__new__(cls, name)
        model.quantize = quantize
        return model

    def __reduce__(self) -> tuple:  # copies and pickles keep the quantization
        return ModelName, (str(self), self.quantize)

    def to_config(self) -> str | dict[str, str]:
        """As the run config writes it: the plain name when not quantized (existing configs' form)."""
        return str(self) if self.quantize is None else {"name": str(self), "quantize": self.quantize}


@dataclasses.dataclass
class RunConfig:
    model: str = _job("minilm-l6")  # a ModelName once validated
    task: str = _job("movie-sentiment")
    data: Data = _job(Data())
    method: dict = _job(DEFAULT_METHOD)
    optimizer: dict = _job(DEFAULT_OPTIMIZER)
    loss: dict = _job(DEFAULT_LOSS)
    schedule: Schedule = _job(Schedule())
    train: Train = _job(Train())
    seed: int = _job(0)
    # absent from the default job, so runs and bench records without it keep their config hashes
    noise: Noise | None = None
    output: str | None = None

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["model"] = self.model.to_config() if isinstance(self.model, ModelName) else self.model
        return values

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    @property
    def kind(self) -> str:
        """classification or sft, from the task (and data.kind for files)."""
        return tasks.task_kind(self.task, self.data.kind)


SECTIONS = {"data": Data, "schedule": Schedule, "train": Train}  # the sections with a fixed schema
OPTIONAL_SECTIONS = {"noise": Noise}  # a fixed schema too, but absent or null means off


def _shown(value: Any) -> Any:
    """The default job's part of a field's default: a section keeps only its JOB fields."""
    if dataclasses.is_dataclass(value):
        return {f.name: _shown(getattr(value, f.name)) for f in dataclasses.fields(value) if f.metadata.get("job")}
    return copy.deepcopy(value)


def default_dict() -> dict[str, Any]:
    """The embedded default job (`peftlab train` without a config), from the dataclass defaults."""
    defaults = RunConfig()
    return {f.name: _shown(getattr(defaults, f.name)) for f in dataclasses.fields(RunConfig) if f.metadata.get("job")}


# ---- reading and overriding ------------------------------------------------------------------


class AliasRefused(yaml.composer.ComposerError):
    """A YAML alias (*name) in a document read with SafeLoader."""


class SafeLoader(yaml.SafeLoader):
    """yaml.safe_load's reading, without aliases.

    An alias (*name) repeats the node anchored as &name, and aliases of aliases multiply: a
    few hundred bytes expand to a billion values (a "billion laughs" document), which took
    minutes and gigabytes before anything was said. Every alias is refused the moment it is
    read, rather than capping the expansion: run configs and suites never need them (and none
    uses them), and no bound is needed that way. Anchors alone are harmless and pass.
    """

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise AliasRefused(None, None, f"the alias *{event.anchor}", event.start_mark)
        return super().compose_node(parent, index)


def yaml_problem(err: yaml.YAMLError) -> str:
    """One line for what is wrong with a YAML file, where, and the fix (follows the file's name)."""
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = " ".join(str(getattr(err, "problem", None) or err).split())
    if isinstance(err, AliasRefused):
        return (f"uses {problem}{where}: YAML aliases are refused (nested ones can expand a small file to "
                "gigabytes); write the values out in full")
    return f"is not valid YAML{where} ({problem}): fix the syntax, e.g. close brackets and quote values holding ':'"


class _Loader(SafeLoader):
    """YAML as users write it: `5e-4` is a float (YAML 1.1 reads it as a string without a dot)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def _load_yaml(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except RecursionError:  # the composer recurses once per level: thousands of [[[...
        raise yaml.YAMLError("lists or mappings nested thousands deep") from None


def read_yaml(path: str | pathlib.Path) -> dict[str, Any]:
    path = pathlib.Path(path)
    if not path.exists():
        raise PeftlabError(f"config file {path} does not exist: check the path")
    if path.is_dir():
        raise PeftlabError(f"config file {path} is a folder: give the YAML file itself")
    try:  # a file, or a pipe or device (`peftlab train <(...)`, /dev/stdin): read once, either way
        data = _load_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise PeftlabError(f"config file {path} is not UTF-8 text (bad byte at offset {err.start}): "
                           "give a YAML text file") from None
    except yaml.YAMLError as err:
        raise PeftlabError(f"config file {path} {yaml_problem(err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise PeftlabError(f"config file {path} must hold a mapping (key: value lines), not a {type(data).__name__}")
    return data


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """`update` over `base`, section by section. A new method/optimizer/loss name starts that
    section from its own defaults, keeping only the fields it shares with the old name whose
    values were chosen (the default LoRA's `r` 8 is not VeRA's `r`; a chosen `r: 16` carries)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if key == "model" and isinstance(value, dict) and isinstance(out.get(key), str):
            out[key] = {"name": out[key]}  # --set model.quantize=nf4 keeps the model's name
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            if key in NAMED_SECTIONS and value.get("name", out[key].get("name")) != out[key].get("name"):
                kept = _accepted(key, value["name"], out[key])
                out[key] = merge(kept, value)
            else:
                out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _accepted(section: str, name: str, old: dict[str, Any]) -> dict[str, Any]:
    """The fields of `old` that the newly named method/optimizer/loss also takes, less those
    that only hold the old name's own default."""
    from .adaptation import BASELINES

    if section == "method" and name in BASELINES:  # head-only, full: no fields to keep
        return {"name": name}
    try:
        names = set(_field_defaults(section, name))
    except (PeftlabError, TypeError, ValueError):  # an unknown name: validation will say so
        return {**old, "name": name}
    try:
        old_defaults = _field_defaults(section, old.get("name"))
    except (PeftlabError, TypeError, ValueError):
        old_defaults = {}
    unset = object()
    return {"name": name, **{k: v for k, v in old.items()
                             if k in names and k != "name" and old_defaults.get(k, unset) != v}}


def _field_defaults(section: str, name: Any) -> dict[str, Any]:
    """{field: default} of a method config, an optimizer or a loss (fields without one: a marker)."""
    from .adaptation import BASELINES

    if section == "method":
        if name in BASELINES:
            return {}
        from .. import registry

        return {f.name: f.default for f in dataclasses.fields(registry.method_class(name))}
    target = optimizer_class(name) if section == "optimizer" else loss_function(name)
    return {k: p.default for k, p in inspect.signature(target).parameters.items()}


def parse_override(text: str) -> dict[str, Any]:
    """`train.batch_size=16` -> {"train": {"batch_size": 16}}; the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise PeftlabError(f"--set {text!r} is not key=value: write e.g. --set train.batch_size=16")
    try:
        value = _load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise PeftlabError(f"--set {text!r}: the value is not valid YAML; quote strings with special characters") from None
    out: dict[str, Any] = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def build(config_path: str | None = None, overrides: list[str] = (), base: dict[str, Any] | None = None) -> RunConfig:
    """The validated run config: defaults, then the file, then each --set override."""
    data = default_dict() if base is None else base
    if config_path:
        data = merge(data, read_yaml(config_path))
    for text in overrides:
        data = merge(data, parse_override(text))
    return validate(data)


# ---- validation ------------------------------------------------------------------------------


_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "list": list, "dict": dict}
_TYPE_NAMES = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true/false", "list": "a list",
               "dict": "a mapping", "None": "empty"}


def _check_value(key: str, value: Any, annotation: str) -> Any:
    """One field's value against its annotation string (e.g. 'int | None')."""
    options = [a.strip() for a in annotation.split("|")]
    if value is None and "None" in options:
        return None
    for option in options:
        kind = _TYPES.get(option)
        if kind is None or isinstance(value, bool) and kind is not bool:
            continue
        if kind is float and isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, kind):
            return value
    wanted = " or ".join(_TYPE_NAMES[o] for o in options)
    raise PeftlabError(f"config key {key} = {value!r} has the wrong type: give {wanted}")


def _section(cls: type, values: Any, where: str) -> Any:
    if not isinstance(values, dict):
        raise PeftlabError(f"config key {where} must be a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise PeftlabError(f"unknown config key(s) {', '.join(f'{where}.{k}' for k in unknown)}; "
                           f"{where} allows: {', '.join(fields)}")
    given = {**dataclasses.asdict(cls()), **values}  # defaults are checked (and typed: 1 -> 1.0) like values
    return cls(**{k: _check_value(f"{where}.{k}", v, fields[k].type) for k, v in given.items()})


def _positive(key: str, value: Any, allow_zero: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise PeftlabError(f"config key {key} = {value!r} must be {'>= 0' if allow_zero else '> 0'}")


def validate(data: dict[str, Any]) -> RunConfig:
    if not isinstance(data, dict):
        raise PeftlabError("a run config must be a mapping of sections (model, task, data, method, ...)")
    top = {f.name: f for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(data) - set(top))
    if unknown:
        raise PeftlabError(f"unknown config key(s) {unknown}; allowed top-level keys: {', '.join(top)}")
    _check_finite(data, "")
    values = {}
    for key, value in data.items():
        if key in SECTIONS:
            values[key] = _section(SECTIONS[key], value or {}, key)
        elif key in NAMED_SECTIONS:
            values[key] = _named(key, value)
        elif key in OPTIONAL_SECTIONS:
            values[key] = None if value is None else _section(OPTIONAL_SECTIONS[key], value, key)
        elif key == "model":
            values[key] = _model(value)
        else:
            values[key] = _check_value(key, value, top[key].type)
    for key, cls in SECTIONS.items():  # a section left out holds its (typed) defaults
        if key not in values:
            values[key] = _section(cls, {}, key)
    run = RunConfig(**values)
    _check_ranges(run)
    _check_task(run)
    _check_method(run)
    _check_optimizer(run)
    _check_loss(run)
    _check_noise(run)
    from . import models

    models.check(run.model, run.kind)
    return run


def _check_finite(value: Any, key: str) -> None:
    """No nan or infinity anywhere: typed fields and the free method/optimizer/loss sections, nested
    values too. A nan learning rate or alpha would train to nan without a word."""
    if isinstance(value, dict):
        for name, item in value.items():
            _check_finite(item, f"{key}.{name}" if key else str(name))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_finite(item, f"{key}[{index}]")
    elif isinstance(value, float) and not math.isfinite(value):
        raise PeftlabError(f"config key {key} = {value!r} is not a finite number: give a finite one "
                           "(YAML reads .nan, .inf and too large exponents such as 1e999 as non-finite)")


def _model(value: Any) -> ModelName:
    """`model: NAME` or `model: {name: NAME, quantize: nf4 | int8 | null}`."""
    from ..quantize import SCHEMES

    if isinstance(value, str):
        return ModelName(value)
    example = "e.g. model: {name: smollm2-135m, quantize: nf4}"
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise PeftlabError(f"config key model = {value!r} must be a model name or a mapping with a name, {example}")
    unknown = sorted(set(value) - {"name", "quantize"})
    if unknown:
        raise PeftlabError(f"unknown config key(s) {', '.join(f'model.{k}' for k in unknown)}; model allows: name, quantize")
    quantize = value.get("quantize")
    if quantize is not None and quantize not in SCHEMES:
        raise PeftlabError(f"config key model.quantize = {quantize!r} is unknown: use one of {', '.join(SCHEMES)} "
                           "(or leave it out for a full-precision base)")
    return ModelName(value["name"], quantize)


def _named(key: str, value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise PeftlabError(f"config key {key} needs a name, e.g. {key}: {{name: ...}}; got {value!r}")
    return dict(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_ranges(run: RunConfig) -> None:
    d, t = run.data, run.train
    _positive("data.max_length", d.max_length)
    _positive("data.limit", d.limit)
    if len(d.split) != 3 or not all(_is_number(x) and x >= 0 for x in d.split) \
            or abs(sum(d.split) - 1) > 1e-6 or d.split[0] <= 0:
        raise PeftlabError(f"config key data.split = {d.split!r} must be three fractions (train, validation, test) "
                           "that sum to 1, e.g. [0.8, 0.1, 0.1]")
    for key in ("batch_size", "eval_batch_size", "grad_accum", "save_every", "log_every", "keep_checkpoints"):
        _positive(f"train.{key}", getattr(t, key))
    _positive("train.epochs", t.epochs)
    _positive("train.steps", t.steps)
    _positive("train.eval_every", t.eval_every)
    _positive("train.max_grad_norm", t.max_grad_norm)
    _positive("train.calibration_batches", t.calibration_batches)
    if t.max_loss_ratio is not None and t.max_loss_ratio != 0 and not t.max_loss_ratio > 1:
        raise PeftlabError(f"config key train.max_loss_ratio = {t.max_loss_ratio!r} must be > 1 (or null or 0 "
                           "to turn the loss guard off)")
    if run.schedule.name not in SCHEDULES:
        raise PeftlabError(f"config key schedule.name = {run.schedule.name!r} is unknown; allowed: {', '.join(SCHEDULES)}")
    if not 0 <= run.schedule.warmup_ratio < 1:
        raise PeftlabError(f"config key schedule.warmup_ratio = {run.schedule.warmup_ratio!r} must be in [0, 1)")


def _check_task(run: RunConfig) -> None:
    if run.task not in tasks.task_names():
        raise PeftlabError(f"config key task = {run.task!r} is unknown; allowed: {', '.join(tasks.task_names())} "
                           "(task: file reads data.path)")
    if run.task == tasks.FILE_TASK:
        if not run.data.path:
            raise PeftlabError("task: file needs data.path (a .csv or .jsonl file)")
        if run.data.kind not in tasks.KINDS:
            raise PeftlabError(f"task: file needs data.kind: classification (text + label columns) or sft "
                               f"(prompt + response columns); got {run.data.kind!r}")
        if not pathlib.Path(run.data.path).is_file():
            raise PeftlabError(f"config key data.path = {run.data.path!r}: no such file")
    else:
        tasks.package_dir(tasks.TASKS[run.task].package)


def _check_method(run: RunConfig) -> None:
    from .. import registry
    from . import adaptation

    if run.method["name"] in adaptation.BASELINES:  # head-only, full: not adapter methods, no fields
        adaptation.check_baseline_fields(run.method)
        return
    try:
        # The recipe fills run fields from the data (the step count); a stand-in serves the check.
        fields = with_run_fields(run.method, run_field_values(run, train_examples=None))
        fields.pop("name")
        registry.config(run.method["name"], **fields)
    except PeftlabError as err:
        raise PeftlabError(f"config key method: {err}") from None
    except TypeError as err:  # a field of the wrong type that the method's own checks did not catch
        raise PeftlabError(f"config key method: {err}; see the method's fields with `peftlab methods`") from None
    quantized = isinstance(run.model, ModelName) and run.model.quantize is not None
    if run.method.get("init") == "loftq" and not quantized:  # LoftQ fits A, B to what quantizing the base loses
        raise PeftlabError("config key method.init = 'loftq' needs a quantized base: set model: {name: "
                           f"{run.model}, quantize: nf4}} (or int8), or choose another init (e.g. gaussian)")


def run_field_values(run: RunConfig, train_examples: int | None) -> dict[str, Any]:
    """What methods' `run_fields` take from the run: its optimizer steps and learning rate.

    Steps: train.steps, else the Trainer's count for train.epochs over `train_examples`
    (None, before the data is read: a stand-in of 10**9 for checking the config).
    """
    steps = run.train.steps
    if steps is None:
        if train_examples is None:
            steps = 10 ** 9
        else:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            batches = math.ceil(train_examples / (run.train.batch_size * world))  # per process and epoch
            steps = math.ceil(run.train.epochs * max(math.ceil(batches / run.train.grad_accum), 1))
    return {"total_steps": steps, "lr": run.optimizer.get("lr")}


def with_run_fields(method: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """The method section with `values` in the run fields it declares and leaves unset."""
    from .. import registry
    from . import adaptation

    filled = dict(method)
    if method["name"] not in adaptation.BASELINES:
        for name in registry.method_class(method["name"]).run_fields:
            if filled.get(name) is None:
                filled[name] = values[name]
    return filled


def optimizer_class(name: str) -> type:
    """The optimizer a run config names (case-insensitive): a registered one's config class
    (peftlab.optim: adamw, sgd, adafactor, galore, fira, frugal, adam_atan2, sam), else a
    torch.optim class by its class name (e.g. RMSprop)."""
    import torch

    from .. import optim

    registered = optim.optimizers()
    if name.lower() in registered:
        return optim.registry.optimizer_config_class(name.lower())
    candidates = {n.lower(): getattr(torch.optim, n) for n in dir(torch.optim)
                  if inspect.isclass(getattr(torch.optim, n)) and issubclass(getattr(torch.optim, n), torch.optim.Optimizer)
                  and getattr(torch.optim, n) is not torch.optim.Optimizer}
    if name.lower() not in candidates:
        raise PeftlabError(f"config key optimizer.name = {name!r} is unknown; allowed: {', '.join(registered)} "
                           f"(or a torch.optim class name: {', '.join(sorted(set(candidates) - set(registered)))})")
    return candidates[name.lower()]


def _check_kwargs(key: str, target: Any, kwargs: dict[str, Any], skip: int) -> None:
    params = list(inspect.signature(target).parameters.values())[skip:]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    allowed = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise PeftlabError(f"unknown config key(s) {', '.join(f'{key}.{k}' for k in unknown)}; "
                           f"{key} allows: name, {', '.join(allowed)}")
    # a dataclass (a registered optimizer's config): its defaults, factory-made ones too
    defaults = dataclasses.asdict(target()) if dataclasses.is_dataclass(target) else {}
    for param in params:
        if param.name in kwargs:
            _check_like_default(f"{key}.{param.name}", kwargs[param.name], defaults.get(param.name, param.default))


def _check_like_default(key: str, value: Any, default: Any) -> None:
    """An optimizer's or loss's argument shaped like the function's own default: a number for a
    number, true/false for a flag, [a, b] for a pair. Where the default is a single value (or
    none), a list or mapping would reach torch as something it cannot use, mid-run."""
    if isinstance(default, bool):
        fits, wanted = isinstance(value, bool), "true or false"
    elif _is_number(default):
        fits, wanted = _is_number(value), "a number"
    elif isinstance(default, str):
        fits, wanted = isinstance(value, str), "a string"
    elif isinstance(default, (tuple, list)) and all(_is_number(d) for d in default):
        fits = isinstance(value, list) and len(value) == len(default) and all(_is_number(v) for v in value)
        wanted = f"a list of {len(default)} numbers, like its default {list(default)}"
    elif isinstance(default, dict):  # a mapping field (SAM's base_fields)
        fits, wanted = isinstance(value, dict), "a mapping, e.g. {weight_decay: 0.01}"
    else:
        fits, wanted = not isinstance(value, (list, dict)), "a single value, not a list or mapping"
    if not fits:
        raise PeftlabError(f"config key {key} = {value!r} has the wrong shape: give {wanted}")


def _check_optimizer(run: RunConfig) -> None:
    from ..optim import OptimizerConfig

    kwargs = {k: v for k, v in run.optimizer.items() if k != "name"}
    optimizer = optimizer_class(run.optimizer["name"])
    if "lr" not in kwargs:
        raise PeftlabError("config key optimizer.lr is missing: give a learning rate, e.g. optimizer: {lr: 5.0e-4}")
    _check_value("optimizer.lr", kwargs["lr"], "float")
    _positive("optimizer.lr", kwargs["lr"])
    _check_baseline_optimizer(run)
    if not issubclass(optimizer, OptimizerConfig):
        _check_kwargs("optimizer", optimizer, kwargs, skip=1)  # skip params
        return
    _check_kwargs("optimizer", optimizer, kwargs, skip=0)
    try:  # the ranges; a projection rank against the matrices is checked when the optimizer is built
        optimizer(**kwargs)  # (loop.build_optimizer), the first moment the parameters are known
    except PeftlabError as err:
        raise PeftlabError(f"config key optimizer: {err}") from None
    if optimizer.two_pass and run.train.grad_accum > 1:
        raise PeftlabError(f"config key train.grad_accum = {run.train.grad_accum}: optimizer {optimizer.name} takes "
                           "two gradients per step and cannot accumulate them; set train.grad_accum: 1")


def _check_baseline_optimizer(run: RunConfig) -> None:
    """full-galore, full-fira, full-frugal are full fine-tuning with that optimizer: the run must name it."""
    from .adaptation import BASELINE_OPTIMIZERS

    wanted = BASELINE_OPTIMIZERS.get(run.method["name"])
    if wanted is not None and run.optimizer["name"].lower() != wanted:
        raise PeftlabError(f"config key optimizer.name = {run.optimizer['name']!r}: method {run.method['name']} is full "
                           f"fine-tuning with optimizer {wanted}; set optimizer.name: {wanted} (or use method full)")


def loss_function(name: str):
    """A loss by name: a peftlab.losses config class (cross_entropy, the robust losses), else a
    torch.nn.functional function taking (logits, labels), e.g. nll_loss."""
    import torch.nn.functional as F

    from ..losses import loss_class, losses

    if name in losses():
        return loss_class(name)
    fn = getattr(F, name, None)
    if callable(fn) and not inspect.isclass(fn) and not name.startswith("_"):
        return fn
    raise PeftlabError(f"config key loss.name = {name!r} is unknown; allowed: {', '.join(losses())} "
                       "(see `peftlab losses`), or a torch.nn.functional loss taking (logits, labels)")


def _check_loss(run: RunConfig) -> None:
    from ..losses import losses

    name = run.loss["name"]
    target = loss_function(name)
    kwargs = {k: v for k, v in run.loss.items() if k != "name"}
    reserved = sorted(set(kwargs) & {"input", "target", "reduction", "ignore_index"})
    if reserved:
        raise PeftlabError(f"config key(s) {', '.join(f'loss.{k}' for k in reserved)} are set by the recipe; remove them")
    if name not in losses():
        _check_kwargs("loss", target, kwargs, skip=2)  # skip (logits, labels)
        return
    _check_kwargs("loss", target, kwargs, skip=0)  # a config class: its parameters are its fields
    try:
        target(**kwargs)
    except PeftlabError as err:
        raise PeftlabError(f"config key loss: {err}") from None
    if target.needs_example_ids and run.kind != "classification":
        raise PeftlabError(f"config key loss.name = {name!r} needs example ids, which only classification tasks "
                           f"give (task {run.task} is {run.kind or 'unknown'}: its loss is per token); "
                           "use ldr_kl, its fixed-lambda form")


def _check_noise(run: RunConfig) -> None:
    noise = run.noise
    if noise is None:
        return
    if noise.kind not in NOISE_KINDS:
        raise PeftlabError(f"config key noise.kind = {noise.kind!r} is unknown; allowed: {', '.join(NOISE_KINDS)}")
    if not 0 <= noise.rate < 1:
        raise PeftlabError(f"config key noise.rate = {noise.rate!r} must be in [0, 1): the share of training "
                           "labels changed")
    _positive("noise.seed", noise.seed, allow_zero=True)
    if run.kind != "classification":
        raise PeftlabError(f"config key noise: label noise needs a classification task; task {run.task} is "
                           f"{run.kind or 'unknown'}: remove the noise section")
