"""The `peft` format, both ways: save(model, dir, format="peft"), and load when the config has a "peft_type".

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

What is written comes from the method, not from this module: its config's peft_lora(adapter)
gives each site's factors, scale and extra tensors (a `core.PeftLoRA`), and peft_config()
the keys peft reads besides (use_dora, use_rslora, lora_dropout). LoRA and DoRA declare
themselves that way; every other method is written from its adapters' lora_factors().

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

Other peft adapter types: a method whose config declares a peft_type other than "LORA"
(IA3, LN_TUNING) writes its own tensors and config keys (MethodConfig.peft_export) and reads
them back (peft_import); this module adds the common keys, the prefix, modules_to_save and
the directory layout. load picks the method by the file's peft_type.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from .. import core
from ..core import ADAPTERS, PeftLoRA
from ..errors import PeftlabError
from ..hosts import HostKind, host_kind
from ..model_level import MODEL, ROOT
from ..registry import MethodConfig, config as make_config, method_class, methods
from ..targets import overrides_for
from . import files
from .files import CONFIG_FILE, DAMAGED, WEIGHTS_FILE
from .plan import Plan, install, not_adaptable, pick

PEFT_PREFIX = "base_model.model."
# Keys peft writes at the top level, without PEFT_PREFIX: prompt learning's virtual tokens
# (PROMPT_TUNING, P_TUNING, PREFIX_TUNING: the tokens as the model sees them).
PEFT_TOP_LEVEL = ("prompt_embeddings",)


def save(model: nn.Module, directory: str | os.PathLike, name: str | Iterable[str] | None = None) -> Path:
    """Write adapters as peft's save_pretrained would write a LoRA (or DoRA); returns the directory.

    "default" goes to `directory`, any other name to `directory/<name>` (peft's layout).
    Every adapter is checked before anything is written.
    """
    state = core.state_of(model)
    names = core.adapter_names(state, name)
    with torch.no_grad():
        documents = {n: _document(model, state.groups[n], n) for n in names}
    directory = files.adapter_directory(directory)
    for n, (document, tensors) in documents.items():
        target = directory if n == "default" else files.adapter_directory(directory / n)
        files.write_bytes(target / WEIGHTS_FILE, files.tensor_bytes(tensors))
        files.write_json(target / CONFIG_FILE, document)
    return directory


def _document(model: nn.Module, group: core.Group, name: str) -> tuple[dict, dict[str, Tensor]]:
    """The adapter_config.json content and the tensors of one adapter in peft's layout."""
    config = group.config
    if config.peft_type != "LORA":
        return _other_document(model, group, name)
    if group.model is not None:
        raise PeftlabError(f"adapter {name!r} is {config.method!r}, which acts on the whole model rather than as a "
                           "low-rank change of layers, and peft has no format for it: save it with "
                           "format='peftlab', or merge it into the model (peftlab merge)")
    keys = {"lora_dropout": 0.0, "use_rslora": False, "use_dora": False, **config.peft_config()}
    tensors: dict[str, Tensor] = {}
    rank_alpha: dict[str, tuple[int, float]] = {}
    for site, adapter in group.sites.items():
        host = model.get_submodule(site)
        form = _site_form(name, config, site, host, adapter)
        if form.dropout != keys["lora_dropout"]:
            warnings.warn(f"{site}: dropout {form.dropout} differs from the adapter's {keys['lora_dropout']}; the "
                          "peft format has one dropout for all layers, so the export uses "
                          f"{keys['lora_dropout']} (outputs in eval mode are unaffected)", stacklevel=4)
        A, B = form.A.detach(), form.B.detach()
        rank_alpha[site] = (A.shape[0], _peft_alpha(form, A.shape[0], keys["use_rslora"]))
        tensors.update(_site_tensors(site, adapter.kind.name, host, A, B))
        tensors.update({f"{PEFT_PREFIX}{site}.{suffix}": t for suffix, t in form.tensors.items()})
    # The commonest (rank, alpha) is the default; the other sites become pattern entries.
    r, alpha = Counter(rank_alpha.values()).most_common(1)[0][0]
    by_length = sorted(rank_alpha, key=len, reverse=True)
    modules_to_save = _modules_to_save(model, config, name, tensors)
    document = {
        **_common_keys(model, "LORA"),
        "r": r,
        "lora_alpha": _number(alpha),
        **keys,  # lora_dropout, use_rslora, use_dora and any other key the method declares
        "init_lora_weights": True,  # the weights are in the file; peft's init is overwritten on load
        "target_modules": _targets(model, list(group.sites)),
        "exclude_modules": None,
        "fan_in_fan_out": "conv1d" in {a.kind.name for a in group.sites.values()},  # peft corrects it per layer
        "bias": "none",
        "lora_bias": False,
        "modules_to_save": modules_to_save or None,
        "rank_pattern": {_key(s): rank_alpha[s][0] for s in by_length if rank_alpha[s][0] != r},
        "alpha_pattern": {_key(s): _number(rank_alpha[s][1]) for s in by_length if rank_alpha[s][1] != alpha},
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    return document, tensors


def _common_keys(model: nn.Module, peft_type: str) -> dict[str, Any]:
    """adapter_config.json keys every peft adapter type has."""
    return {"peft_type": peft_type, "task_type": None,
            "auto_mapping": {"base_model_class": type(model).__name__, "parent_library": type(model).__module__},
            "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
            "revision": None, "inference_mode": True}


def _other_document(model: nn.Module, group: core.Group, name: str) -> tuple[dict, dict[str, Tensor]]:
    """A method with its own peft type (IA3, LN_TUNING): its keys and tensors, plus the common ones."""
    config = group.config
    params = dict(model.named_parameters())
    in_place = {k: params[k].detach() for k in core.state_of(model).in_place[name]}
    keys, own = config.peft_export(model, group.adapters(), in_place)
    tensors = {(k if k in PEFT_TOP_LEVEL else PEFT_PREFIX + k): t.detach() for k, t in own.items()}
    modules_to_save = _modules_to_save(model, config, name, tensors)
    document = {**_common_keys(model, config.peft_type), "exclude_modules": None,
                "modules_to_save": modules_to_save or None, **keys}
    return document, tensors


def _site_form(name: str, config: MethodConfig, site: str, host: nn.Module, adapter: core.Adapter) -> PeftLoRA:
    """One site as the method declares it for peft, or its lora_factors() at scale 1; refuses the rest."""
    site_config = config.at_site(overrides_for(site, host, config.overrides))
    form = site_config.peft_lora(adapter)
    if form is not None:
        return form
    pair = adapter.lora_factors() if adapter.additive else None
    if pair is None:
        raise PeftlabError(
            f"adapter {name!r} is {config.method!r}, whose change of {site} is not a low-rank product B @ A, so the "
            "peft LoRA format cannot hold it (it holds LoRA, DoRA and every method whose change is low-rank): "
            "save it with format='peftlab', or merge it into the model (peftlab merge)")
    return PeftLoRA(*pair)  # scale 1 (alpha = rank = 1), no dropout


def _site_tensors(site: str, kind: str, host: nn.Module, A: Tensor, B: Tensor) -> dict[str, Tensor]:
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


def _peft_alpha(form: PeftLoRA, r_peft: int, use_rslora: bool) -> float:
    """The lora_alpha that gives peft's scale, alpha / r_peft (or / sqrt(r_peft)), the method's at this site."""
    def denominator(r: int, rslora: bool) -> float:
        return math.sqrt(r) if rslora else r

    # the ratio first: it is exactly 1.0 (same rank) or 2.0 (residual export) in the common cases
    return form.alpha * (denominator(r_peft, use_rslora) / denominator(form.rank, form.rslora))


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def _key(site: str) -> str:
    # peft matches pattern keys with re.match(rf"(.*\.)?({key})$", name): "^" pins the whole name
    return "^" + re.escape(site)


def _targets(model: nn.Module, sites: list[str]) -> list[str] | str:
    """target_modules selecting exactly `sites`: their names, or one regex when a name is ambiguous."""
    if any(exact_pattern(model, s) != s for s in sites):
        return "(?:" + "|".join(re.escape(s) for s in sites) + ")"  # a string: peft applies re.fullmatch
    return sites


def exact_pattern(model: nn.Module, name: str) -> str:
    """A target pattern matching the module `name` and no other.

    A plain name also matches every module whose name ends in "." + name (peft matches the same
    way); where the model has such a module, an anchored regex is used instead.
    """
    if any(other.endswith("." + name) for other, _ in model.named_modules()):
        return "re:" + re.escape(name)
    return name


def _modules_to_save(model: nn.Module, config: MethodConfig, name: str, tensors: dict[str, Tensor]) -> list[str]:
    """also_train as peft's modules_to_save; their parameters join `tensors`."""
    if not config.also_train:
        return []
    canonical = {id(p): n for n, p in model.named_parameters()}
    chosen = core.select_modules(model, list(config.also_train))
    for module_name in chosen:
        for pname, p in model.get_submodule(module_name).named_parameters():
            if not canonical[id(p)].startswith(module_name + "."):
                raise PeftlabError(
                    f"adapter {name!r} trains {module_name}.{pname}, which is tied to {canonical[id(p)]}; peft "
                    "unties modules_to_save, so it would compute something else: save with format='peftlab'"
                )
            tensors[f"{PEFT_PREFIX}{module_name}.{pname}"] = p
    return chosen


# ---- import ----------------------------------------------------------------------------------


def load(model: nn.Module, directory: str | os.PathLike, name: str | Iterable[str] | None = None) -> nn.Module:
    """Attach the peft adapters (all, or those named) of `directory` in peft's layout. Returns the model."""
    directory = Path(directory)
    layout = _peft_layout(directory)
    return install(model, [_peft_plan(model, layout[n], n) for n in pick(layout, name, directory)], None)

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
# peft's LORA adapter, by use_dora, is peftlab's method...
_PEFT_VARIANTS = {False: "lora", True: "dora"}
# ... and its tensor name endings are these of the method's adapter tensors

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
        raise files.no_adapter_files(directory)
    return layout


def _check_peft_fields(document: dict, path: Path) -> None:
    if document.get("peft_type") != "LORA":
        others = sorted({method_class(m).peft_type for m in methods()} - {"LORA"})
        raise PeftlabError(f"{path} holds a peft {document.get('peft_type')!r} adapter; peftlab imports peft's LORA "
                           f"adapters (LoRA, rsLoRA, DoRA) and {', '.join(others)} ones only")
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


def _peft_plan(model: nn.Module, directory: Path, name: str) -> Plan:
    """One peft adapter directory as a Plan for peftlab's LoRA or DoRA."""
    path = directory / CONFIG_FILE
    document = files.read_json(path)
    if document.get("peft_type") != "LORA" and _method_for(document.get("peft_type")) is not None:
        return _other_plan(model, directory, document, name)
    _check_peft_fields(document, path)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file() and (directory / "adapter_model.bin").is_file():
        raise files.no_adapter_files(directory)
    per_site, plain = _split_peft_tensors(files.read_tensors(weights), weights, model)
    label = f"adapter {name!r} in {directory}"
    method = _PEFT_VARIANTS[bool(document.get("use_dora"))]
    init = document.get("init_lora_weights", True)
    state_dict, fingerprint, overrides = _peft_sites(model, document, per_site, method, name, label, weights)
    also_train = _peft_also_train(model, plain, document.get("modules_to_save") or [], label)
    fields = {"r": document.get("r", 8), "alpha": document.get("lora_alpha", 8),
              "dropout": document.get("lora_dropout", 0.0),
              "rslora": bool(document.get("use_rslora", False)),
              "targets": [exact_pattern(model, s) for s in per_site],
              "overrides": overrides,  # exact patterns: each matches one site, so their order is free
              "also_train": sorted({exact_pattern(model, k.rsplit(".", 1)[0]) for k in also_train})}
    if init in _PEFT_RESIDUAL_INITS:
        fields["init"] = init
    try:
        config = make_config(method, **fields)
    except PeftlabError as err:
        raise PeftlabError(f"{path}: {err}") from None
    return Plan(name, config, state_dict, fingerprint, directory, also_train,
                initial_from_base=init in _PEFT_RESIDUAL_INITS)


def _method_for(peft_type: Any) -> type[MethodConfig] | None:
    """The registered method that reads peft adapters of `peft_type` (other than LORA), if any."""
    for method in methods():
        cls = method_class(method)
        if cls.peft_type == peft_type and cls.peft_type != "LORA":
            return cls
    return None


def _other_plan(model: nn.Module, directory: Path, document: dict, name: str) -> Plan:
    """One peft adapter directory of a type a method reads itself (IA3, LN_TUNING) as a Plan."""
    path, weights = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not weights.is_file():
        raise files.no_adapter_files(directory)
    label = f"adapter {name!r} in {directory}"
    tensors = files.read_tensors(weights)
    unprefixed = [k for k in tensors if not k.startswith(PEFT_PREFIX) and k not in PEFT_TOP_LEVEL]
    if unprefixed:
        raise PeftlabError(f"{weights} holds {unprefixed[0]!r}, which lacks peft's {PEFT_PREFIX!r} prefix: not a "
                           "file written by peft's save_pretrained")
    saved = document.get("modules_to_save") or []
    own, plain = {}, {}
    for key, value in tensors.items():
        rest = key if key in PEFT_TOP_LEVEL else key[len(PEFT_PREFIX):]
        owners = [".".join(rest.split(".")[:i]) for i in range(1, rest.count(".") + 1)]
        listed = any(owner == m or owner.endswith("." + m) for owner in owners for m in saved)
        (plain if listed else own)[rest] = value
    cls = _method_for(document["peft_type"])
    try:
        config, per_site, in_place = cls.peft_import(model, document, own, lambda n: exact_pattern(model, n))
        also_train = _peft_also_train(model, plain, saved, label)
        config = dataclasses.replace(config, also_train=sorted({exact_pattern(model, k.rsplit(".", 1)[0])
                                                                for k in also_train}))
    except PeftlabError as err:
        raise PeftlabError(f"{path}: {err}") from None
    state_dict, fingerprint = {}, {}
    modules = dict(model.named_modules())
    for site, values in per_site.items():
        prefix = f"{ROOT}.{name}." if site == MODEL else f"{site}.{ADAPTERS}.{name}."
        state_dict.update({prefix + k: v for k, v in values.items()})
        if site != MODEL:
            kind = host_kind(modules[site])
            fingerprint[site] = (kind.name, tuple(kind.matrix(modules[site]).shape))
    return Plan(name, config, state_dict, fingerprint, directory, {**in_place, **also_train})


def _peft_sites(model: nn.Module, document: dict, per_site: dict[str, dict[str, Tensor]], method: str, name: str,
                label: str, weights: Path) -> tuple[dict[str, Tensor], dict, dict[str, dict[str, Any]]]:
    """(peftlab state dict, fingerprint, per-site overrides) of the file's adapted layers."""
    path = weights.with_name(CONFIG_FILE)
    r, alpha = document.get("r", 8), document.get("lora_alpha", 8)
    modules = dict(model.named_modules())
    state_dict: dict[str, Tensor] = {}
    fingerprint: dict[str, tuple[str | None, tuple[int, ...]]] = {}
    overrides: dict[str, dict[str, Any]] = {}
    for site, parts in per_site.items():
        module = modules.get(site)
        kind = host_kind(module) if module is not None else None
        if kind is None:
            raise not_adaptable(label, site, module)
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
                               f"belong together; {DAMAGED}")
        differs = {k: v for k, v, default in (("r", site_r, r), ("alpha", site_alpha, alpha)) if v != default}
        if differs:
            overrides[exact_pattern(model, site)] = differs
    return state_dict, fingerprint, overrides


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
        raise PeftlabError(f"{weights} holds no LoRA tensors; {DAMAGED}")
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
