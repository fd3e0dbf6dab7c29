"""Values in run configs and --set overrides are read as users write them."""
from peftlab.recipe.config import parse_override


def test_exponent_floats_and_ints():
    assert parse_override("optimizer.lr=5e-4") == {"optimizer": {"lr": 0.0005}}
    assert parse_override("optimizer.lr=1E-3") == {"optimizer": {"lr": 0.001}}
    assert parse_override("train.steps=10") == {"train": {"steps": 10}}
    assert isinstance(parse_override("train.steps=10")["train"]["steps"], int)
    assert parse_override("method.targets=[query, value]") == {"method": {"targets": ["query", "value"]}}
    assert parse_override("model=e5") == {"model": "e5"}  # not a number: stays a string
