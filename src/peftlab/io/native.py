"""peftlab's own format: save(model, dir) / load(model, dir). Exact round trip for every method.

    adapter_config.json
        {"format": "peftlab", "format_version": 1, "peftlab_version": "0.1.0",
         "adapters": {name: {"config": <config.to_json()>,
                             "sites": {site: {"kind": "linear", "shape": [out, in]}},
                             "also_train": {parameter: shape}}},
         "active": [names], "tensors_sha256": <sha256 of the tensor file>}
    adapter_model.safetensors
        every adapter tensor under the key model.state_dict() gives it
        (`<site>.adapters.<name>.A`, buffers such as PiSSA's A0/B0 included; a model-level
        adapter's at `adapters.<name>.<key>`), and each parameter trained in place (also_train
        modules, a model-level adapter's in_place: BitFit's biases) under its own name
        (`classifier.weight`); "also_train" in the config lists them all with their shapes.

"sites" fingerprints the base model: load compares it with the model before changing
anything, so an adapter made for another model fails with a message naming the layer
rather than leaving a half-attached model. The checksum catches damage that safetensors'
own header checks cannot see (a flipped byte inside a tensor).

The tensors are written before the config, so a config on disk never announces tensors that
are not there yet.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Iterable

from torch import Tensor, nn

from .. import core
from ..core import ADAPTERS
from ..model_level import ROOT
from ..errors import PeftlabError
from ..registry import from_json
from . import files
from .files import CONFIG_FILE, DAMAGED, WEIGHTS_FILE
from .plan import Plan, install, pick

FORMAT = "peftlab"
FORMAT_VERSION = 1
_DOCUMENT_KEYS = {"format", "format_version", "peftlab_version", "adapters", "active", "tensors_sha256"}
_ENTRY_KEYS = {"config", "sites", "also_train"}


def save(model: nn.Module, directory: str | os.PathLike, name: str | Iterable[str] | None = None) -> Path:
    """Write the attached adapters (all, or those named) in peftlab's format; returns the directory."""
    state = core.state_of(model)
    names = core.adapter_names(state, name)
    params = dict(model.named_parameters())
    tensors: dict[str, Tensor] = {}
    entries = {}
    for n in names:
        group = state.groups[n]
        sites = {}
        for site, adapter in group.sites.items():
            host = model.get_submodule(site)
            sites[site] = {"kind": adapter.kind.name, "shape": list(adapter.kind.matrix(host).shape)}
        tensors.update(core.adapter_tensors(group, n))
        also = {k: params[k] for k in state.in_place[n]}
        tensors.update(also)
        entries[n] = {"config": group.config.to_json(), "sites": sites,
                      "also_train": {k: list(p.shape) for k, p in also.items()}}
    payload = files.tensor_bytes(tensors)
    from .. import __version__  # here, not at the top: the package imports this module while it initialises

    document = {"format": FORMAT, "format_version": FORMAT_VERSION, "peftlab_version": __version__,
                "adapters": entries, "active": [n for n in state.active if n in names],
                "tensors_sha256": hashlib.sha256(payload).hexdigest()}
    directory = files.adapter_directory(directory)
    files.write_bytes(directory / WEIGHTS_FILE, payload)
    files.write_json(directory / CONFIG_FILE, document)
    return directory


def is_native(document: dict) -> bool:
    """Whether an adapter_config.json content is peftlab's (peft's has a "peft_type" instead)."""
    return document.get("format") == FORMAT


def load(model: nn.Module, directory: Path, document: dict, name: str | Iterable[str] | None = None) -> nn.Module:
    """Attach the adapters (all, or those named) of a peftlab-format directory whose config is `document`."""
    plans, active = _plans(directory, document, name)
    return install(model, plans, active)


def _plans(directory: Path, document: dict, name: str | Iterable[str] | None) -> tuple[list[Plan], list[str]]:
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
        raise PeftlabError(f"{path} lists no adapters under \"adapters\"; {DAMAGED}")
    wanted = pick(adapters, name, directory)
    tensors = files.read_tensors(directory / WEIGHTS_FILE, document.get("tensors_sha256"))
    plans = [_plan(directory, n, adapters[n], tensors) for n in wanted]
    active = document.get("active", list(adapters))
    return plans, list(active)


def _plan(directory: Path, name: str, entry: Any, tensors: dict[str, Tensor]) -> Plan:
    where = f"{directory / CONFIG_FILE}, adapter {name!r}"
    if not isinstance(entry, dict) or not isinstance(entry.get("config"), dict):
        raise PeftlabError(f"{where}: expected an object with a \"config\" object; {DAMAGED}")
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
        raise PeftlabError(f"{where}: the \"sites\" fingerprint is malformed; {DAMAGED}") from None
    missing = [k for k in also_keys if k not in tensors]
    if missing:
        raise PeftlabError(f"{directory / WEIGHTS_FILE} lacks the also_train parameter {missing[0]!r} that "
                           f"{CONFIG_FILE} lists; {DAMAGED}")
    prefixes = tuple(f"{site}.{ADAPTERS}.{name}." for site in sites) + (f"{ROOT}.{name}.",)
    own = {k: v for k, v in tensors.items() if k.startswith(prefixes)}
    return Plan(name, config, own, sites, directory, {k: tensors[k] for k in also_keys})
