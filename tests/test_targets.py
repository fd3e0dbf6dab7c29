"""Site selection is a pure function: names, globs, regexes, all-linear, callables, exclude, overrides."""
import pytest
from torch import nn

from peftlab import PeftlabError
from peftlab.targets import adaptable_names, overrides_for, select
from conftest import tiny_bert, tiny_gpt2


@pytest.fixture(scope="module")
def bert():
    return tiny_bert()


def test_name_matches_last_components(bert):
    assert select(bert, ["query"]) == [f"encoder.layer.{i}.attention.self.query" for i in range(2)]
    assert select(bert, "attention.output.dense") == [f"encoder.layer.{i}.attention.output.dense" for i in range(2)]
    # a name matches whole components only: "uery" is not "query"
    with pytest.raises(PeftlabError):
        select(bert, ["uery"])


def test_glob_regex_callable_exclude(bert):
    assert select(bert, "encoder.layer.1.*.query") == ["encoder.layer.1.attention.self.query"]
    assert select(bert, r"re:.*layer\.0\..*(query|value)") == [
        "encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.value"]
    assert select(bert, lambda name, m: isinstance(m, nn.Linear) and name.endswith("key")) == [
        f"encoder.layer.{i}.attention.self.key" for i in range(2)]
    assert select(bert, ["query", "value"], exclude=["re:.*layer\\.1\\..*"]) == [
        "encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.value"]


def test_all_linear_skips_heads():
    gpt = tiny_gpt2()
    chosen = select(gpt, "all-linear")
    assert "lm_head" not in chosen and all("c_" in n for n in chosen)
    assert len(chosen) == 2 * 4  # c_attn, c_proj (attention), c_fc, c_proj (mlp) per layer


def test_nothing_matched_lists_what_exists(bert):
    with pytest.raises(PeftlabError, match="matched no module.*encoder.layer.0.attention.self.query"):
        select(bert, ["q_proj"])
    with pytest.raises(PeftlabError, match="no targets"):
        select(bert, [])


def test_overrides_first_match_wins(bert):
    name = "encoder.layer.0.attention.self.value"
    module = bert.get_submodule(name)
    assert overrides_for(name, module, {"value": {"r": 16}, "re:.*": {"r": 2}}) == {"r": 16}
    assert overrides_for(name, module, {"query": {"r": 16}}) == {}


def test_adaptable_names_in_model_order(bert):
    names = adaptable_names(bert)
    assert names[0] == "embeddings.word_embeddings"
    assert "encoder.layer.0.attention.self.query" in names and "pooler.dense" in names
