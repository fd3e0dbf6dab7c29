"""Two processes (torchrun, gloo on CPU) x batch b == one process x batch 2b, and only rank 0 writes.

Both runs train the tiny BERT for one SGD step from the same seed, so the same initial
weights. With plain SGD the update is -lr x gradient, so equal weights after the step mean
equal first-step gradients; the first-step loss is compared from metrics.jsonl.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from run_helpers import metrics, step_losses, tiny_checkpoint, tiny_overrides

LR = 0.5


def _overrides(model_dir, output, batch):
    return tiny_overrides(model_dir, output, **{
        "train.batch_size": batch, "train.steps": 1, "train.save_every": 1, "optimizer.name": "sgd",
        "optimizer.lr": LR, "schedule.name": "constant"})


def _train(argv_prefix, model_dir, output, batch):
    argv = [*argv_prefix, "train"]
    for o in _overrides(model_dir, output, batch):
        argv += ["--set", o]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_two_processes_match_one_process_with_twice_the_batch(tmp_path):
    model_dir = tiny_checkpoint(tmp_path.parent)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "peftlab"]
    two_out = _train(torchrun, model_dir, tmp_path / "two", batch=4)
    _train([sys.executable, "-m", "peftlab"], model_dir, tmp_path / "one", batch=8)

    two, one = tmp_path / "two", tmp_path / "one"
    assert json.loads((two / "summary.json").read_text())["processes"] == 2
    assert json.loads((one / "summary.json").read_text())["processes"] == 1
    # the same first-step loss ...
    assert step_losses(two)[1] == pytest.approx(step_losses(one)[1], abs=1e-6)
    grad_norms = [[m["grad_norm"] for m in metrics(d) if "grad_norm" in m] for d in (one, two)]
    assert grad_norms[1] == pytest.approx(grad_norms[0], rel=1e-5)
    # ... and the same gradients: after one SGD step from equal weights the weights are equal
    a = load_file(one / "adapter" / "adapter_model.safetensors")
    b = load_file(two / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-7, rtol=1e-5)
    lora_b = [k for k in a if k.endswith(".B")]  # B starts at zero: after the step it is -lr x its gradient
    assert lora_b and all(torch.count_nonzero(a[k]) > 0 for k in lora_b)

    # only rank 0 wrote: one report, one line per log, one TensorBoard writer
    assert two_out.count("run saved to") == 1
    assert [m["step"] for m in metrics(two) if "loss" in m and "grad_norm" in m] == [1]
    writers = {p.name.rsplit(".", 2)[-2] for p in (two / "tensorboard").iterdir()}  # the writing process ids
    assert len(writers) == 1
