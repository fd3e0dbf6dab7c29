"""Validation accepts nothing silently: non-finite numbers, misshapen lists and YAML alias bombs.

Through the real command line, `peftlab train --print-config` checks a config without loading
a model: the model here is a stand-in folder whose config.json is no model at all, so any
attempt to load it would fail. Each bad config must end with exit status 2 and one line naming
the key (or file) and the fix. The library refuses the same values in a method's config.
"""
from __future__ import annotations

import math
import pathlib
import time

import pytest

import peftlab
from fault_helpers import assert_clean_failure, run_cli
from peftlab import PeftlabError, cli
from peftlab.targets import select

STAND_IN_MODEL = "not a model: loading it would fail\n"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> pathlib.Path:
    folder = tmp_path_factory.mktemp("stand-in-model")
    (folder / "config.json").write_text(STAND_IN_MODEL)
    return folder


def print_config(model_dir: pathlib.Path, *sets: str, config: pathlib.Path | None = None):
    args = ["train", *([config] if config else []), "--print-config", "--set", f"model={model_dir}"]
    for item in sets:
        args += ["--set", item]
    return run_cli(*args, timeout=60)


def assert_refused(done, *phrases: str) -> None:
    """Exit 2, no traceback, the phrases, and all of it on one line."""
    assert_clean_failure(done, 2, *phrases)
    assert done.stdout == "" and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_print_config_validates_without_loading_the_model(model_dir):
    done = print_config(model_dir, "optimizer.lr=1e-3", "method.targets=[query, value]")
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert f"model: {model_dir}" in done.stdout and "lr: 0.001" in done.stdout
    assert (model_dir / "config.json").read_text() == STAND_IN_MODEL


# Through the real command line in a subprocess: the cases of the issue.
@pytest.mark.parametrize("override, phrases", [
    ("optimizer.lr=.nan", ("optimizer.lr = nan", "not a finite number")),
    ("optimizer.lr=.inf", ("optimizer.lr = inf", "not a finite number")),
    ("optimizer.lr=inf", ("optimizer.lr = 'inf'", "give a number")),  # plain `inf` is a string in YAML
    ("method.alpha=.nan", ("method.alpha = nan", "not a finite number")),
    ("method.targets=[[query]]", ("targets = [['query']]", "not a pattern", "'all-linear'", "e.g. ['query'")),
    ("data.split=[0.8, [0.1], 0.1]", ("data.split = [0.8, [0.1], 0.1]", "three fractions")),
])
def test_the_cli_refuses_non_finite_numbers_and_nested_lists(model_dir, override, phrases):
    assert_refused(print_config(model_dir, override), *phrases)


@pytest.mark.parametrize("text, phrases", [
    ("optimizer:\n  name: adamw\n  lr: .nan\n", ("optimizer.lr = nan", "finite")),
    ("method:\n  name: lora\n  targets: [[query]]\n", ("targets = [['query']]", "not a pattern")),
])
def test_the_cli_refuses_them_in_a_config_file(model_dir, tmp_path, text, phrases):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    assert_refused(print_config(model_dir, config=path), *phrases)


# The same command line in-process (fast): every other section and field kind.
@pytest.mark.parametrize("override, phrases", [
    ("optimizer.lr=-.inf", ("optimizer.lr = -inf", "not a finite number")),
    ("optimizer.lr=1e999", ("optimizer.lr = inf", "not a finite number")),
    ("method.alpha=inf", ("alpha must be a number", "'inf'")),
    ("method.overrides={value: {alpha: .nan}}", ("method.overrides.value.alpha = nan",)),
    ("optimizer.betas=[0.9, .nan]", ("optimizer.betas[1] = nan",)),
    ("loss.label_smoothing=.nan", ("loss.label_smoothing = nan",)),
    ("train.epochs=.inf", ("train.epochs = inf",)),
    ("method.exclude=[[value]]", ("exclude = [['value']]", "not a pattern")),
    ("method.also_train=[[classifier]]", ("also_train", "not a pattern")),
    ("method.also_train=classifier", ("also_train = 'classifier'", "a list of module names")),
    ("method.overrides=[value]", ("overrides = ['value']", "mapping of pattern -> field values")),
    ("method.overrides={value: 16}", ("overrides['value'] = 16", "mapping of field names")),
    ("method.alpha=[16]", ("alpha must be a number", "[16]")),
    ("data.split=[0.9, 0.1]", ("data.split = [0.9, 0.1]", "three fractions")),
    ("data.split=[true, 0, 0]", ("data.split = [True, 0, 0]", "three fractions")),
    ("optimizer.betas=[[0.9], 0.999]", ("optimizer.betas", "a list of 2 numbers")),
    ("optimizer.amsgrad=1", ("optimizer.amsgrad = 1", "true or false")),
    ("loss.label_smoothing=[0.1, 0.2]", ("loss.label_smoothing = [0.1, 0.2]", "a number")),
])
def test_every_section_refuses_them_naming_the_key(model_dir, capsys, override, phrases):
    code = cli.main(["train", "--print-config", "--set", f"model={model_dir}", "--set", override])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    for phrase in phrases:
        assert phrase in err, err


def billion_laughs(path: pathlib.Path, levels: int = 9) -> pathlib.Path:
    """Nine aliases of nine aliases ...: 9**9 (387 million) strings from 700 bytes."""
    lines = ["method:", "  name: lora", "  targets:", "    - &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"    - &l{n} [{', '.join([f'*l{n - 1}'] * 9)}]" for n in range(1, levels)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_yaml_alias_bomb_fails_at_once_naming_the_file(model_dir, tmp_path):
    bomb = billion_laughs(tmp_path / "bomb.yaml")
    plain = tmp_path / "plain.yaml"
    plain.write_text("method: {name: lora, targets: [query]}\n")
    # "at once": no slower than reading a plain config, whatever the start-up time of the
    # command on a busy machine (expanding the aliases took 85 s and 2 GB)
    started = time.monotonic()
    assert print_config(model_dir, config=plain).returncode == 0
    reading = time.monotonic() - started
    started = time.monotonic()
    done = print_config(model_dir, config=bomb)
    elapsed = time.monotonic() - started
    assert_refused(done, str(bomb), "alias *l0", "line 5", "write the values out")
    assert elapsed < 2 * reading + 2, f"{elapsed:.1f} s against {reading:.1f} s for a plain config"


# ---- the same refusals in-process: the loaders and the library's method configs -------------------


def test_the_yaml_loaders_refuse_aliases_in_well_under_a_second(tmp_path):
    from peftlab.bench import suite
    from peftlab.recipe import config

    bomb = billion_laughs(tmp_path / "bomb.yaml")
    for read in (config.read_yaml, suite.load):
        started = time.monotonic()
        with pytest.raises(PeftlabError, match=r"bomb.yaml uses the alias \*l0 at line 5.*aliases are refused"):
            read(str(bomb))
        assert time.monotonic() - started < 1
    anchored = tmp_path / "anchored.yaml"  # an anchor without an alias repeats nothing: it passes
    anchored.write_text("train: &t {steps: 3}\n")
    assert config.read_yaml(anchored) == {"train": {"steps": 3}}


def test_yaml_nested_thousands_deep_is_one_error(tmp_path):
    from peftlab.recipe import config

    path = tmp_path / "deep.yaml"
    path.write_text("seed: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(PeftlabError, match="deep.yaml is not valid YAML.*nested thousands deep"):
        config.read_yaml(path)


@pytest.mark.parametrize("make, field", [
    (lambda: peftlab.LoRA(alpha=float("nan")), "LoRA alpha = nan is not a finite number"),
    (lambda: peftlab.LoRA(alpha=float("-inf")), "LoRA alpha = -inf"),
    (lambda: peftlab.DoRA(dropout=float("nan")), "DoRA dropout = nan"),
    (lambda: peftlab.AdaLoRA(total_steps=100, beta1=math.inf), "AdaLoRA beta1 = inf"),
    (lambda: peftlab.LoRA(overrides={"value": {"alpha": math.nan}}), r"LoRA overrides\['value'\]\['alpha'\] = nan"),
    (lambda: peftlab.VeRA(basis_shape=[64, math.inf]), r"VeRA basis_shape\[1\] = inf"),
])
def test_method_configs_refuse_non_finite_numbers_naming_the_field(make, field):
    with pytest.raises(PeftlabError, match=field):
        make()


@pytest.mark.parametrize("fields, message", [
    ({"targets": [["query"]]}, r"LoRA targets = \[\['query'\]\] holds \['query'\], which is not a pattern"),
    ({"targets": 3}, "LoRA targets = 3 must be a pattern or a list of patterns"),
    ({"targets": ["re:(query"]}, "LoRA targets: 're:\\(query' is not a valid regular expression"),
    ({"exclude": [None]}, "LoRA exclude = \\[None\\] holds None"),
    ({"also_train": "classifier"}, "LoRA also_train = 'classifier' must be a list of module names"),
    ({"also_train": [["classifier"]]}, "LoRA also_train .* is not a pattern"),
    ({"overrides": ["value"]}, "LoRA overrides = \\['value'\\] must be a mapping"),
    ({"overrides": {"value": 16}}, "LoRA overrides\\['value'\\] = 16 must be a mapping of field names"),
    ({"overrides": {("query", "value"): {"r": 2}}}, "LoRA overrides key .* must be one pattern"),
    ({"alpha": [16]}, "LoRA alpha must be a number, got \\[16\\]"),
    ({"rslora": 1}, "LoRA rslora must be True or False"),
])
def test_method_configs_refuse_misshapen_fields_naming_them(fields, message):
    with pytest.raises(PeftlabError, match=message):
        peftlab.LoRA(**fields)


def test_well_formed_fields_still_pass(tmp_path):
    config = peftlab.LoRA(r=2, alpha=4, targets=("query", "re:.*value$", lambda name, module: False),
                          exclude="*layer.0.*", overrides={"value": {"r": 1}}, also_train=["pooler"])
    assert config.overrides == {"value": {"r": 1}} and peftlab.LoRA(overrides=None).overrides is None
    from conftest import tiny_bert

    assert select(tiny_bert(), ["query"], exclude=["*layer.0.*"]) == ["encoder.layer.1.attention.self.query"]
    with pytest.raises(PeftlabError, match=r"targets = \[\['query'\]\] holds"):
        select(tiny_bert(), [["query"]])
