"""Nothing lost: --overwrite keeps the old run until the new one has a checkpoint, and a failed start leaves nothing.

Through the real command line in a subprocess. One finished run of the tiny model is made once;
each test copies it as "the earlier run", breaks the new run in one way (a bad data file, a model
that does not load, Ctrl-C), and checks the exit status, that stderr holds no traceback, and
that the earlier run is byte for byte what it was, with no scratch folder left beside it.
"""
from __future__ import annotations

import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

from fault_helpers import ENV, assert_clean_failure, ctrl_c_reaches_child, run_cli, snapshot, train_args, trained_run
from run_helpers import tiny_checkpoint

INTERRUPTED = 130  # the shell's status for Ctrl-C, which the CLI returns too
MODEL_FAILS = 2  # a damaged weights file: named in one line as the user's to restore (recipe.models)
LONG = {"train.steps": 2000}  # far longer than any test waits: Ctrl-C always lands mid-run


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> pathlib.Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("faults-rundir"))


@pytest.fixture(scope="module")
def finished(model_dir, tmp_path_factory) -> pathlib.Path:
    """A finished 3-step run (adapter, summary, checkpoint): what --overwrite must not lose."""
    return trained_run(model_dir, tmp_path_factory.mktemp("finished") / "run", **{"train.steps": 3})


@pytest.fixture
def earlier(finished, tmp_path) -> tuple[pathlib.Path, dict[str, str]]:
    """A copy of the finished run in this test's folder, and its byte snapshot."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    return run_dir, snapshot(run_dir)


def assert_only(parent: pathlib.Path, *names: str) -> None:
    """The folder holds exactly these entries: no scratch, trash or set-aside run left behind."""
    assert sorted(p.name for p in parent.iterdir()) == sorted(names)


def broken_model(model_dir: pathlib.Path, folder: pathlib.Path) -> pathlib.Path:
    """The tiny model with its weights file cut to a few bytes: the config and tokenizer load, the weights do not."""
    shutil.copytree(model_dir, folder)
    (folder / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    return folder


def interrupt_when(args: list[str], ready) -> subprocess.CompletedProcess:
    """Run `peftlab ARGS`, send SIGINT (Ctrl-C) once `ready()` holds, and wait for it to end."""
    process = subprocess.Popen([sys.executable, "-m", "peftlab", *map(str, args)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=ENV, preexec_fn=ctrl_c_reaches_child)
    deadline = time.monotonic() + 120
    while not ready() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def test_overwrite_with_a_bad_data_file_keeps_the_earlier_run(model_dir, earlier, tmp_path):
    run_dir, before = earlier
    data = tmp_path / "reviews.csv"
    data.write_text("text,label\ngood,1\n,0\n")
    done = run_cli(*train_args(model_dir, run_dir, "task=file", f"data.path={data}", "data.kind=classification"),
                   "--overwrite")
    assert_clean_failure(done, 2, "row 3", "are empty")
    assert snapshot(run_dir) == before
    assert_only(tmp_path, "run", "reviews.csv")


def test_overwrite_with_a_model_that_does_not_load_keeps_the_earlier_run(model_dir, earlier, tmp_path):
    run_dir, before = earlier
    broken = broken_model(model_dir, tmp_path / "broken-model")
    done = run_cli(*train_args(broken, run_dir), "--overwrite")
    assert snapshot(run_dir) == before
    assert_only(tmp_path, "run", "broken-model")
    assert_clean_failure(done, MODEL_FAILS, "before its first checkpoint",
                         f"the earlier run in {run_dir} is back as it was")


def test_ctrl_c_before_the_first_checkpoint_of_an_overwrite_keeps_the_earlier_run(model_dir, earlier, tmp_path):
    run_dir, before = earlier
    aside = tmp_path / "run.previous"  # where the earlier run waits while the new one starts
    training = run_dir / "metrics.jsonl"  # the new run's first logged step: Ctrl-C lands mid-training
    done = interrupt_when([*train_args(model_dir, run_dir, **LONG, **{"train.save_every": 2000}), "--overwrite"],
                          ready=lambda: aside.exists() and training.exists())
    assert snapshot(run_dir) == before
    assert_only(tmp_path, "run")
    assert_clean_failure(done, INTERRUPTED, "interrupted", "before its first checkpoint",
                         f"the earlier run in {run_dir} is back as it was")


def test_a_failed_start_leaves_nothing_so_the_fixed_command_runs_without_overwrite(model_dir, tmp_path):
    run_dir = tmp_path / "runs" / "new"
    broken = broken_model(model_dir, tmp_path / "model")
    done = run_cli(*train_args(broken, run_dir, **{"train.steps": 3}))
    assert_only(tmp_path / "runs")  # no config.yaml, task.json, metrics.jsonl or tensorboard/: no folder at all
    assert_clean_failure(done, MODEL_FAILS, "before its first checkpoint", f"files in {run_dir} were removed")
    shutil.rmtree(broken)
    shutil.copytree(model_dir, broken)  # fixed: the same command now finds a model that loads
    done = run_cli(*train_args(broken, run_dir, **{"train.steps": 3}))
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert (run_dir / "summary.json").is_file()


def test_ctrl_c_after_the_first_checkpoint_keeps_it_and_says_resume(model_dir, earlier, tmp_path):
    run_dir, _ = earlier
    first = run_dir / "checkpoints" / "checkpoint-2"  # the finished run stopped at step 3: this is the new run's
    done = interrupt_when([*train_args(model_dir, run_dir, **LONG, **{"train.save_every": 2}), "--overwrite"],
                          # the earlier run (set aside as run.previous) is deleted once the checkpoint is complete
                          ready=lambda: first.exists() and [p.name for p in tmp_path.iterdir()] == ["run"])
    assert_clean_failure(done, INTERRUPTED, "interrupted", "is kept: continue with",
                         f"peftlab train --resume {run_dir}")
    assert (first / "trainable.safetensors").is_file() and (run_dir / "config.yaml").is_file()
    assert not (run_dir / "summary.json").exists()  # the earlier run was replaced at the first checkpoint
    assert_only(tmp_path, "run")


def test_an_overwrite_killed_before_its_first_checkpoint_is_refused_until_the_set_aside_run_is_dealt_with(
        model_dir, earlier, tmp_path):
    run_dir, before = earlier
    aside = tmp_path / "run.previous"
    run_dir.rename(aside)  # what kill -9 leaves: the earlier run set aside, the new run's first files
    (run_dir / "checkpoints").mkdir(parents=True)
    done = run_cli(*train_args(model_dir, run_dir), "--overwrite")
    assert_clean_failure(done, 2, str(aside), f"move it back to {run_dir}")
    assert snapshot(aside) == before
