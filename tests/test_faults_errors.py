"""One clear line for every fault: unwritable folders, full disks, damaged run files, piped configs.

Through the real command line in a subprocess. One finished run of the tiny model is made once;
each test breaks one thing and checks the exit status (2 for the user's errors, 1 for faults of
the machine), that stderr holds no traceback, and that the finished run is byte for byte what
it was. The disk and permission faults are real: a tiny tmpfs (or, where mounting is not
allowed, a file-size limit), and a read-only folder that even root must respect.
"""
from __future__ import annotations

import ctypes
import errno
import os
import pathlib
import resource
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest

from fault_helpers import ENV, assert_clean_failure, run_cli, snapshot, train_args
from peftlab.errors import DEBUG_HINT, failure
from run_helpers import tiny_checkpoint

USER_ERROR, FAULT = 2, 1
SHORT = {"train.steps": 3}  # one checkpoint, at step 3


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> pathlib.Path:
    """A world-traversable folder in /tmp holding the model: children running with fewer rights read it."""
    folder = pathlib.Path(tempfile.mkdtemp(prefix="peftlab-faults-", dir="/tmp"))
    folder.chmod(0o755)
    shutil.copytree(tiny_checkpoint(tmp_path_factory.mktemp("faults-errors")), folder / "tiny-bert")
    yield folder
    for path in folder.rglob("*"):  # the read-only folders a test made
        if path.is_dir():
            path.chmod(0o755)
    shutil.rmtree(folder)


@pytest.fixture(scope="module")
def model_dir(base) -> pathlib.Path:
    return base / "tiny-bert"


@pytest.fixture(scope="module")
def finished(model_dir, base) -> pathlib.Path:
    """A finished 3-step run (adapter, summary, checkpoint): what no failure may change."""
    run_dir = base / "finished"
    done = run_cli(*train_args(model_dir, run_dir, **SHORT))
    assert done.returncode == 0, done.stderr
    return run_dir


@pytest.fixture
def earlier(finished):
    """The finished run and its byte snapshot; after the test, the run must still match it."""
    before = snapshot(finished)
    yield finished
    assert snapshot(finished) == before


@pytest.fixture
def scratch(base, request) -> pathlib.Path:
    """A fresh folder for one test under the world-traversable base."""
    folder = base / request.node.name.replace("[", "-").rstrip("]")
    folder.mkdir(mode=0o755)
    return folder


def copy_run(finished: pathlib.Path, target: pathlib.Path) -> pathlib.Path:
    shutil.copytree(finished, target)
    return target


def assert_said_once(done: subprocess.CompletedProcess) -> None:
    """One error line, however many threads met the fault (TensorBoard's writer meets a full disk too)."""
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr


# ---- faults of the machine and the file system -----------------------------------------------


def without_root_powers() -> None:
    """In the child: drop the capabilities that let root write anywhere, so permission bits apply to it too.

    Root ignores chmod through CAP_DAC_OVERRIDE (write) and CAP_DAC_READ_SEARCH; dropped from the
    bounding set, `python` starts without them and remains root otherwise (so it can still run
    the interpreter under a private /root). A plain user needs nothing dropped.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2
    for capability in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_an_output_folder_that_cannot_be_written_is_one_line_and_exit_2(model_dir, earlier, scratch):
    locked = scratch / "locked"
    beside = copy_run(earlier, locked / "earlier")
    before = snapshot(beside)
    locked.chmod(0o555)
    limit = without_root_powers if os.geteuid() == 0 else None
    done = run_cli(*train_args(model_dir, locked / "new", **SHORT), preexec_fn=limit)
    assert_clean_failure(done, USER_ERROR, f"permission denied for {locked / 'new'}",
                         "choose a folder you can write, or --output DIR")
    assert_said_once(done)
    assert sorted(p.name for p in locked.iterdir()) == ["earlier"]
    assert snapshot(beside) == before


def mount_tmpfs(folder: pathlib.Path, size: str) -> bool:
    """Mount a tmpfs of `size` on `folder`; False where mounting is not permitted (not root, a container)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(folder)],
                          capture_output=True)
    return done.returncode == 0


def fill(disk: pathlib.Path, leave: int) -> None:
    """Fill a file system until about `leave` bytes are free."""
    free = shutil.disk_usage(disk).free - leave
    with open(disk / "filler", "wb") as f:
        f.write(b"\0" * max(free, 0))


def file_size_limit(limit: int):
    """A preexec_fn: no file may grow past `limit` bytes; writes beyond fail with EFBIG (not SIGXFSZ)."""
    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return limited


@pytest.mark.parametrize("full", ["tmpfs", "file-size-limit"])
def test_a_full_disk_is_one_line_and_exit_1_and_the_overwritten_run_comes_back(model_dir, earlier, scratch, full):
    """--overwrite on a disk that fills up: the run it was replacing is back as it was.

    A real full disk is a tiny tmpfs (root can mount one); the file-size limit is the same
    failure for an unprivileged machine: every write past the limit fails as a full disk does.
    """
    disk = scratch / "disk"
    disk.mkdir()
    if full == "tmpfs" and not mount_tmpfs(disk, "300k"):
        pytest.skip("mounting a tmpfs is not permitted here; the file-size-limit case covers it")
    try:
        run_dir = copy_run(earlier, disk / "run")
        before = snapshot(run_dir)
        if full == "tmpfs":
            fill(disk, leave=24 * 1024)  # the config and logs fit; the first checkpoint (~45 kB) does not
            done = run_cli(*train_args(model_dir, run_dir, **SHORT), "--overwrite")
            assert_clean_failure(done, FAULT, f"no space left on the device holding {run_dir}",
                                 "free space on it, or choose another --output")
        else:  # the config and logs fit in 8 kB; the checkpoint's rng.json (~12 kB) does not
            done = run_cli(*train_args(model_dir, run_dir, **SHORT), "--overwrite", preexec_fn=file_size_limit(8192))
            assert_clean_failure(done, FAULT, "grew past the largest file allowed", "choose another --output")
        assert "is back as it was" in done.stderr, done.stderr
        assert_said_once(done)
        assert snapshot(run_dir) == before
    finally:
        if full == "tmpfs":
            subprocess.run(["umount", str(disk)], check=True)


# ---- bad input --------------------------------------------------------------------------------


def test_output_naming_an_existing_file_is_refused_before_anything_loads(model_dir, earlier, scratch):
    taken = scratch / "notes.txt"
    taken.write_text("my notes\n")
    done = run_cli(*train_args(model_dir, taken, **SHORT))
    assert_clean_failure(done, USER_ERROR, f"--output {taken} is a file, not a folder", "choose a new folder")
    assert taken.read_text() == "my notes\n"
    assert sorted(p.name for p in scratch.iterdir()) == ["notes.txt"]


def test_a_config_given_through_a_pipe_is_read_like_a_file(earlier, scratch):
    config = scratch / "run.yaml"
    config.write_text("task: movie-sentiment\nmethod: {name: lora, r: 3}\nseed: 7\n")
    # process substitution, as a shell user writes it: the config arrives as /dev/fd/N, a pipe
    done = subprocess.run(["bash", "-c", '"$0" -m peftlab train <(cat "$1") --print-config', sys.executable,
                           str(config)], capture_output=True, text=True, env=ENV, timeout=120)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert "seed: 7" in done.stdout and "r: 3" in done.stdout, done.stdout


def test_a_base_model_with_damaged_weights_is_named_and_exit_2(model_dir, earlier, scratch):
    damaged = pathlib.Path(shutil.copytree(model_dir, scratch / "tiny-bert"))
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a download cut short
    done = run_cli(*train_args(damaged, scratch / "run", **SHORT))
    assert_clean_failure(done, USER_ERROR, f"model checkpoint {damaged} has a damaged file", "SafetensorError")
    assert not (scratch / "run").exists()


# ---- damaged run folders ---------------------------------------------------------------------


def test_eval_of_a_run_whose_config_yaml_is_damaged_names_the_file(earlier, scratch):
    run_dir = copy_run(earlier, scratch / "run")
    (run_dir / "config.yaml").write_text("model: [tiny\ntask: movie-sentiment\n")  # cut mid-list
    before = snapshot(run_dir)
    done = run_cli("eval", run_dir)
    assert_clean_failure(done, USER_ERROR, f"{run_dir / 'config.yaml'} is damaged", "not valid YAML",
                         "restore it from a copy, or train the run again")
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert snapshot(run_dir) == before


def test_eval_of_a_run_whose_task_json_is_damaged_names_the_file(earlier, scratch):
    run_dir = copy_run(earlier, scratch / "run")
    (run_dir / "task.json").write_text('{"kind": "classification", "label_na')  # a save cut short
    before = snapshot(run_dir)
    done = run_cli("eval", run_dir)
    assert_clean_failure(done, USER_ERROR, f"{run_dir / 'task.json'} is damaged", "not valid JSON",
                         "restore it from a copy, or train the run again")
    assert snapshot(run_dir) == before


def test_resume_of_a_run_whose_config_yaml_is_damaged_names_the_file(earlier, scratch):
    run_dir = copy_run(earlier, scratch / "run")
    (run_dir / "config.yaml").write_bytes(b"\x93\xff\x00\x10binary garbage")  # overwritten by something else
    before = snapshot(run_dir)
    done = run_cli("train", "--resume", run_dir)
    assert_clean_failure(done, USER_ERROR, f"config file {run_dir / 'config.yaml'} is not UTF-8 text")
    assert snapshot(run_dir) == before


# ---- the traceback, on request ---------------------------------------------------------------


@pytest.mark.parametrize("how", ["global-flag", "command-flag", "environment"])
def test_debug_shows_the_traceback_and_keeps_the_line_and_status(earlier, scratch, how):
    run_dir = copy_run(earlier, scratch / "run")
    (run_dir / "task.json").write_text("[")
    args = {"global-flag": ["--debug", "eval", run_dir], "command-flag": ["eval", run_dir, "--debug"],
            "environment": ["eval", run_dir]}[how]
    done = run_cli(*args, **({"PEFTLAB_DEBUG": "1"} if how == "environment" else {}))
    assert done.returncode == USER_ERROR, done.stderr
    assert "Traceback" in done.stderr and "in read_run" in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: {run_dir / 'task.json'} is damaged")


# ---- the mapping itself (no subprocess needed) -------------------------------------------------


def test_bugs_and_library_wrapped_disk_errors_get_their_status():
    line, status = failure(KeyError("rank"))
    assert status == FAULT and line == f"unexpected KeyError: 'rank' {DEBUG_HINT}"
    # safetensors reports a failed write as its own exception, with the OS error in its text
    wrapped = RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    line, status = failure(wrapped, "runs/x")
    assert status == FAULT and line == "no space left on the device holding runs/x: free space on it, " \
                                       "or choose another --output"
    gone = FileNotFoundError(errno.ENOENT, "No such file", "data/reviews.csv")
    gone.add_note("nothing was written")
    assert failure(gone, option="--out") == ("data/reviews.csv does not exist: check the path; nothing was written",
                                             USER_ERROR)
