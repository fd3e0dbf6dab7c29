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

A checkpoint is written under a hidden temporary name, flushed to disk, then renamed into
place: the rename is atomic, so `checkpoint-N` is either complete or absent. Older
checkpoints are renamed away before they are deleted, for the same reason.
"""
from __future__ import annotations

import json
import os
import pathlib
import random
import re
import shutil
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import PeftlabError
from ..io import files

PREFIX = "checkpoint-"


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
    """Adapter tensors (parameters and buffers) plus every parameter that trains."""
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
            if ".adapters." in k or k in trained}


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
         rng_per_process: list, trainer_state_json: str, keep: int) -> pathlib.Path:
    """Write checkpoint-<step> atomically into `folder`; keep only the newest `keep`."""
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
    (scratch / "trainer_state.json").write_text(trainer_state_json, encoding="utf-8")
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


def latest(folder: pathlib.Path) -> pathlib.Path | None:
    found = sorted_checkpoints(folder)
    return found[-1] if found else None


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
