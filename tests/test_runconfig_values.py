"""Values in run configs and --set overrides are read as users write them."""
from peftlab.recipe.config import parse_override


def test_exponent_floats_and_ints():
    assert parse_override("optimizer.lr=5e-4") == {"optimizer": {"lr": 0.0005}}
    assert parse_override("optimizer.lr=1E-3") == {"optimizer": {"lr": 0.001}}
    assert parse_override("train.steps=10") == {"train": {"steps": 10}}
    assert isinstance(parse_override("train.steps=10")["train"]["steps"], int)
    assert parse_override("method.targets=[query, value]") == {"method": {"targets": ["query", "value"]}}
    assert parse_override("model=e5") == {"model": "e5"}  # not a number: stays a string


# The default job as it was written by hand before the dataclasses generated it. Bench records
# hash their configs completed with it (runner.with_recipe_defaults), so it must not drift:
# same keys, same order, same types (`epochs: 1` an integer).
DEFAULT_JOB = """\
model: minilm-l6
task: movie-sentiment
data:
  max_length: 64
  split: [0.8, 0.1, 0.1]
method:
  name: lora
  r: 8
  alpha: 16
  targets: [query, value]
optimizer:
  name: adamw
  lr: 2.0e-3
  weight_decay: 0.0
loss:
  name: cross_entropy
schedule:
  name: linear
  warmup_ratio: 0.0
train:
  batch_size: 32
  epochs: 1
seed: 0
"""


def test_the_default_job_is_generated_from_the_dataclasses_unchanged():
    import json

    from peftlab.recipe import config

    generated = config.default_dict()
    assert json.dumps(generated) == json.dumps(config._load_yaml(DEFAULT_JOB))
    generated["method"]["r"] = 2  # each call is a fresh copy
    assert config.default_dict()["method"]["r"] == 8 and config.RunConfig().method == config.DEFAULT_METHOD


def test_validated_sections_hold_typed_defaults():
    from peftlab.recipe import config

    run = config.validate({"model": "minilm-l6"})  # sections left out take the dataclass defaults
    assert run.train.epochs == 1.0 and isinstance(run.train.epochs, float)
    assert run.method == config.DEFAULT_METHOD and run.optimizer == config.DEFAULT_OPTIMIZER
    assert run.to_dict()["data"]["split"] == [0.8, 0.1, 0.1]
