"""What --resume trusts, the logging window it restores, and the loss guard.

Through the real command line in a subprocess, as a user meets them:
  - a damaged newest checkpoint is skipped with a warning, and the run continues from the one
    before it to the very adapter the uninterrupted run ends with
  - when every checkpoint is damaged, one error line (exit 2) names the folder and the fix, and
    the run's files are left byte for byte as they were
  - a run stopped by Ctrl-C between two log lines and resumed logs exactly the losses of the
    uninterrupted run (the Trainer's averaging window travels with the checkpoint)
  - a learning rate of 1000 stops the run naming the step, the loss and the likely cause; with
    train.max_loss_ratio=null it runs to the end

The reference run logs every 4 steps and saves every 3, so checkpoint-3 falls inside a
logging window (steps 2-4).
"""
from __future__ import annotations

import json
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from fault_helpers import ENV, assert_clean_failure, ctrl_c_reaches_child, run_cli, snapshot, train_args, trained_run
from peftlab import PeftlabError
from peftlab.recipe import checkpoint, config as runconfig
from run_helpers import metrics, tiny_checkpoint

WINDOWED = {"train.log_every": 4}  # tiny_overrides saves every 3 of 6 steps: checkpoint-3 is mid-window
DIVERGING = {"optimizer.lr": 1000.0, "train.save_every": 1}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> pathlib.Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, model_dir) -> pathlib.Path:
    """An uninterrupted 6-step run: log lines at steps 1 and 4, checkpoints at 3 and 6."""
    return trained_run(model_dir, tmp_path_factory.mktemp("reference") / "run", **WINDOWED)


def resume(model_dir: pathlib.Path, run_dir: pathlib.Path) -> subprocess.CompletedProcess:
    return run_cli(*train_args(model_dir, run_dir, **WINDOWED), "--resume")


def training_lines(run_dir: pathlib.Path) -> list[dict]:
    """The training loss lines of metrics.jsonl, without what depends on the clock."""
    clocked = ("time", "train_runtime", "train_samples_per_second", "train_steps_per_second")
    return [{k: v for k, v in m.items() if k not in clocked} for m in metrics(run_dir)
            if "loss" in m or "train_loss" in m]


def assert_same_adapter(a: pathlib.Path, b: pathlib.Path) -> None:
    ta, tb = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (a, b))
    assert ta.keys() == tb.keys()
    for key in ta:
        assert ta[key].equal(tb[key]), key


def flip_last_byte(path: pathlib.Path) -> None:
    """Change one byte of tensor data: the safetensors header still reads, only the hash tells."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


# ---- --resume verifies the newest checkpoint ----------------------------------------------------


def test_resume_skips_a_damaged_newest_checkpoint_and_ends_where_the_uninterrupted_run_did(
        reference, model_dir, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    flip_last_byte(run_dir / "checkpoints" / "checkpoint-6" / "trainable.safetensors")
    done = resume(model_dir, run_dir)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert re.search(r"warning: skipping checkpoint \S*checkpoint-6: trainable\.safetensors differs from the "
                     r"sha256 in its manifest\.json", done.stderr), done.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"] == str(run_dir / "checkpoints" / "checkpoint-3")
    assert training_lines(run_dir) == training_lines(reference)
    assert_same_adapter(reference, run_dir)
    assert checkpoint.damage(run_dir / "checkpoints" / "checkpoint-6") is None  # written anew


def test_resume_with_every_checkpoint_damaged_is_one_error_line_and_changes_nothing(reference, model_dir, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    newest = run_dir / "checkpoints" / "checkpoint-6" / "optimizer.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # cut short
    flip_last_byte(run_dir / "checkpoints" / "checkpoint-3" / "trainable.safetensors")
    before = snapshot(run_dir)
    done = resume(model_dir, run_dir)
    assert_clean_failure(done, 2, f"no intact checkpoint in {run_dir / 'checkpoints'}",
                         "optimizer.safetensors has 100 bytes", "start it again with --overwrite")
    assert [line for line in done.stderr.splitlines() if line.startswith("error:")] == \
        [done.stderr.strip().splitlines()[-1]]
    assert "skipping checkpoint" in done.stderr and "checkpoint-3: trainable.safetensors differs" in done.stderr
    assert snapshot(run_dir) == before


def test_what_the_verification_finds_and_what_it_accepts_without_a_manifest(reference, tmp_path):
    folder = tmp_path / "checkpoints"
    shutil.copytree(reference / "checkpoints", folder)
    newest = folder / "checkpoint-6"
    assert checkpoint.damage(newest) is None
    rng = (newest / "rng.json").read_bytes()
    (newest / "rng.json").unlink()
    assert checkpoint.damage(newest) == "rng.json is missing"
    (newest / "rng.json").write_bytes(rng[:-1])
    assert checkpoint.damage(newest) == "rng.json has %d bytes, its manifest.json says %d (cut short?)" % (
        len(rng) - 1, len(rng))
    (newest / "rng.json").write_bytes(rng)
    flip_last_byte(newest / "rng.json")
    assert checkpoint.damage(newest) == "rng.json differs from the sha256 in its manifest.json (changed bytes)"
    (newest / "rng.json").write_bytes(rng)
    (newest / "manifest.json").write_text('{"files": {"rng.json": {"size": 1, "sha256": "0"}}}')
    assert checkpoint.damage(newest) == "its manifest.json is incomplete (no trainable.safetensors)"
    (newest / "manifest.json").write_text("{not json")
    assert checkpoint.damage(newest) == "its manifest.json is not a readable manifest"
    # written before manifests: accepted with a note when every file is there and reads
    (newest / "manifest.json").unlink()
    said = []
    assert checkpoint.latest(folder, warn=said.append) == newest
    assert said == [f"note: {newest} has no manifest.json (written by an older peftlab): only its file list, "
                    "safetensors headers and JSON were checked"]
    header_damaged = newest / "optimizer.safetensors"
    header_damaged.write_bytes(header_damaged.read_bytes()[:-4])
    said.clear()
    assert checkpoint.latest(folder, warn=said.append) == folder / "checkpoint-3"
    assert said[0].startswith(f"warning: skipping checkpoint {newest}: optimizer.safetensors cannot be read")
    flip_last_byte(folder / "checkpoint-3" / "scheduler.json")
    with pytest.raises(PeftlabError, match="no intact checkpoint in .*: start it again with --overwrite"):
        checkpoint.latest(folder, warn=said.append)


# ---- the logging window -------------------------------------------------------------------------


# Ctrl-C (a real SIGINT) during step 4, after checkpoint-3 is complete: peftlab.core.regularization
# runs once in every training forward, so its 4th call is step 4's.
CTRL_C_IN_STEP_4 = r"""
import os, signal, sys
import peftlab.core
from peftlab import cli

real_regularization, calls = peftlab.core.regularization, []
def regularization(model):
    calls.append(1)
    if len(calls) == 4:
        os.kill(os.getpid(), signal.SIGINT)
    return real_regularization(model)
peftlab.core.regularization = regularization
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_run_resumed_mid_window_logs_exactly_the_losses_of_the_uninterrupted_run(reference, model_dir, tmp_path):
    run_dir = tmp_path / "run"
    args = train_args(model_dir, run_dir, **WINDOWED)
    stopped = subprocess.run([sys.executable, "-c", CTRL_C_IN_STEP_4, *args], capture_output=True, text=True,
                             env=ENV, timeout=300, preexec_fn=ctrl_c_reaches_child)
    assert stopped.returncode == 130 and "Traceback" not in stopped.stderr, stopped.stderr
    assert [p.name for p in checkpoint.sorted_checkpoints(run_dir / "checkpoints")] == ["checkpoint-3"]
    assert [m["step"] for m in training_lines(run_dir)] == [1]  # step 4's line was never written
    done = resume(model_dir, run_dir)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    lines = training_lines(run_dir)
    assert [m["step"] for m in lines] == [1, 4, 6]  # step 4: the mean of steps 2-4; step 6: train_loss
    assert lines == training_lines(reference)  # loss, grad_norm, learning_rate, train_loss: every bit
    assert_same_adapter(reference, run_dir)


# ---- the loss guard -----------------------------------------------------------------------------


def test_a_diverging_loss_stops_the_run_naming_the_step_the_cause_and_the_kept_checkpoint(model_dir, tmp_path):
    run_dir = tmp_path / "run"
    done = run_cli(*train_args(model_dir, run_dir, **DIVERGING))
    assert_clean_failure(done, 2, "the training loss reached", "over 100x its first logged value",
                         "train.max_loss_ratio", "lower optimizer.lr (now 1000, the likely cause)", "kept", "--resume")
    stopped_at = int(re.search(r"reached \S+ at step (\d+)", done.stderr).group(1))
    kept = run_dir / "checkpoints" / f"checkpoint-{stopped_at - 1}"
    assert f"the last good checkpoint is {kept}" in done.stderr
    # the diverged step is not saved as a checkpoint, and no adapter pretends the run finished
    assert checkpoint.latest(run_dir / "checkpoints") == kept
    assert not (run_dir / "adapter").exists() and not (run_dir / "summary.json").exists()


def test_the_loss_guard_turned_off_lets_the_same_run_finish(model_dir, tmp_path):
    run_dir = tmp_path / "run"
    done = run_cli(*train_args(model_dir, run_dir, "train.max_loss_ratio=null", **DIVERGING))
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    losses = [m["loss"] for m in training_lines(run_dir) if "loss" in m]
    assert len(losses) == 6 and max(losses) > 100 * losses[0]  # what the guard would have stopped
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("ratio, accepted", [(None, True), (0, True), (1.5, True), (1, False), (-3, False)])
def test_max_loss_ratio_is_above_1_or_off(ratio, accepted):
    values = runconfig.default_dict()
    values["train"]["max_loss_ratio"] = ratio
    if accepted:
        assert runconfig.validate(values).train.max_loss_ratio == (None if ratio is None else float(ratio))
    else:
        with pytest.raises(PeftlabError, match=r"train.max_loss_ratio = .* must be > 1 \(or null or 0"):
            runconfig.validate(values)
