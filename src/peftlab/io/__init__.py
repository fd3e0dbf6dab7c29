"""Saving and loading adapters: peftlab's own format, and the `peft` format in both directions.

    peftlab.save(model, "run/adapter")                  peftlab's format: every method, exact round trip
    peftlab.save(model, "run/peft", format="peft")      files peft.PeftModel.from_pretrained loads
    peftlab.load(model, "run/adapter")                  either format, detected

Both formats are a directory holding the two files `peft` uses; nothing is ever unpickled:

    adapter_config.json         what was attached, as JSON
    adapter_model.safetensors   the tensors

`load` tells the two apart by the config's content: peftlab's has "format": "peftlab", peft's
has a "peft_type". A function per format, a module per job:

    files.py    the one atomic write (for every file the project keeps), careful reads
    native.py   peftlab's format
    peft.py     the `peft` format, both ways
    plan.py     attaching what was read: every check before the first change

Writes are atomic per file (temporary file in the same directory, fsync, os.replace, fsync of
the directory), and the tensors are written before the config, so a config on disk never
announces tensors that are not there yet.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from torch import nn

from ..errors import PeftlabError
from . import files, native, peft
from .files import CONFIG_FILE, WEIGHTS_FILE
from .native import FORMAT, FORMAT_VERSION
from .peft import PEFT_PREFIX


def save(model: nn.Module, directory: str | os.PathLike, format: str = native.FORMAT,
         name: str | Iterable[str] | None = None) -> Path:
    """Write the attached adapters (all, or those named) and their also_train parameters.

    format="peftlab" keeps everything (any method, several adapters, the active set);
    format="peft" writes files `peft.PeftModel.from_pretrained` loads (LoRA, DoRA and every
    method whose change is low-rank, written as a LoRA).
    Returns the directory.
    """
    if format == "peft":
        return peft.save(model, directory, name)
    if format != native.FORMAT:
        raise PeftlabError(f"unknown format {format!r}: use 'peftlab' (every method, exact round trip) "
                           "or 'peft' (LoRA, DoRA and the other low-rank methods, for the peft library)")
    return native.save(model, directory, name)


def load(model: nn.Module, directory: str | os.PathLike, name: str | Iterable[str] | None = None) -> nn.Module:
    """Attach the adapters saved in `directory` (all, or those named); the format is detected.

    Everything is read and checked against the model first; on any error the model is left
    exactly as it was. Returns the model.
    """
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if config_path.is_file():
        document = files.read_json(config_path)
        if native.is_native(document):
            return native.load(model, directory, document, name)
        if "peft_type" not in document:
            raise PeftlabError(f"{config_path} is neither a peftlab adapter config (no \"format\": \"peftlab\") nor "
                               "a peft one (no \"peft_type\"): pass a directory written by peftlab.save or peft's "
                               "save_pretrained")
    return peft.load(model, directory, name)


__all__ = ["CONFIG_FILE", "FORMAT", "FORMAT_VERSION", "PEFT_PREFIX", "WEIGHTS_FILE", "load", "save"]
