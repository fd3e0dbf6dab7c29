"""Methods that change while training, through the training recipe (transformers.Trainer and its
step hook) on the real MiniLM-L6: 50 steps of movie sentiment, then the saved adapter shows that
the schedule happened."""
import pytest
import torch
from safetensors.torch import load_file

from peftlab.recipe import config as runconfig, trainer as recipe

COMMON = ["model=minilm-l6", "task=movie-sentiment", "data.limit=300", "data.max_length=32", "train.steps=50",
          "train.batch_size=4", "train.eval_batch_size=32", "train.save_every=1000", "train.progress=false",
          "optimizer.lr=0.001", "method.targets=[query,value]"]
SITES = 12  # query and value in 6 layers


def saved(name: str, tensors: dict) -> list[torch.Tensor]:
    return [t for k, t in sorted(tensors.items()) if k.endswith(f".adapters.default.{name}")]


def check_increlora(tensors):
    # from rank 1 to 2 on average: +1 rank for 6 sites at steps 20 and 30
    ranks = [int(t) for t in saved("rank", tensors)]
    assert len(ranks) == SITES and sum(ranks) == 2 * SITES and min(ranks) == 1
    assert all(int(t) == 0 for t in saved("reserve", tensors))


def check_lamda(tensors):
    # one more column of B every 0.25 * 50 steps: all 4 frozen after 50 steps
    assert [int(t) for t in saved("frozen_columns", tensors)] == [4] * SITES


def check_sora(tensors):
    gates = torch.cat(saved("gate", tensors))
    assert gates.numel() == 4 * SITES and 0 < int((gates == 0).sum()) < gates.numel()


CASES = {
    "increlora": (["method.r=1", "method.target_rank=2", "method.warmup=10", "method.interval=10"], check_increlora),
    "lamda": (["method.r=4", "method.eta=0.25", "method.total_steps=50"], check_lamda),
    "sora": (["method.r=4", "method.xi=0.02"], check_sora),
}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(CASES))
def test_schedule_runs_through_the_recipe(method, tmp_path):
    fields, check = CASES[method]
    run = runconfig.build(overrides=[*COMMON, f"method.name={method}", *fields, f"output={tmp_path / 'run'}"])
    summary = recipe.train(run, echo=lambda *args: None)
    assert summary["steps"] == 50
    check(load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
