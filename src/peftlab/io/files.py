"""Safe file writing and careful reading: the one atomic write of the project.

Every file peftlab writes for keeps (adapters, run configs, checkpoints, bench records and
reports) goes through `write_bytes`, so all of them carry one guarantee:

    a reader sees the old file or the new one, never a part, and after the call returns
    the new one survives a crash of the machine.

It is the classic sequence: write a temporary file in the same directory, fsync it,
os.replace it over the target, fsync the directory (which makes the rename durable).
`publish_directory` gives a whole directory the same guarantee: every file in it is synced,
then one rename puts it in place.

The readers turn damaged adapter files into a PeftlabError that says what to do, never a
traceback from json or safetensors. An adapter directory, in both formats, holds:

    adapter_config.json         what was attached, as JSON
    adapter_model.safetensors   the tensors
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from safetensors import SafetensorError
from safetensors.torch import load as tensors_from_bytes
from safetensors.torch import save as tensors_to_bytes
from torch import Tensor

from ..errors import PeftlabError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
DAMAGED = "re-save the adapter, or download it again"


# ---- writing ---------------------------------------------------------------------------------


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that a reader sees the old file or the new one, never a part."""
    path = Path(path)
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
    fsync_directory(path.parent)  # make the rename itself durable


def write_text(path: str | os.PathLike, text: str) -> None:
    """`write_bytes` for UTF-8 text."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, document: Any, sort_keys: bool = False,
               default: Callable[[Any], Any] | None = None) -> None:
    """`document` as indented JSON plus a final newline, written atomically."""
    write_text(path, json.dumps(document, indent=2, sort_keys=sort_keys, default=default) + "\n")


def tensor_bytes(tensors: dict[str, Tensor]) -> bytes:
    """A safetensors file's content, as peft writes it (metadata {"format": "pt"})."""
    # clone: safetensors refuses tensors sharing storage (tied weights, views of one buffer)
    return tensors_to_bytes({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()},
                            metadata={"format": "pt"})


def fsync_directory(directory: Path) -> None:
    """Make the names in `directory` (a rename, a new file) durable, where the platform can."""
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


def publish_directory(scratch: Path, target: Path, replace: bool = True) -> bool:
    """Sync every file under `scratch`, then rename it to `target` in one step; returns whether it did.

    A reader sees the old `target` (or none) or the complete new one. An existing `target` is
    renamed to a hidden ".trash-" name and deleted first when `replace`; otherwise it is kept
    (another writer finished first: `scratch` is deleted and False returned).
    """
    for folder, _, names in os.walk(scratch):
        for name in names:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_directory(Path(folder))
    if target.exists() and replace:
        trash = target.with_name(f".trash-{target.name}-{os.getpid()}")
        os.rename(target, trash)
        shutil.rmtree(trash, ignore_errors=True)
    try:
        os.rename(scratch, target)
    except OSError:
        if replace or not target.exists():
            raise
        shutil.rmtree(scratch, ignore_errors=True)
        return False
    fsync_directory(target.parent)
    return True


@contextlib.contextmanager
def new_directory(target: Path, replace: bool = True) -> Iterator[Path]:
    """Fill the yielded hidden scratch directory; on leaving the block it becomes `target`.

    On an error nothing is published and the scratch directory is deleted.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield scratch
        publish_directory(scratch, target, replace)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def adapter_directory(directory: str | os.PathLike) -> Path:
    """`directory`, created if needed, to save adapters into."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise PeftlabError(f"{directory} is a file; adapters are saved into a directory: pass a directory path")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


# ---- reading ---------------------------------------------------------------------------------


def read_json(path: Path) -> dict:
    """An adapter config: a JSON object, or a PeftlabError saying the file is damaged."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PeftlabError(f"{path} is not valid JSON ({err}): the file is damaged; {DAMAGED}") from None
    if not isinstance(data, dict):
        raise PeftlabError(f"{path} holds a JSON {type(data).__name__}, not an adapter config object; {DAMAGED}")
    return data


def read_tensors(path: Path, sha256: str | None = None) -> dict[str, Tensor]:
    """The tensors of a safetensors file, checked against `sha256` when given (nothing is unpickled)."""
    if not path.is_file():
        raise PeftlabError(f"{path} is missing: its directory has a config but no tensors; {DAMAGED}")
    data = path.read_bytes()
    try:
        tensors = tensors_from_bytes(data)
    except SafetensorError as err:
        raise PeftlabError(f"{path} is damaged: it cannot be read as safetensors ({err}); {DAMAGED}") from None
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise PeftlabError(f"{path} is damaged: its checksum differs from the one recorded in {CONFIG_FILE} "
                           f"(changed bytes, or a save that did not finish); {DAMAGED}")
    return tensors


def no_adapter_files(directory: Path) -> PeftlabError:
    """The error for a directory without adapter files, saying what is there instead."""
    if not directory.exists():
        return PeftlabError(f"{directory} does not exist: pass the directory peftlab.save (or peft's "
                            "save_pretrained) wrote")
    if (directory / "adapter_model.bin").exists():
        return PeftlabError(f"{directory} holds adapter_model.bin, a pickle, which peftlab never loads: re-save it as "
                            "safetensors (peft: model.save_pretrained(dir, safe_serialization=True))")
    return PeftlabError(f"{directory} holds no adapter files: expected {CONFIG_FILE} and {WEIGHTS_FILE}, as written "
                        "by peftlab.save or peft's save_pretrained")
