"""peftlab's own adapter format: round trips, the base-model fingerprint, atomic writes, bad input.

Every failing load must leave the model exactly as it was: same state dict, no `_peftlab`
attribute (or, when adapters were attached before, the same ones).
"""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import peftlab
from conftest import image_batch, output_of, tiny_bert, tiny_cnn, tiny_gpt2, token_batch
from peftlab.io import files as io_files

QV = ["query", "value"]


def bert(hidden: int = 32, layers: int = 2, seed: int = 0):
    """A tiny random BERT whose size can differ from conftest's (for 'made for another model')."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    return BertModel(BertConfig(vocab_size=100, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=64)).eval()


def perturb(model, seed: int = 7, size: float = 0.1):
    """Move every trainable parameter (B included) off its initial value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peftlab.trainable_parameters(model).values():
            p.add_(size * torch.randn(p.shape, generator=g, dtype=p.dtype))


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, dict(peftlab.adapter_configs(model))


def assert_untouched(model, snap):
    state, configs = snap
    now = model.state_dict()
    assert set(now) == set(state)
    for k, v in state.items():
        assert torch.equal(now[k], v), f"{k} changed"
    assert dict(peftlab.adapter_configs(model)) == configs
    if not configs:
        assert "_peftlab" not in model.__dict__


def saved_adapter(tmp_path, make_model=tiny_bert, config=None, batch=None):
    """Attach, perturb and save an adapter; returns (directory, the adapted output)."""
    model = make_model()
    peftlab.attach(model, config or peftlab.LoRA(r=4, targets=QV))
    perturb(model)
    with torch.no_grad():
        out = output_of(model, batch or token_batch())
    return peftlab.save(model, tmp_path / "adapter"), out


# ---- round trips ---------------------------------------------------------------------------


def test_round_trip_several_adapters_keys_fingerprint_and_active_set(tmp_path):
    model, batch = tiny_bert(), token_batch()
    peftlab.attach(model, peftlab.LoRA(r=4, targets=QV, also_train=["pooler"]), name="a")
    peftlab.attach(model, peftlab.DoRA(r=2, targets=["key"]), name="b")
    peftlab.attach(model, peftlab.config("olora", r=2, targets=["intermediate.dense"]), name="c")
    perturb(model)
    peftlab.set_active(model, ["a", "c"])
    with torch.no_grad():
        expected = output_of(model, batch)
    directory = peftlab.save(model, tmp_path / "run")

    # the tensor file holds exactly the adapter keys of model.state_dict(), and the also_train ones
    saved = load_file(directory / "adapter_model.safetensors")
    state = model.state_dict()
    adapter_keys = {k for k in state if ".adapters." in k}
    assert set(saved) == adapter_keys | {"pooler.dense.weight", "pooler.dense.bias"}
    for k, v in saved.items():
        assert torch.equal(v, state[k])

    document = json.loads((directory / "adapter_config.json").read_text())
    assert document["format"] == "peftlab" and document["format_version"] == 1
    assert document["active"] == ["a", "c"]
    assert document["adapters"]["b"]["config"]["method"] == "dora"
    sites = document["adapters"]["a"]["sites"]
    assert sites["encoder.layer.1.attention.self.value"] == {"kind": "linear", "shape": [32, 32]}
    assert document["adapters"]["c"]["sites"]["encoder.layer.0.intermediate.dense"]["shape"] == [64, 32]

    fresh = tiny_bert()
    peftlab.load(fresh, directory)
    assert list(peftlab.adapter_configs(fresh)) == ["a", "b", "c"]
    assert peftlab.adapter_configs(fresh)["b"] == peftlab.adapter_configs(model)["b"]
    with torch.no_grad():
        torch.testing.assert_close(output_of(fresh, batch), expected, atol=1e-6, rtol=0)
    assert set(fresh.state_dict()) == set(state)
    # the inactive adapter came back inactive and frozen; the active ones trainable
    trainable = peftlab.trainable_parameters(fresh)
    assert not any(".adapters.b." in k for k in trainable)
    assert any(".adapters.a." in k for k in trainable) and "pooler.dense.weight" in trainable


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_residual_adapters_reproduce_outputs_on_a_fresh_base(tmp_path, init):
    model, batch = tiny_gpt2(), token_batch()
    base_weight = model.transformer.h[0].attn.c_attn.weight.detach().clone()
    peftlab.attach(model, peftlab.LoRA(r=4, init=init, targets=["c_attn", "c_fc"]))
    perturb(model)
    with torch.no_grad():
        expected = output_of(model, batch)
    peftlab.save(model, tmp_path / "a")

    fresh = tiny_gpt2()
    peftlab.load(fresh, tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(output_of(fresh, batch), expected, atol=1e-6, rtol=0)
    # the fresh host holds W0 - s B0 A0 exactly as the original did, and detach gives W0 back
    torch.testing.assert_close(fresh.transformer.h[0].attn.c_attn.weight, model.transformer.h[0].attn.c_attn.weight,
                               atol=0, rtol=0)
    peftlab.detach(fresh)
    assert torch.equal(fresh.transformer.h[0].attn.c_attn.weight, base_weight)


def test_round_trip_conv2d_and_embedding_hosts(tmp_path):
    model, batch = tiny_cnn(), image_batch()
    peftlab.attach(model, peftlab.LoRA(r=2, targets=["conv1", "conv2"], also_train=["head"]))
    perturb(model)
    with torch.no_grad():
        expected = output_of(model, batch)
    peftlab.save(model, tmp_path / "cnn")
    fresh = tiny_cnn()
    peftlab.load(fresh, tmp_path / "cnn")
    with torch.no_grad():
        torch.testing.assert_close(output_of(fresh, batch), expected, atol=1e-6, rtol=0)

    model, batch = tiny_bert(), token_batch()
    peftlab.attach(model, peftlab.LoRA(r=4, targets=["word_embeddings"]))
    perturb(model)
    with torch.no_grad():
        expected = output_of(model, batch)
    peftlab.save(model, tmp_path / "emb")
    fresh = tiny_bert()
    peftlab.load(fresh, tmp_path / "emb")
    with torch.no_grad():
        torch.testing.assert_close(output_of(fresh, batch), expected, atol=1e-6, rtol=0)


def test_name_selects_what_is_saved_and_what_is_loaded(tmp_path):
    model = tiny_bert()
    peftlab.attach(model, peftlab.LoRA(r=2, targets=["query"]), name="q")
    peftlab.attach(model, peftlab.LoRA(r=2, targets=["value"]), name="v")
    peftlab.save(model, tmp_path / "only_v", name="v")
    assert list(json.loads((tmp_path / "only_v/adapter_config.json").read_text())["adapters"]) == ["v"]
    peftlab.save(model, tmp_path / "both")

    fresh = tiny_bert()
    peftlab.load(fresh, tmp_path / "both", name="q")
    assert list(peftlab.adapter_configs(fresh)) == ["q"]
    peftlab.load(fresh, tmp_path / "both", name="v")  # adds to what is attached
    assert list(peftlab.adapter_configs(fresh)) == ["q", "v"]


def test_load_keeps_the_active_set_of_adapters_attached_before(tmp_path):
    directory, _ = saved_adapter(tmp_path)
    model = tiny_bert()
    peftlab.attach(model, peftlab.LoRA(r=2, targets=["key"]), name="mine")
    peftlab.load(model, directory)
    assert peftlab.core.state_of(model).active == ["mine", "default"]


# ---- atomic writes -------------------------------------------------------------------------


def test_failed_write_leaves_the_previous_save_loadable_and_no_temporary_files(tmp_path, monkeypatch):
    directory, first_out = saved_adapter(tmp_path)
    model = tiny_bert()
    peftlab.attach(model, peftlab.LoRA(r=4, targets=QV))
    perturb(model, seed=99)

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(io_files.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        peftlab.save(model, directory)
    monkeypatch.undo()

    assert sorted(os.listdir(directory)) == ["adapter_config.json", "adapter_model.safetensors"]
    fresh = tiny_bert()
    peftlab.load(fresh, directory)
    with torch.no_grad():
        torch.testing.assert_close(output_of(fresh, token_batch()), first_out, atol=1e-6, rtol=0)


def test_tensors_of_one_save_with_the_config_of_another_are_refused(tmp_path, monkeypatch):
    # A save killed between its two files leaves new tensors next to the old config: the
    # recorded checksum tells, and load refuses rather than mixing two adapters.
    directory, _ = saved_adapter(tmp_path)
    model = tiny_bert()
    peftlab.attach(model, peftlab.LoRA(r=4, targets=QV))
    perturb(model, seed=99)
    real_replace = os.replace

    def crash_on_config(src, dst):
        if str(dst).endswith("adapter_config.json"):
            raise OSError("killed")
        real_replace(src, dst)

    monkeypatch.setattr(io_files.os, "replace", crash_on_config)
    with pytest.raises(OSError):
        peftlab.save(model, directory)
    monkeypatch.undo()
    fresh = tiny_bert()
    snap = snapshot(fresh)
    with pytest.raises(peftlab.PeftlabError, match="checksum"):
        peftlab.load(fresh, directory)
    assert_untouched(fresh, snap)


def test_written_files_get_ordinary_permissions(tmp_path):
    directory, _ = saved_adapter(tmp_path)
    umask = os.umask(0)
    os.umask(umask)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert os.stat(directory / name).st_mode & 0o777 == 0o666 & ~umask


def test_a_directory_is_published_whole_or_not_at_all(tmp_path):
    target = tmp_path / "out"
    with io_files.new_directory(target) as scratch:
        io_files.write_json(scratch / "a.json", {"b": 1, "a": [2]}, sort_keys=True)
        (scratch / "sub").mkdir()
        io_files.write_text(scratch / "sub" / "c.txt", "c")
        assert not target.exists()
    assert (target / "a.json").read_text() == '{\n  "a": [\n    2\n  ],\n  "b": 1\n}\n'
    assert (target / "sub" / "c.txt").read_text() == "c"

    with pytest.raises(RuntimeError):
        with io_files.new_directory(target) as scratch:
            (scratch / "half").write_text("x")
            raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the old one stays, no scratch left
    assert sorted(p.name for p in target.iterdir()) == ["a.json", "sub"]

    with io_files.new_directory(target, replace=False) as scratch:  # another writer finished first
        (scratch / "mine").write_text("x")
    assert sorted(p.name for p in target.iterdir()) == ["a.json", "sub"]
    with io_files.new_directory(target) as scratch:
        (scratch / "new").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in target.iterdir()) == ["new"]


# ---- bad input: each leaves the model exactly as it was ------------------------------------


def check_refused(model, directory, *patterns):
    snap = snapshot(model)
    with torch.no_grad():
        before = output_of(model, token_batch())
    with pytest.raises(peftlab.PeftlabError) as err:
        peftlab.load(model, directory)
    for pattern in patterns:
        assert pattern in str(err.value), str(err.value)
    assert_untouched(model, snap)
    with torch.no_grad():
        assert torch.equal(output_of(model, token_batch()), before)
    return str(err.value)


def test_directory_without_adapter_files(tmp_path):
    (tmp_path / "empty").mkdir()
    check_refused(tiny_bert(), tmp_path / "empty", "no adapter files", "adapter_config.json")
    check_refused(tiny_bert(), tmp_path / "missing", "does not exist")
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled/adapter_model.bin").write_bytes(b"\x80\x04")
    check_refused(tiny_bert(), tmp_path / "pickled", "pickle", "safetensors")
    (tmp_path / "other").mkdir()
    (tmp_path / "other/adapter_config.json").write_text('{"hello": 1}')
    check_refused(tiny_bert(), tmp_path / "other", "neither a peftlab adapter config")


def test_config_without_tensor_file(tmp_path):
    directory, _ = saved_adapter(tmp_path)
    (directory / "adapter_model.safetensors").unlink()
    check_refused(tiny_bert(), directory, "adapter_model.safetensors is missing")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "flipped byte"])
def test_damaged_safetensors_file(tmp_path, damage):
    directory, _ = saved_adapter(tmp_path)
    path = directory / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        data = data[: len(data) - 100]
    elif damage == "garbage":
        data = bytearray(b"not a tensor file at all" * 4)
    elif damage == "empty":
        data = bytearray()
    else:
        data[-3] ^= 0xFF  # inside the last tensor's values: the header still parses
    path.write_bytes(bytes(data))
    message = check_refused(tiny_bert(), directory, str(path), "damaged", "re-save")
    if damage == "flipped byte":
        assert "checksum" in message


def test_damaged_or_invalid_config_json(tmp_path):
    directory, _ = saved_adapter(tmp_path)
    path = directory / "adapter_config.json"
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    check_refused(tiny_bert(), directory, "not valid JSON", "re-save")
    path.write_text("[1, 2]")
    check_refused(tiny_bert(), directory, "not an adapter config")


def edit_config(directory, change):
    path = directory / "adapter_config.json"
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))


def test_config_with_unknown_fields_or_method(tmp_path):
    directory, _ = saved_adapter(tmp_path)
    edit_config(directory, lambda d: d["adapters"]["default"]["config"].update(rank_dropout=0.1))
    check_refused(tiny_bert(), directory, "rank_dropout", "unknown field")

    directory, _ = saved_adapter(tmp_path / "2")
    edit_config(directory, lambda d: d["adapters"]["default"]["config"].update(method="lorax"))
    check_refused(tiny_bert(), directory, "unknown method 'lorax'", "registered methods")

    directory, _ = saved_adapter(tmp_path / "3")
    edit_config(directory, lambda d: d.update(compression="zstd"))
    check_refused(tiny_bert(), directory, "compression", "unknown field")

    directory, _ = saved_adapter(tmp_path / "4")
    edit_config(directory, lambda d: d["adapters"]["default"]["config"].update(r=-1))
    check_refused(tiny_bert(), directory, "positive integer")

    directory, _ = saved_adapter(tmp_path / "5")
    edit_config(directory, lambda d: d.update(format_version=7))
    check_refused(tiny_bert(), directory, "format_version 7", "upgrade peftlab")


def test_adapter_made_for_another_model_shape_mismatch(tmp_path):
    directory, _ = saved_adapter(tmp_path)
    message = check_refused(bert(hidden=48), directory, "made for another model", "48 x 48", "32 x 32")
    assert "encoder.layer.0.attention.self.query" in message


def test_adapter_made_for_another_model_missing_and_extra_layers(tmp_path):
    directory, _ = saved_adapter(tmp_path, make_model=lambda: bert(layers=3))
    check_refused(bert(layers=2), directory, "made for another model", "no layer 'encoder.layer.2")
    directory, _ = saved_adapter(tmp_path / "small", make_model=lambda: bert(layers=2))
    check_refused(bert(layers=3), directory, "made for another model", "targets select", "encoder.layer.2")
    # a different architecture: the targets find nothing at all
    check_refused(tiny_gpt2(), directory, "made for another model", "no layer")


def test_adapter_named_like_one_already_attached(tmp_path):
    directory, _ = saved_adapter(tmp_path)
    model = tiny_bert()
    peftlab.attach(model, peftlab.LoRA(r=2, targets=["key"]))
    check_refused(model, directory, "attached already")
    snap = snapshot(model)
    with pytest.raises(peftlab.PeftlabError, match="holds no adapter named 'other'"):
        peftlab.load(model, directory, name="other")
    assert_untouched(model, snap)


def test_failure_while_attaching_the_second_adapter_rolls_back_the_first(tmp_path, monkeypatch):
    model = tiny_bert()
    peftlab.attach(model, peftlab.config("pissa", r=2, targets=["query"]), name="a")
    peftlab.attach(model, peftlab.LoRA(r=2, targets=["value"]), name="b")
    peftlab.save(model, tmp_path / "two")

    real_attach = peftlab.core.attach

    def attach_then_fail(model, config, name="default", calibration=None, *, state_dict=None):
        if name == "b":
            raise RuntimeError("out of memory")
        return real_attach(model, config, name, calibration, state_dict=state_dict)

    monkeypatch.setattr(peftlab.core, "attach", attach_then_fail)
    fresh = tiny_bert()
    snap = snapshot(fresh)
    with pytest.raises(RuntimeError):
        peftlab.load(fresh, tmp_path / "two")
    assert_untouched(fresh, snap)  # the residual host weights of 'a' restored too


def test_save_refuses_bad_arguments(tmp_path):
    model = tiny_bert()
    with pytest.raises(peftlab.PeftlabError, match="no peftlab adapters"):
        peftlab.save(model, tmp_path / "x")
    peftlab.attach(model, peftlab.LoRA(r=2, targets=["query"]))
    with pytest.raises(peftlab.PeftlabError, match="unknown format 'onnx'"):
        peftlab.save(model, tmp_path / "x", format="onnx")
    with pytest.raises(peftlab.PeftlabError, match="no adapter named 'nope'"):
        peftlab.save(model, tmp_path / "x", name="nope")
    (tmp_path / "file").write_text("")
    with pytest.raises(peftlab.PeftlabError, match="is a file"):
        peftlab.save(model, tmp_path / "file")
    assert not (tmp_path / "x").exists()
