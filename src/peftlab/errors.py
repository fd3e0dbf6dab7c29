"""The one exception type peftlab raises for bad input, and the one line every failure becomes.

Every message names the problem and the fix. PeftlabError subclasses ValueError so that
callers who already catch ValueError for bad arguments keep working.

`failure(err, where)` decides, in this one place, what the command line says about an
exception and with which exit status: 2 for the user's errors (bad input, a path that does
not exist, a folder the user cannot write), 1 for faults of the machine (a full disk, an I/O
error) and for bugs, which also get the hint to rerun with --debug for the traceback.
"""
from __future__ import annotations

import errno
import os
import re

USER_ERROR = 2  # the input was wrong: fixing the command fixes it
FAULT = 1  # the machine failed (or peftlab did): the same command may work elsewhere or later

DEBUG_HINT = "(run with --debug for the traceback)"


class PeftlabError(ValueError):
    """Bad input: the message says what was wrong and what to do instead."""


# errno -> (what happened, what to do); {path} is the file, or the folder the command wrote to.
_USER_ERRNOS = {
    errno.EACCES: ("permission denied for {path}", "choose a folder you can write, or {option} DIR"),
    errno.EPERM: ("operation not permitted on {path}", "choose a folder you can write, or {option} DIR"),
    errno.EROFS: ("{path} is on a read-only file system", "choose a folder you can write, or {option} DIR"),
    errno.ENOENT: ("{path} does not exist", "check the path"),
    errno.ENOTDIR: ("a part of {path} is a file, not a folder", "check the path, or choose another {option}"),
    errno.EISDIR: ("{path} is a folder where a file was expected", "check the path"),
    errno.EEXIST: ("{path} exists already", "choose a new path, or remove it first"),
    errno.ENOTEMPTY: ("{path} is not empty", "choose a new path, or remove it first"),
    errno.ENAMETOOLONG: ("the name {path} is too long", "choose a shorter path"),
}
_FULL = "free space on it, or choose another {option}"
_MACHINE_ERRNOS = {
    errno.ENOSPC: ("no space left on the device holding {path}", _FULL),
    errno.EDQUOT: ("the disk quota is used up on the device holding {path}", _FULL),
    errno.EFBIG: ("a file under {path} grew past the largest file allowed (the file system's, or `ulimit -f`)",
                  "raise the limit, or choose another {option}"),
    errno.EIO: ("an I/O error on {path}: the disk or file system failed",
                "check the device (e.g. dmesg), then try again"),
}
# Libraries written in Rust or C++ (safetensors, torch) report a failed write as their own
# exception whose text holds the OS error: "... (os error 28)", "... [Errno 28] ...".
_ERRNO_IN_TEXT = re.compile(r"os error (\d+)|\[Errno (\d+)\]")


def _embedded_os_error(err: BaseException) -> OSError | None:
    """The OSError behind `err`: itself, its explicit cause, or one spelled out in its text.

    Only `raise ... from` chains are followed: an exception raised while handling an OSError
    is not about that OSError (a bug in a handler stays a bug)."""
    seen = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return seen
        found = _ERRNO_IN_TEXT.search(str(seen))
        if found:
            code = int(found.group(1) or found.group(2))
            return OSError(code, os.strerror(code))
        seen = seen.__cause__
    return None


def _os_described(err: OSError, where: str | os.PathLike | None, option: str) -> tuple[str, int, bool]:
    """(line, exit status, unexpected) for an OSError; `where` names the path when the error does not."""
    path = err.filename if err.filename is not None else where
    path = os.fsdecode(path) if path is not None else "the output folder"
    if err.errno in _USER_ERRNOS:
        what, fix = _USER_ERRNOS[err.errno]
        return f"{what.format(path=path)}: {fix.format(option=option)}", USER_ERROR, False
    if err.errno in _MACHINE_ERRNOS:
        what, fix = _MACHINE_ERRNOS[err.errno]
        return f"{what.format(path=path)}: {fix.format(option=option)}", FAULT, False
    return f"{err.strerror or err} ({path})", FAULT, True


def _described(err: BaseException, where: str | os.PathLike | None, option: str) -> tuple[str, int, bool]:
    if isinstance(err, PeftlabError):
        return str(err), USER_ERROR, False
    behind = _embedded_os_error(err)
    if behind is not None:
        return _os_described(behind, where, option)
    text = " ".join(str(err).split()) or "no message"  # one line, whatever the library wrote
    return f"unexpected {type(err).__name__}: {text}", FAULT, True


def failure(err: BaseException, where: str | os.PathLike | None = None, option: str = "--output") -> tuple[str, int]:
    """(one line, exit status) for an exception that ends a command.

    `where`: the path the command wrote to, named when the error names no file (a full disk);
    `option`: the command's option for choosing that path, named in the fix. Notes added on the
    way up (`err.add_note`, e.g. what a failed run left behind) end the line.
    """
    line, status, unexpected = _described(err, where, option)
    notes = [" ".join(note.split()) for note in getattr(err, "__notes__", ())]
    line = "; ".join([line, *notes])
    return (f"{line} {DEBUG_HINT}" if unexpected else line), status
