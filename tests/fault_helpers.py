"""Helpers for the fault tests: the real command line in a subprocess, and byte snapshots.

Every fault test runs `python -m peftlab ...` as a user would, then checks three things: the
exit status (2 for the user's errors, 1 for faults of the machine), that stderr holds no
traceback, and that what the user already had is byte for byte what it was.
"""
from __future__ import annotations

import hashlib
import os
import pathlib
import signal
import subprocess
import sys

from run_helpers import tiny_overrides

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
ENV.pop("PEFTLAB_DEBUG", None)


def ctrl_c_reaches_child() -> None:
    """Popen's preexec_fn: the child takes Ctrl-C as a terminal would give it. A test suite started in
    the background of a non-interactive shell runs with SIGINT ignored, and children inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_cli(*args: str, timeout: float = 300, preexec_fn=None, stdin=None, **env: str) -> subprocess.CompletedProcess:
    """`peftlab ARGS...` in a fresh interpreter; stdout and stderr as text."""
    return subprocess.run([sys.executable, "-m", "peftlab", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**ENV, **env}, preexec_fn=preexec_fn, stdin=stdin)


def train_args(model_dir: pathlib.Path, output: pathlib.Path, *extra_sets: str, **fields) -> list[str]:
    """`train --set ...` arguments for a fast run of the tiny model (see run_helpers.tiny_overrides)."""
    args = ["train"]
    for item in [*tiny_overrides(model_dir, output, **fields), *extra_sets]:
        args += ["--set", item]
    return args


def assert_clean_failure(done: subprocess.CompletedProcess, status: int, *phrases: str) -> None:
    """Exit status `status`, no traceback, and every phrase (case-insensitive) in stderr."""
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == status, f"exit {done.returncode}, expected {status}\n{done.stderr}"
    for phrase in phrases:
        assert phrase.lower() in done.stderr.lower(), f"{phrase!r} not in stderr:\n{done.stderr}"


def snapshot(folder: pathlib.Path) -> dict[str, str]:
    """Relative path -> sha256 of every file below `folder` (empty when it does not exist)."""
    if not folder.exists():
        return {}
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def trained_run(model_dir: pathlib.Path, run_dir: pathlib.Path, **fields) -> pathlib.Path:
    """A finished run of the tiny model in `run_dir` (the earlier work a fault must not touch)."""
    done = run_cli(*train_args(model_dir, run_dir, **fields))
    assert done.returncode == 0, done.stderr
    return run_dir
