"""Training checkpoints in safetensors + JSON, written atomically.

transformers.Trainer pickles optimizer, scheduler and RNG state (torch.save) and writes
`checkpoint-N` in place, so a run killed mid-save leaves a half-written newest checkpoint
that resume then picks. peftlab keeps the Trainer's loop but stores checkpoints itself:

    checkpoints/checkpoint-N/
        trainable.safetensors    adapter tensors and every trained parameter (e.g. the head)
        optimizer.safetensors    the optimizer's per-parameter state tensors
        optimizer.json           the rest of the optimizer state (param groups, scalars)
        scheduler.json           the learning-rate scheduler's state
        rng.safetensors          torch's and numpy's generator states, one set per process
        rng.json                 Python's generator state, one per process
        trainer_state.json       the Trainer's own progress record (JSON already)
        logging_window.json      the training loss summed since the last log line, and the logged total
        manifest.json            the size and sha256 of every other file, written last

A checkpoint is written under a hidden temporary name, flushed to disk, then renamed into
place: the rename is atomic, so `checkpoint-N` is either complete or absent. Older
checkpoints are renamed away before they are deleted, for the same reason.

What --resume trusts: `latest` hashes the newest checkpoint's files against its manifest and
falls back to the previous one (train.keep_checkpoints keeps two) with a warning naming the one
it skipped; a disk that changed a byte, a truncated copy or a deleted file is found this way.
Checkpoints written before manifests existed are checked as far as their files allow: every
file present, safetensors headers and JSON readable.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import random
import re
import shutil
import sys
from typing import Any, Callable

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..errors import PeftlabError
from ..io import files

PREFIX = "checkpoint-"
MANIFEST = "manifest.json"
WINDOW = "logging_window.json"  # absent from checkpoints written before it existed
# The files every checkpoint holds, also those written before manifests and logging windows.
CORE_FILES = ("trainable.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json",
              "rng.safetensors", "rng.json", "trainer_state.json")


# ---- the scratch directory a checkpoint is written into ----------------------------------------


def scratch_dir(parent: pathlib.Path, name: str) -> pathlib.Path:
    """A fresh hidden `.tmp-<name>-<pid>` in `parent`: a killed save leaves it for remove_leftovers."""
    parent.mkdir(parents=True, exist_ok=True)
    scratch = parent / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    return scratch


# ---- what goes in -----------------------------------------------------------------------------


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors (parameters and buffers; at a site, `<site>.adapters.*`, or model-level,
    `adapters.*`), every parameter trained in place, frozen now or not (LISA and HFT re-draw the
    set that trains), and every other parameter that trains (the baselines)."""
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    state = model.__dict__.get("_peftlab")  # None for a baseline: nothing attached
    in_place = {k for values in state.in_place.values() for k in values} if state is not None else set()
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
            if ".adapters." in f".{k}" or k in trained or k in in_place}


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors (safetensors) and everything else (JSON)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                         meta: dict[str, Any]) -> None:
    current_groups = optimizer.state_dict()["param_groups"]
    groups = meta["param_groups"]
    if len(groups) != len(current_groups) or any(len(a["params"]) != len(b["params"])
                                                  for a, b in zip(groups, current_groups)):
        raise PeftlabError("the checkpoint's optimizer has other parameter groups than this run: "
                           "resume with the run's own config, or start a new run")
    for saved, now in zip(groups, current_groups):  # JSON turned tuples (betas) into lists
        for key, value in now.items():
            if isinstance(value, tuple) and isinstance(saved.get(key), list):
                saved[key] = tuple(saved[key])
    state: dict[int, dict[str, Any]] = {}
    for flat, value in [*tensors.items(), *meta["scalars"].items()]:
        index, key = flat.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This process's generator states: tensors for torch and numpy, JSON for Python's."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"torch": torch.random.get_rng_state(), "numpy": torch.from_numpy(np.asarray(keys, dtype=np.int64))}
    version, internal, gauss = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(cached)], "python": [version, list(internal), gauss]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.random.set_rng_state(tensors["torch"])
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


# ---- writing and finding checkpoints ---------------------------------------------------------


def save(folder: pathlib.Path, step: int, model: torch.nn.Module, optimizer, scheduler,
         rng_per_process: list, trainer_state_json: str, window: dict[str, Any], keep: int) -> pathlib.Path:
    """Write checkpoint-<step> atomically into `folder`; keep only the newest `keep`.

    `window` is the Trainer's logging window (see loop.PeftlabTrainer.logging_window).
    """
    name = f"{PREFIX}{step}"
    remove_leftovers(folder)
    scratch = scratch_dir(folder, name)
    save_file(trainable_state(model), scratch / "trainable.safetensors")
    tensors, meta = optimizer_state(optimizer)
    save_file(tensors, scratch / "optimizer.safetensors")
    files.write_json(scratch / "optimizer.json", meta, sort_keys=True)
    files.write_json(scratch / "scheduler.json", scheduler.state_dict(), sort_keys=True)
    save_file({f"{rank}.{k}": v for rank, (t, _) in enumerate(rng_per_process) for k, v in t.items()},
              scratch / "rng.safetensors")
    files.write_json(scratch / "rng.json", [m for _, m in rng_per_process], sort_keys=True)
    files.write_text(scratch / "trainer_state.json", trainer_state_json)
    files.write_json(scratch / WINDOW, window, sort_keys=True)
    files.write_json(scratch / MANIFEST, manifest_of(scratch), sort_keys=True)  # last: it vouches for the rest
    target = folder / name
    files.publish_directory(scratch, target)
    for old in sorted_checkpoints(folder)[:-keep]:
        trash = old.with_name(f".trash-{old.name}")
        os.rename(old, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return target


def remove_leftovers(folder: pathlib.Path) -> None:
    """Delete what a killed save or rotation left behind (hidden names; never a checkpoint)."""
    if folder.is_dir():
        for path in folder.iterdir():
            if path.name.startswith((".tmp-", ".trash-")):
                shutil.rmtree(path, ignore_errors=True)


def step_of(checkpoint_dir: pathlib.Path) -> int:
    """The optimizer step a checkpoint folder holds: checkpoint-120 -> 120."""
    return int(checkpoint_dir.name[len(PREFIX):])


def sorted_checkpoints(folder: pathlib.Path) -> list[pathlib.Path]:
    """Complete checkpoints, oldest first (temporary and half-deleted ones are hidden names)."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := re.fullmatch(rf"{PREFIX}(\d+)", p.name))]
    return [p for _, p in sorted(found)]


def _warn(line: str) -> None:
    print(line, file=sys.stderr)


def latest(folder: pathlib.Path, warn: Callable[[str], None] = _warn) -> pathlib.Path | None:
    """The newest intact checkpoint (what --resume continues from); None when there is none at all.

    A damaged newer one is skipped with a warning naming it and why; when every checkpoint is
    damaged the run cannot continue, which is a PeftlabError naming the folder and the fix.
    """
    found = sorted_checkpoints(folder)
    newest = newest_intact(found, warn)
    if found and newest is None:
        raise PeftlabError(f"no intact checkpoint in {folder}: every one is damaged ({found[-1].name}: "
                           f"{damage(found[-1])}); the run cannot continue: start it again with --overwrite")
    return newest


def newest_intact(checkpoints: list[pathlib.Path], warn: Callable[[str], None] | None = None) -> pathlib.Path | None:
    """The last of `checkpoints` (oldest first) that `damage` finds nothing wrong with."""
    for candidate in reversed(checkpoints):
        problem = damage(candidate)
        if problem is None:
            if warn is not None and not (candidate / MANIFEST).is_file():
                warn(f"note: {candidate} has no {MANIFEST} (written by an older peftlab): only its file list, "
                     "safetensors headers and JSON were checked")
            return candidate
        if warn is not None:
            warn(f"warning: skipping checkpoint {candidate}: {problem}; trying the one before it")
    return None


# ---- verifying checkpoints ---------------------------------------------------------------------


def _sha256(path: pathlib.Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def manifest_of(folder: pathlib.Path) -> dict[str, Any]:
    """{"files": {name: {"size", "sha256"}}} for every file in `folder` but the manifest itself."""
    return {"files": {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
                      for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}}


def damage(checkpoint_dir: pathlib.Path) -> str | None:
    """What is wrong with a checkpoint folder, in words, or None when it is intact."""
    try:
        if not (checkpoint_dir / MANIFEST).is_file():
            return _unlisted_damage(checkpoint_dir)
        listed = _read_manifest(checkpoint_dir / MANIFEST)
        if isinstance(listed, str):
            return listed
        for name, record in sorted(listed.items()):
            path = checkpoint_dir / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != record["size"]:
                return f"{name} has {path.stat().st_size} bytes, its {MANIFEST} says {record['size']} (cut short?)"
            if _sha256(path) != record["sha256"]:
                return f"{name} differs from the sha256 in its {MANIFEST} (changed bytes)"
    except OSError as err:
        return f"it cannot be read ({err.strerror or err})"
    return None


def _read_manifest(path: pathlib.Path) -> dict[str, dict] | str:
    """The manifest's file records, or what is wrong with it."""
    try:
        listed = json.loads(path.read_text(encoding="utf-8"))["files"]
        valid = all(isinstance(r["size"], int) and isinstance(r["sha256"], str) for r in listed.values())
    except (ValueError, KeyError, TypeError, AttributeError):  # ValueError: bad JSON or UTF-8
        return f"its {MANIFEST} is not a readable manifest"
    missing = [name for name in CORE_FILES if name not in listed]
    if not valid or missing:
        return f"its {MANIFEST} is incomplete" + (f" (no {missing[0]})" if missing else "")
    return listed


def _unlisted_damage(checkpoint_dir: pathlib.Path) -> str | None:
    """A checkpoint without a manifest: every file present, safetensors headers and JSON readable."""
    for name in CORE_FILES:
        path = checkpoint_dir / name
        if not path.is_file():
            return f"{name} is missing"
        try:
            if name.endswith(".safetensors"):
                with safe_open(path, framework="pt"):
                    pass
            else:
                json.loads(path.read_text(encoding="utf-8"))
        except (SafetensorError, ValueError) as err:
            return f"{name} cannot be read ({' '.join(str(err).split())})"
    return None


def load_trainable(model: torch.nn.Module, checkpoint: pathlib.Path) -> None:
    """Copy a checkpoint's trainable tensors into the model (every key and shape checked)."""
    saved = load_file(checkpoint / "trainable.safetensors")
    own = model.state_dict()
    wanted = trainable_state(model)
    missing = sorted(set(wanted) - set(saved))
    extra = sorted(set(saved) - set(own))
    if missing or extra:
        raise PeftlabError(f"checkpoint {checkpoint} does not fit this model (missing {missing[:3]}, unexpected "
                           f"{extra[:3]}): resume with the run's own config")
    with torch.no_grad():
        for key, value in saved.items():
            if own[key].shape != value.shape:
                raise PeftlabError(f"checkpoint tensor {key} has shape {tuple(value.shape)}, the model needs "
                                   f"{tuple(own[key].shape)}: resume with the run's own config")
            own[key].copy_(value)


def load_rng(checkpoint: pathlib.Path, rank: int) -> None:
    tensors = load_file(checkpoint / "rng.safetensors")
    metas = json.loads((checkpoint / "rng.json").read_text(encoding="utf-8"))
    rank = rank if rank < len(metas) else 0
    mine = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"{rank}.")}
    set_rng_state(mine, metas[rank])


def load_window(checkpoint: pathlib.Path) -> dict[str, Any] | None:
    """The logging window saved with a checkpoint; None for checkpoints written before it existed."""
    path = checkpoint / WINDOW
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
