"""Saving and loading adapters: peftlab's own format, and the `peft` format in both directions.

Both formats are a directory holding the two files `peft` uses; nothing is ever unpickled:

    adapter_config.json         what was attached, as JSON
    adapter_model.safetensors   the tensors

`load` tells the two apart by the config's content: peftlab's has "format": "peftlab", peft's
has a "peft_type".

peftlab format: save(model, dir) / load(model, dir). Exact round trip for every method.
    adapter_config.json
        {"format": "peftlab", "format_version": 1, "peftlab_version": "0.1.0",
         "adapters": {name: {"config": <config.to_json()>,
                             "sites": {site: {"kind": "linear", "shape": [out, in]}},
                             "also_train": {parameter: shape}}},
         "active": [names], "tensors_sha256": <sha256 of the tensor file>}
    adapter_model.safetensors
        every adapter tensor under the key model.state_dict() gives it
        (`<site>.adapters.<name>.A`, buffers such as PiSSA's A0/B0 included), and each
        also_train parameter under its own name (`classifier.weight`).
    "sites" fingerprints the base model: load compares it with the model before changing
    anything, so an adapter made for another model fails with a message naming the layer
    rather than leaving a half-attached model. The checksum catches damage that safetensors'
    own header checks cannot see (a flipped byte inside a tensor).

peft format: save(model, dir, format="peft") = export_peft; load detects it = import_peft.
    One adapter per directory, laid out as peft's save_pretrained does: "default" at the top,
    any other name in a subdirectory of that name. Tensor keys (peftlab's shapes in brackets
    where they differ):
        base_model.model.<site>.lora_A.weight          (r, in)           Linear, Conv1D
        base_model.model.<site>.lora_B.weight          (out, r)
        base_model.model.<site>.lora_A.weight          (r, cin, kh, kw)  Conv2d  [(r, cin*kh*kw)]
        base_model.model.<site>.lora_B.weight          (out, r, 1, 1)            [(out, r)]
        base_model.model.<site>.lora_embedding_A       (r, num)          Embedding
        base_model.model.<site>.lora_embedding_B       (dim, r)
        base_model.model.<site>.lora_magnitude_vector  (out,)            DoRA's m
        base_model.model.<module>.<parameter>          also_train  <->  modules_to_save
    Sites are written as exact names in target_modules, per-site rank and alpha (peftlab's
    overrides) as rank_pattern / alpha_pattern entries keyed "^<escaped site name>", and a
    Conv1D site sets fan_in_fan_out.

    PiSSA and OLoRA move s B0 A0 out of the base weight while attached. A peft file of that
    form only works on a base that peft first re-initialises the same way, so export writes
    what peft's `path_initial_model_for_weight_conversion` writes instead: a plain LoRA on
    the ORIGINAL base weights,
        dW = s B A - s B0 A0 = s [B, -B0] @ [A; A0]          rank 2r,
    with alpha set so that peft's scale (alpha / 2r; rsLoRA: alpha / sqrt(2r)) is still s.
    The loaded result computes the same function; the SVD/QR structure is not kept.

    Every other method whose change of a weight is a low-rank product (its adapters return
    lora_factors(): VeRA, AdaLoRA, SoRA, LoRA-SB, NOLA, SVFit, EVA, ...) is written as a plain
    LoRA with those factors and scale 1 (lora_alpha = r, per site through the patterns) and no
    dropout: peft, and whatever serves peft LoRA files, computes the same outputs, and
    training there continues as LoRA. The method's own structure (shared bases, gates,
    frozen factors) is not kept. DoRA-like rescalings, sparse parts (DSEE) and full-rank
    changes (RandLoRA) are refused: merge those into the model instead.

    Import maps r, lora_alpha, use_rslora, use_dora, lora_dropout, rank_pattern,
    alpha_pattern, modules_to_save, fan_in_fan_out and init_lora_weights. The adapted sites
    are read from the tensor names: they are what target_modules, exclude_modules,
    layers_to_transform and layers_pattern selected when the adapter was made. fan_in_fan_out
    needs no field of its own, since peftlab recognises Conv1D by its type (peft, too,
    corrects the flag per layer). A file saved straight from a peft PiSSA/OLoRA model
    (init_lora_weights "pissa" or "olora", not converted) is imported the way peft loads it:
    the initial factors are recomputed from the base weights (exact SVD/QR: deterministic)
    and the saved A, B continue from them. Fields peftlab cannot honour (bias, lora_bias,
    LoftQ, CorDA, LoRA-GA, randomised PiSSA, layer replication, trainable tokens, ...) raise
    PeftlabError naming the field.

Writes are atomic per file (temporary file in the same directory, fsync, os.replace), and the
tensors are written before the config, so a config on disk never announces tensors that are
not there yet.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors import SafetensorError
from safetensors.torch import load as tensors_from_bytes
from safetensors.torch import save as tensors_to_bytes
from torch import Tensor, nn

from . import core
from .core import ADAPTERS
from .errors import PeftlabError
from .hosts import HostKind, host_kind
from .registry import MethodConfig, config as make_config, from_json, method_class
from .targets import overrides_for

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FORMAT = "peftlab"
FORMAT_VERSION = 1
PEFT_PREFIX = "base_model.model."
_DAMAGED = "re-save the adapter, or download it again"


# ---- files: atomic writes, careful reads ---------------------------------------------------


def _write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a reader sees the old file or the new one, never a part."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666: the umask applies, as for open()
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)  # make the rename itself durable


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _make_directory(directory: str | os.PathLike) -> Path:
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise PeftlabError(f"{directory} is a file; adapters are saved into a directory: pass a directory path")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _json_bytes(document: dict) -> bytes:
    return (json.dumps(document, indent=2) + "\n").encode("utf-8")


def _tensor_bytes(tensors: dict[str, Tensor]) -> bytes:
    # clone: safetensors refuses tensors sharing storage (tied weights, views of one buffer)
    return tensors_to_bytes({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()},
                            metadata={"format": "pt"})


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PeftlabError(f"{path} is not valid JSON ({err}): the file is damaged; {_DAMAGED}") from None
    if not isinstance(data, dict):
        raise PeftlabError(f"{path} holds a JSON {type(data).__name__}, not an adapter config object; {_DAMAGED}")
    return data


def _read_tensors(path: Path, sha256: str | None = None) -> dict[str, Tensor]:
    if not path.is_file():
        raise PeftlabError(f"{path} is missing: its directory has a config but no tensors; {_DAMAGED}")
    data = path.read_bytes()
    try:
        tensors = tensors_from_bytes(data)
    except SafetensorError as err:
        raise PeftlabError(f"{path} is damaged: it cannot be read as safetensors ({err}); {_DAMAGED}") from None
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise PeftlabError(f"{path} is damaged: its checksum differs from the one recorded in {CONFIG_FILE} "
                           f"(changed bytes, or a save that did not finish); {_DAMAGED}")
    return tensors


def _no_adapter_files(directory: Path) -> PeftlabError:
    if not directory.exists():
        return PeftlabError(f"{directory} does not exist: pass the directory peftlab.save (or peft's "
                            "save_pretrained) wrote")
    if (directory / "adapter_model.bin").exists():
        return PeftlabError(f"{directory} holds adapter_model.bin, a pickle, which peftlab never loads: re-save it as "
                            "safetensors (peft: model.save_pretrained(dir, safe_serialization=True))")
    return PeftlabError(f"{directory} holds no adapter files: expected {CONFIG_FILE} and {WEIGHTS_FILE}, as written "
                        "by peftlab.save or peft's save_pretrained")


def _pick(available: Iterable[str], name: str | Iterable[str] | None, where: Path) -> list[str]:
    available = list(available)
    if name is None:
        return available
    wanted = [name] if isinstance(name, str) else list(name)
    unknown = [n for n in wanted if n not in available]
    if unknown:
        raise PeftlabError(f"{where} holds no adapter named {unknown[0]!r}; it holds {available}")
    return wanted


# ---- the public functions ------------------------------------------------------------------


def save(model: nn.Module, directory: str | os.PathLike, format: str = FORMAT,
         name: str | Iterable[str] | None = None) -> Path:
    """Write the attached adapters (all, or those named) and their also_train parameters.

    format="peftlab" keeps everything (any method, several adapters, the active set);
    format="peft" writes files `peft.PeftModel.from_pretrained` loads (LoRA, DoRA and every
    method whose change is low-rank, written as a LoRA).
    Returns the directory.
    """
    if format == "peft":
        return export_peft(model, directory, name)
    if format != FORMAT:
        raise PeftlabError(f"unknown format {format!r}: use 'peftlab' (every method, exact round trip) "
                           "or 'peft' (LoRA, DoRA and the other low-rank methods, for the peft library)")
    state = core._state(model)
    names = core._names(state, name)
    params = dict(model.named_parameters())
    tensors: dict[str, Tensor] = {}
    entries = {}
    for n in names:
        group = state.groups[n]
        sites = {}
        for site, adapter in group.sites.items():
            host = model.get_submodule(site)
            sites[site] = {"kind": adapter.kind.name, "shape": list(adapter.kind.matrix(host).shape)}
            tensors.update({f"{site}.{ADAPTERS}.{n}.{k}": t for k, t in adapter.state_dict().items()})
        also = {k: params[k] for k in state.also_train[n]}
        tensors.update(also)
        entries[n] = {"config": group.config.to_json(), "sites": sites,
                      "also_train": {k: list(p.shape) for k, p in also.items()}}
    payload = _tensor_bytes(tensors)
    from . import __version__  # here, not at the top: the package imports this module while it initialises

    document = {"format": FORMAT, "format_version": FORMAT_VERSION, "peftlab_version": __version__,
                "adapters": entries, "active": [n for n in state.active if n in names],
                "tensors_sha256": hashlib.sha256(payload).hexdigest()}
    directory = _make_directory(directory)
    _write_atomic(directory / WEIGHTS_FILE, payload)
    _write_atomic(directory / CONFIG_FILE, _json_bytes(document))
    return directory


def load(model: nn.Module, directory: str | os.PathLike, name: str | Iterable[str] | None = None) -> nn.Module:
    """Attach the adapters saved in `directory` (all, or those named); the format is detected.

    Everything is read and checked against the model first; on any error the model is left
    exactly as it was. Returns the model.
    """
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if config_path.is_file():
        document = _read_json(config_path)
        if document.get("format") == FORMAT:
            plans, active = _peftlab_plans(directory, document, name)
            return _install(model, plans, active)
        if "peft_type" not in document:
            raise PeftlabError(f"{config_path} is neither a peftlab adapter config (no \"format\": \"peftlab\") nor "
                               "a peft one (no \"peft_type\"): pass a directory written by peftlab.save or peft's "
                               "save_pretrained")
    layout = _peft_layout(directory)
    plans = [_peft_plan(model, layout[n], n) for n in _pick(layout, name, directory)]
    return _install(model, plans, None)


def import_peft(model: nn.Module, directory: str | os.PathLike, name: str = "default") -> nn.Module:
    """Attach the peft LoRA/DoRA adapter saved in `directory` under `name`. Returns the model."""
    directory = Path(directory)
    if not (directory / CONFIG_FILE).is_file():
        raise _no_adapter_files(directory)
    return _install(model, [_peft_plan(model, directory, name)], None)


def export_peft(model: nn.Module, directory: str | os.PathLike,
                name: str | Iterable[str] | None = None) -> Path:
    """Write adapters as peft's save_pretrained would write a LoRA (or DoRA); returns the directory.

    "default" goes to `directory`, any other name to `directory/<name>` (peft's layout).
    Every adapter is checked before anything is written.
    """
    state = core._state(model)
    names = core._names(state, name)
    with torch.no_grad():
        documents = {n: _peft_document(model, state, n) for n in names}
    directory = _make_directory(directory)
    for n, (document, tensors) in documents.items():
        target = directory if n == "default" else _make_directory(directory / n)
        _write_atomic(target / WEIGHTS_FILE, _tensor_bytes(tensors))
        _write_atomic(target / CONFIG_FILE, _json_bytes(document))
    return directory


# ---- attaching what was read: one path for both formats ------------------------------------


@dataclass
class _Plan:
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


def _install(model: nn.Module, plans: list[_Plan], active: list[str] | None) -> nn.Module:
    for plan in plans:  # every check before the first change
        _check_fits(model, plan)
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
        state = core._state(model)
        core.set_active(model, [n for n in state.active if n not in attached or n in active])
    return model


def _not_adaptable(label: str, site: str, module: nn.Module | None) -> PeftlabError:
    what = "no layer" if module is None else f"a {type(module).__name__}, which peftlab cannot adapt, at"
    return PeftlabError(f"{label} was made for another model: this model has {what} {site!r}. "
                        "Load it onto the base model it was trained on")


def _check_fits(model: nn.Module, plan: _Plan) -> None:
    """Raise unless `plan` attaches to this model exactly as it was saved."""
    label = plan.label
    state = model.__dict__.get("_peftlab")
    if state is not None and plan.name in state.groups:
        raise PeftlabError(f"{label}: an adapter named {plan.name!r} is attached already; detach it first "
                           f"(peftlab.detach(model, {plan.name!r})) or load the others with name=[...]")
    modules = dict(model.named_modules())
    for site, (kind, shape) in plan.sites.items():
        module = modules.get(site)
        here = host_kind(module) if module is not None else None
        if here is None:
            raise _not_adaptable(label, site, module)
        if kind is not None and here.name != kind:
            raise PeftlabError(f"{label} was made for another model: {site!r} is a {here.name} layer here, the "
                               f"adapter was made for a {kind} layer. Load it onto the base model it was trained on")
        actual = tuple(here.matrix(module).shape)
        if actual != tuple(shape):
            raise PeftlabError(
                f"{label} was made for another model: layer {site!r} is {actual[0]} x {actual[1]} (out x in) here, "
                f"the adapter was made for {shape[0]} x {shape[1]}. Load it onto the base model it was trained on"
            )
    try:
        selected = [s.name for s in core._sites(model, plan.config)]
        trained = core.also_train_parameters(model, list(plan.config.also_train))
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
                           f"select; {_DAMAGED}")
    for key, value in plan.also_train.items():
        if key not in trained:
            raise PeftlabError(f"{label} was made for another model: it holds a value for parameter {key!r}, which "
                               "this model's also_train modules do not have. Load it onto the base model it was "
                               "trained on")
        if tuple(trained[key].shape) != tuple(value.shape):
            raise PeftlabError(f"{label} was made for another model: parameter {key!r} has shape "
                               f"{tuple(trained[key].shape)} here, the file holds {tuple(value.shape)}. Load it onto "
                               "the base model it was trained on")


def _exact_pattern(model: nn.Module, name: str) -> str:
    """A target pattern matching the module `name` and no other.

    A plain name also matches every module whose name ends in "." + name (peft matches the same
    way); where the model has such a module, an anchored regex is used instead.
    """
    if any(other.endswith("." + name) for other, _ in model.named_modules()):
        return "re:" + re.escape(name)
    return name


# ---- the peftlab format: reading -----------------------------------------------------------

_DOCUMENT_KEYS = {"format", "format_version", "peftlab_version", "adapters", "active", "tensors_sha256"}
_ENTRY_KEYS = {"config", "sites", "also_train"}


def _peftlab_plans(directory: Path, document: dict, name: str | Iterable[str] | None) -> tuple[list[_Plan], list[str]]:
    path = directory / CONFIG_FILE
    unknown = sorted(set(document) - _DOCUMENT_KEYS)
    if unknown:
        raise PeftlabError(f"{path}: unknown field(s) {unknown}; a peftlab adapter config has "
                           f"{sorted(_DOCUMENT_KEYS)}. Remove them, or re-save the adapter")
    version = document.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise PeftlabError(f"{path} has format_version {version!r} (written by peftlab "
                           f"{document.get('peftlab_version')}); this peftlab reads versions up to {FORMAT_VERSION}: "
                           "upgrade peftlab")
    adapters = document.get("adapters")
    if not isinstance(adapters, dict) or not adapters:
        raise PeftlabError(f"{path} lists no adapters under \"adapters\"; {_DAMAGED}")
    wanted = _pick(adapters, name, directory)
    tensors = _read_tensors(directory / WEIGHTS_FILE, document.get("tensors_sha256"))
    plans = [_peftlab_plan(directory, n, adapters[n], tensors) for n in wanted]
    active = document.get("active", list(adapters))
    return plans, list(active)


def _peftlab_plan(directory: Path, name: str, entry: Any, tensors: dict[str, Tensor]) -> _Plan:
    where = f"{directory / CONFIG_FILE}, adapter {name!r}"
    if not isinstance(entry, dict) or not isinstance(entry.get("config"), dict):
        raise PeftlabError(f"{where}: expected an object with a \"config\" object; {_DAMAGED}")
    unknown = sorted(set(entry) - _ENTRY_KEYS)
    if unknown:
        raise PeftlabError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(_ENTRY_KEYS)}. Remove them, "
                           "or re-save the adapter")
    try:
        config = from_json(entry["config"])
    except PeftlabError as err:
        raise PeftlabError(f"{where}: {err}") from None
    try:
        sites = {site: (info["kind"], tuple(int(d) for d in info["shape"])) for site, info in entry["sites"].items()}
        also_keys = list(entry.get("also_train", {}))
    except (KeyError, TypeError, ValueError, AttributeError):
        raise PeftlabError(f"{where}: the \"sites\" fingerprint is malformed; {_DAMAGED}") from None
    missing = [k for k in also_keys if k not in tensors]
    if missing:
        raise PeftlabError(f"{directory / WEIGHTS_FILE} lacks the also_train parameter {missing[0]!r} that "
                           f"{CONFIG_FILE} lists; {_DAMAGED}")
    prefixes = tuple(f"{site}.{ADAPTERS}.{name}." for site in sites)
    own = {k: v for k, v in tensors.items() if k.startswith(prefixes)}
    return _Plan(name, config, own, sites, directory, {k: tensors[k] for k in also_keys})


# ---- the peft format: export ---------------------------------------------------------------

# LoRA and DoRA are written as themselves: peft's use_dora, and their r, alpha, rslora and dropout.
_PEFT_USE_DORA = {"lora": False, "dora": True}


def _peft_document(model: nn.Module, state: core.State, name: str) -> tuple[dict, dict[str, Tensor]]:
    """The adapter_config.json content and the tensors of one adapter in peft's layout."""
    group = state.groups[name]
    config = group.config
    own_form = config.method in _PEFT_USE_DORA
    factors = None if own_form else _low_rank_factors(name, config.method, group.sites)
    use_dora = _PEFT_USE_DORA.get(config.method, False)
    tensors: dict[str, Tensor] = {}
    rank_alpha: dict[str, tuple[int, float]] = {}
    for site, adapter in group.sites.items():
        host = model.get_submodule(site)
        if own_form:
            A, B, rank_alpha[site] = _lora_site(site, host, config, adapter)
        else:  # any low-rank change B @ A, written as a LoRA of scale 1 (alpha = r)
            A, B = factors[site]
            rank_alpha[site] = (A.shape[0], A.shape[0])
        tensors.update(_peft_site_tensors(site, adapter.kind.name, host, A, B))
        if use_dora:
            tensors[f"{PEFT_PREFIX}{site}.lora_magnitude_vector"] = adapter.m
    # The commonest (rank, alpha) is the default; the other sites become pattern entries.
    r, alpha = Counter(rank_alpha.values()).most_common(1)[0][0]
    by_length = sorted(rank_alpha, key=len, reverse=True)
    rank_pattern = {_peft_key(s): rank_alpha[s][0] for s in by_length if rank_alpha[s][0] != r}
    alpha_pattern = {_peft_key(s): _number(rank_alpha[s][1]) for s in by_length if rank_alpha[s][1] != alpha}
    modules_to_save = _peft_modules_to_save(model, config, name, tensors)
    kinds = {a.kind.name for a in group.sites.values()}
    document = {
        "peft_type": "LORA",
        "task_type": None,
        "auto_mapping": {"base_model_class": type(model).__name__, "parent_library": type(model).__module__},
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": _number(alpha),
        "lora_dropout": config.dropout if own_form else 0.0,  # other methods' dropout is not LoRA's
        "use_rslora": config.rslora if own_form else False,
        "use_dora": use_dora,
        "init_lora_weights": True,  # the weights are in the file; peft's init is overwritten on load
        "target_modules": _peft_targets(model, list(group.sites)),
        "exclude_modules": None,
        "fan_in_fan_out": "conv1d" in kinds,  # peft corrects it per layer for mixed Linear/Conv1D models
        "bias": "none",
        "lora_bias": False,
        "modules_to_save": modules_to_save or None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    return document, tensors


def _low_rank_factors(name: str, method: str, sites: dict[str, core.Adapter]) -> dict[str, tuple[Tensor, Tensor]]:
    """site -> (A, B) of each adapter's lora_factors; refuses an adapter that has none."""
    factors = {}
    for site, adapter in sites.items():
        pair = adapter.lora_factors() if adapter.additive else None
        if pair is None:
            raise PeftlabError(
                f"adapter {name!r} is {method!r}, whose change of {site} is not a low-rank product B @ A, so the "
                "peft LoRA format cannot hold it (it holds LoRA, DoRA and every method whose change is low-rank): "
                "save it with format='peftlab', or merge it into the model (peftlab merge)")
        factors[site] = (pair[0].detach(), pair[1].detach())
    return factors


def _lora_site(site: str, host: nn.Module, config: MethodConfig, adapter: core.Adapter
               ) -> tuple[Tensor, Tensor, tuple[int, float]]:
    """A LoRA or DoRA site as peft writes it: (A, B, (r, alpha)) with peft's scale = peftlab's."""
    site_config = config.at_site(overrides_for(site, host, config.overrides))
    A, B = (t.detach() for t in adapter.factors_on_original_base())
    if site_config.dropout != config.dropout:
        warnings.warn(f"{site}: dropout {site_config.dropout} differs from the adapter's {config.dropout}; the "
                      "peft format has one dropout for all layers, so the export uses "
                      f"{config.dropout} (outputs in eval mode are unaffected)", stacklevel=4)
    return A, B, (A.shape[0], _peft_alpha(site_config, A.shape[0], config.rslora))


def _peft_site_tensors(site: str, kind: str, host: nn.Module, A: Tensor, B: Tensor) -> dict[str, Tensor]:
    prefix = PEFT_PREFIX + site
    if kind == "embedding":
        return {f"{prefix}.lora_embedding_A": A, f"{prefix}.lora_embedding_B": B}
    if kind == "conv2d":
        if tuple(host.dilation) != (1, 1):
            raise PeftlabError(f"{site} is a dilated convolution; peft's LoRA applies A without the dilation, so peft "
                               "would compute something else: exclude it from targets to export, or save with "
                               "format='peftlab'")
        # peft: A is a conv with the host's geometry (r, cin, kh, kw), B a 1x1 conv (out, r, 1, 1)
        A = A.reshape(A.shape[0], *host.weight.shape[1:])
        B = B.reshape(*B.shape, 1, 1)
    return {f"{prefix}.lora_A.weight": A, f"{prefix}.lora_B.weight": B}


def _peft_alpha(site_config: MethodConfig, r_peft: int, use_rslora: bool) -> float:
    """The lora_alpha that gives peft's scale, alpha / r_peft (or / sqrt(r_peft)), peftlab's value at this site."""
    def denominator(r: int, rslora: bool) -> float:
        return math.sqrt(r) if rslora else r

    # the ratio first: it is exactly 1.0 (same rank) or 2.0 (residual export) in the common cases
    return site_config.alpha * (denominator(r_peft, use_rslora) / denominator(site_config.r, site_config.rslora))


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def _peft_key(site: str) -> str:
    # peft matches pattern keys with re.match(rf"(.*\.)?({key})$", name): "^" pins the whole name
    return "^" + re.escape(site)


def _peft_targets(model: nn.Module, sites: list[str]) -> list[str] | str:
    """target_modules selecting exactly `sites`: their names, or one regex when a name is ambiguous."""
    if any(_exact_pattern(model, s) != s for s in sites):
        return "(?:" + "|".join(re.escape(s) for s in sites) + ")"  # a string: peft applies re.fullmatch
    return sites


def _peft_modules_to_save(model: nn.Module, config: MethodConfig, name: str, tensors: dict[str, Tensor]) -> list[str]:
    """also_train as peft's modules_to_save; their parameters join `tensors`."""
    if not config.also_train:
        return []
    canonical = {id(p): n for n, p in model.named_parameters()}
    chosen = core._select_any(model, list(config.also_train))
    for module_name in chosen:
        for pname, p in model.get_submodule(module_name).named_parameters():
            if not canonical[id(p)].startswith(module_name + "."):
                raise PeftlabError(
                    f"adapter {name!r} trains {module_name}.{pname}, which is tied to {canonical[id(p)]}; peft "
                    "unties modules_to_save, so it would compute something else: save with format='peftlab'"
                )
            tensors[f"{PEFT_PREFIX}{module_name}.{pname}"] = p
    return chosen


# ---- the peft format: import ---------------------------------------------------------------

# adapter_config.json fields, by what import does with them
_PEFT_MAPPED = {"r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern",
                "modules_to_save", "fan_in_fan_out", "init_lora_weights",
                # the sites come from the tensor names, which these selected when the adapter was made:
                "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern"}
_PEFT_IGNORED = {"peft_type", "task_type", "peft_version", "auto_mapping", "base_model_name_or_path", "revision",
                 "inference_mode", "megatron_core", "qalora_group_size", "runtime_config",
                 # settings of initialisations; the inits that need them are refused through init_lora_weights
                 "eva_config", "corda_config", "loftq_config", "lora_ga_config"}
_PEFT_DEFAULT_ONLY = {"bias": "none", "lora_bias": False, "use_qalora": False, "megatron_config": None,
                      "layer_replication": None, "target_parameters": None, "trainable_token_indices": None,
                      "alora_invocation_tokens": None, "velora_config": None, "monteclora_config": None,
                      "use_bdlora": None, "arrow_config": None, "kasa_config": None, "ensure_weight_tying": False}
# init_lora_weights values whose saved A, B are the whole adapter (the base weights stay as they are)
_PEFT_PLAIN_INITS = (True, False, "gaussian", "orthogonal", "eva")
# ... and those for which peft rewrites the base weights on load: peftlab recomputes the same
_PEFT_RESIDUAL_INITS = ("pissa", "olora")
# peft tensor name endings -> peftlab adapter tensor
_PEFT_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_embedding_A": "A",
                  ".lora_embedding_B": "B", ".lora_magnitude_vector": "m"}


def _peft_layout(directory: Path) -> dict[str, Path]:
    """Adapter name -> directory, as peft's save_pretrained lays several adapters out."""
    layout = {"default": directory} if (directory / CONFIG_FILE).is_file() else {}
    if directory.is_dir():
        for sub in sorted(directory.iterdir()):
            if sub.is_dir() and (sub / CONFIG_FILE).is_file():
                layout.setdefault(sub.name, sub)
    if not layout:
        raise _no_adapter_files(directory)
    return layout


def _check_peft_fields(document: dict, path: Path) -> None:
    if document.get("peft_type") != "LORA":
        raise PeftlabError(f"{path} holds a peft {document.get('peft_type')!r} adapter; peftlab imports peft's LORA "
                           "adapters (LoRA, rsLoRA, DoRA) only")
    for key, value in document.items():
        if key in _PEFT_MAPPED or key in _PEFT_IGNORED:
            continue
        if key in _PEFT_DEFAULT_ONLY:
            if value != _PEFT_DEFAULT_ONLY[key] and value not in (None, False, [], {}):
                raise PeftlabError(f"{path}: {key}={value!r} is a peft feature peftlab cannot honour; it imports "
                                   f"adapters with {key}={_PEFT_DEFAULT_ONLY[key]!r} only")
        elif value not in (None, False, [], {}):
            raise PeftlabError(f"{path}: field {key!r} (= {value!r}) is unknown to peftlab's import (newer peft?); "
                               "if it does not change what the adapter computes, remove it from the file")
    init = document.get("init_lora_weights", True)
    if init not in _PEFT_PLAIN_INITS and init not in _PEFT_RESIDUAL_INITS:
        raise PeftlabError(
            f"{path}: init_lora_weights={init!r} changes the base weights in a way peftlab cannot recompute "
            "exactly; in peft, save the adapter with save_pretrained(dir, path_initial_model_for_weight_conversion="
            "...) to convert it to a plain LoRA, then import that"
        )
    if document.get("use_dora") and init in _PEFT_RESIDUAL_INITS:
        raise PeftlabError(f"{path}: DoRA with init_lora_weights={init!r} is not supported: peftlab's DoRA has no "
                           "SVD/QR initialisation; convert it to a plain LoRA in peft first")


def _peft_pattern_value(patterns: dict, site: str, default: Any) -> Any:
    for key in patterns or {}:  # peft's rule (utils/other.py get_pattern_key): first key that matches
        if re.match(rf"(.*\.)?({key})$", site):
            return patterns[key]
    return default


def _peft_plan(model: nn.Module, directory: Path, name: str) -> _Plan:
    path = directory / CONFIG_FILE
    document = _read_json(path)
    _check_peft_fields(document, path)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file() and (directory / "adapter_model.bin").is_file():
        raise _no_adapter_files(directory)
    per_site, plain = _split_peft_tensors(_read_tensors(weights), weights, model)
    label = f"adapter {name!r} in {directory}"

    method = "dora" if document.get("use_dora") else "lora"
    init = document.get("init_lora_weights", True)
    r, alpha = document.get("r", 8), document.get("lora_alpha", 8)
    modules = dict(model.named_modules())
    state_dict: dict[str, Tensor] = {}
    fingerprint: dict[str, tuple[str | None, tuple[int, ...]]] = {}
    overrides: dict[str, dict[str, Any]] = {}
    for site, parts in per_site.items():
        module = modules.get(site)
        kind = host_kind(module) if module is not None else None
        if kind is None:
            raise _not_adaptable(label, site, module)
        if kind.name not in method_class(method).hosts:
            raise PeftlabError(f"{path}: peft's {method} on the {kind.name} layer {site!r} has no peftlab counterpart "
                               f"(peftlab's {method} adapts {', '.join(method_class(method).hosts)} layers)")
        state_dict.update(_peftlab_site_tensors(site, name, kind, parts, method == "dora", label, weights))
        A = state_dict[f"{site}.{ADAPTERS}.{name}.A"]
        B = state_dict[f"{site}.{ADAPTERS}.{name}.B"]
        fingerprint[site] = (kind.name, (B.shape[0], A.shape[1]))
        # per-site rank (from the tensors, checked against rank_pattern) and alpha, as peft resolves them
        site_r, site_alpha = A.shape[0], _peft_pattern_value(document.get("alpha_pattern"), site, alpha)
        if _peft_pattern_value(document.get("rank_pattern"), site, r) != site_r:
            raise PeftlabError(f"{weights}: layer {site!r} has rank {site_r} but {CONFIG_FILE} gives it rank "
                               f"{_peft_pattern_value(document.get('rank_pattern'), site, r)}: the two files do not "
                               f"belong together; {_DAMAGED}")
        differs = {}
        if site_r != r:
            differs["r"] = site_r
        if site_alpha != alpha:
            differs["alpha"] = site_alpha
        if differs:
            overrides[_exact_pattern(model, site)] = differs

    also_train = _peft_also_train(model, plain, document.get("modules_to_save") or [], label)
    fields = {"r": r, "alpha": alpha, "dropout": document.get("lora_dropout", 0.0),
              "rslora": bool(document.get("use_rslora", False)),
              "targets": [_exact_pattern(model, s) for s in per_site],
              "overrides": overrides,  # exact patterns: each matches one site, so their order is free
              "also_train": sorted({_exact_pattern(model, k.rsplit(".", 1)[0]) for k in also_train})}
    if init in _PEFT_RESIDUAL_INITS:
        fields["init"] = init
    try:
        config = make_config(method, **fields)
    except PeftlabError as err:
        raise PeftlabError(f"{path}: {err}") from None
    return _Plan(name, config, state_dict, fingerprint, directory, also_train,
                 initial_from_base=init in _PEFT_RESIDUAL_INITS)


def _split_peft_tensors(tensors: dict[str, Tensor], weights: Path,
                        model: nn.Module) -> tuple[dict[str, dict[str, Tensor]], dict[str, Tensor]]:
    """peft's tensors as (site -> {peft suffix: tensor}, in model order) and (parameter -> tensor)."""
    per_site: dict[str, dict[str, Tensor]] = {}
    plain: dict[str, Tensor] = {}
    for key, value in tensors.items():
        if not key.startswith(PEFT_PREFIX):
            raise PeftlabError(f"{weights} holds {key!r}, which lacks peft's {PEFT_PREFIX!r} prefix: not a file "
                               "written by peft's save_pretrained")
        rest = key[len(PEFT_PREFIX):]
        suffix = next((s for s in _PEFT_SUFFIXES if rest.endswith(s)), None)
        if suffix is not None:
            per_site.setdefault(rest[: -len(suffix)], {})[suffix] = value
        elif ".lora_" in rest:
            raise PeftlabError(f"{weights} holds {key!r}, a peft LoRA tensor peftlab does not know (lora_bias?); "
                               "peftlab imports lora_A, lora_B, lora_embedding_A/B and lora_magnitude_vector")
        else:
            plain[rest] = value
    if not per_site:
        raise PeftlabError(f"{weights} holds no LoRA tensors; {_DAMAGED}")
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}  # unknown sites last: reported later
    return dict(sorted(per_site.items(), key=lambda item: order.get(item[0], len(order)))), plain


def _peftlab_site_tensors(site: str, name: str, kind: HostKind, parts: dict[str, Tensor], dora: bool, label: str,
                          weights: Path) -> dict[str, Tensor]:
    """One site's peft tensors under peftlab's state-dict keys and shapes."""
    embedding = kind.index_input
    expected = {".lora_embedding_A", ".lora_embedding_B"} if embedding else {".lora_A.weight", ".lora_B.weight"}
    expected |= {".lora_magnitude_vector"} if dora else set()
    if set(parts) != expected:
        raise PeftlabError(f"{label} does not fit: layer {site!r} is a {kind.name} layer here, for which a "
                           f"{'DoRA' if dora else 'LoRA'} file holds {sorted(expected)}, but {weights} holds "
                           f"{sorted(parts)}. Load it onto the base model it was trained on")
    values = {_PEFT_SUFFIXES[suffix]: tensor for suffix, tensor in parts.items()}
    prefix = f"{site}.{ADAPTERS}.{name}."
    # peft's conv factors are 4-d convolutions; peftlab keeps them as (r, cin*kh*kw) and (out, r)
    tensors = {prefix + "A": values["A"].reshape(values["A"].shape[0], -1),
               prefix + "B": values["B"].reshape(values["B"].shape[0], -1)}
    if dora:
        tensors[prefix + "m"] = values["m"].reshape(-1)
    return tensors


def _peft_also_train(model: nn.Module, plain: dict[str, Tensor], modules_to_save: list[str],
                     label: str) -> dict[str, Tensor]:
    """Parameter name -> value for the file's whole-module tensors that change the model.

    modules_to_save always count. peft may also store full embedding matrices (for a resized
    vocabulary, or a targeted embedding); those equal to this model's count for nothing.
    """
    every = dict(model.named_parameters(remove_duplicate=False))  # tied weights under each of their names
    canonical = {id(p): n for n, p in model.named_parameters()}
    values: dict[str, Tensor] = {}
    for key, value in plain.items():
        param = every.get(key)
        if param is None:
            raise PeftlabError(f"{label} was made for another model: it holds parameter {key!r}, which this model "
                               "has not. Load it onto the base model it was trained on")
        # peft's rule: a module is saved when its name (under the wrapper) ends with an entry
        parts = (PEFT_PREFIX + key).split(".")
        owners = [".".join(parts[:i]) for i in range(1, len(parts))]
        listed = any(owner.endswith(m) for owner in owners for m in modules_to_save)
        same = tuple(value.shape) == tuple(param.shape) and torch.equal(value.to(param.dtype), param.detach().cpu())
        if listed or not same:
            values[canonical[id(param)]] = value
    return values


def _initial_factors(model: nn.Module, plan: _Plan) -> dict[str, Tensor]:
    """A0, B0 of a residual init (PiSSA, OLoRA), computed from this model's base weights as attach would."""
    config = plan.config
    factors = {}
    for site in core._sites(model, config):
        adapter = config.at_site(overrides_for(site.name, site.host, config.overrides)).build(site, None, True)
        prefix = f"{site.name}.{ADAPTERS}.{plan.name}."
        factors.update({prefix + "A0": adapter.A0, prefix + "B0": adapter.B0})
    return factors
