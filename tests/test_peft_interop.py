"""The `peft` adapter format, both ways: peftlab -> peft (export) and peft -> peftlab (import).

Each case trains nothing but moves every adapter parameter (B included) off its initial
value, so the adapter changes the output; outputs must then agree within
1e-5 + 1e-4 * |value| (fp32):
  * export: peftlab adapter -> save(format="peft") -> peft.PeftModel.from_pretrained(fresh base)
  * import: peft adapter -> save_pretrained -> peftlab.load(fresh base)
on the real MiniLM-L6 for LoRA, rsLoRA, PiSSA, OLoRA and DoRA, and on tiny random models for
Conv1D (GPT-2), nn.Embedding, nn.Conv2d, per-layer rank/alpha and modules_to_save.
"""
import json
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

import peftlab
from conftest import image_batch, load_minilm, output_of, tiny_bert, tiny_cnn, tiny_gpt2, token_batch

# fp32 through 6 layers: GEMM reduction order varies with the threads a busy machine grants,
# which moves hidden states of size ~1 by up to ~3e-5; a wrong scale or factor moves them by 1e-2
TOL = dict(atol=1e-5, rtol=1e-4)
QV = ["query", "value"]

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # peft's notices about fan_in_fan_out etc.


def perturb(params, seed: int = 3, size: float = 0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(size * torch.randn(p.shape, generator=g, dtype=p.dtype))


def perturb_peftlab(model, seed: int = 3):
    perturb(peftlab.trainable_parameters(model).values(), seed)


def perturb_peft(model, seed: int = 3):
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    assert params
    perturb(params, seed)


def computed(model, batch):
    with torch.no_grad():
        return output_of(model, batch)


def assert_changed(adapted, base):
    assert (adapted - base).abs().max() > 1e-3, "the adapter does not change the output: the test would prove nothing"


def export_round(make_model, config, batch, tmp_path, prepare=perturb_peftlab):
    """peftlab -> peft file -> peft model; returns (peftlab output, peft output, base output, directory)."""
    base_out = computed(make_model(), batch)
    model = make_model()
    peftlab.attach(model, config)
    prepare(model)
    expected = computed(model, batch)
    directory = peftlab.save(model, tmp_path / "peft", format="peft")
    peft_model = PeftModel.from_pretrained(make_model(), directory).eval()
    return expected, computed(peft_model, batch), base_out, directory


def import_round(make_model, peft_config, batch, tmp_path):
    """peft model -> save_pretrained -> peftlab.load on a fresh base; returns (peft output, peftlab output, model)."""
    peft_model = get_peft_model(make_model(), peft_config).eval()
    perturb_peft(peft_model)
    expected = computed(peft_model, batch)
    peft_model.save_pretrained(tmp_path / "from_peft")
    model = make_model()
    peftlab.load(model, tmp_path / "from_peft")
    return expected, computed(model, batch), model


# ---- the real MiniLM-L6 --------------------------------------------------------------------

MINILM = {
    "lora": (lambda: peftlab.LoRA(r=8, alpha=16, targets=QV),
             lambda: LoraConfig(r=8, lora_alpha=16, target_modules=QV)),
    "rslora": (lambda: peftlab.LoRA(r=8, alpha=16, rslora=True, targets=QV),
               lambda: LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=QV)),
    "pissa": (lambda: peftlab.config("pissa", r=8, alpha=16, targets=QV),
              lambda: LoraConfig(r=8, lora_alpha=16, init_lora_weights="pissa", target_modules=QV)),
    "olora": (lambda: peftlab.config("olora", r=8, alpha=16, targets=QV),
              lambda: LoraConfig(r=8, lora_alpha=16, init_lora_weights="olora", target_modules=QV)),
    "dora": (lambda: peftlab.DoRA(r=8, alpha=16, targets=QV),
             lambda: LoraConfig(r=8, lora_alpha=16, use_dora=True, target_modules=QV)),
}


def minilm_model():
    return load_minilm()[0]


@pytest.mark.parametrize("case", list(MINILM))
def test_minilm_export_loads_in_peft_with_equal_outputs(case, minilm_batch, tmp_path):
    expected, got, base, directory = export_round(minilm_model, MINILM[case][0](), minilm_batch, tmp_path)
    assert_changed(expected, base)
    torch.testing.assert_close(got, expected, **TOL)
    document = json.loads((directory / "adapter_config.json").read_text())
    assert document["peft_type"] == "LORA" and document["use_dora"] == (case == "dora")
    assert document["target_modules"] == [f"encoder.layer.{i}.attention.self.{m}" for i in range(6) for m in QV]
    if case in ("pissa", "olora"):  # a plain LoRA of rank 2r on the original base weights, same scale
        assert (document["r"], document["lora_alpha"], document["init_lora_weights"]) == (16, 32, True)
    else:
        assert (document["r"], document["lora_alpha"]) == (8, 16)


@pytest.mark.parametrize("case", list(MINILM))
def test_minilm_import_from_peft_with_equal_outputs(case, minilm_batch, tmp_path):
    base = computed(minilm_model(), minilm_batch)
    expected, got, model = import_round(minilm_model, MINILM[case][1](), minilm_batch, tmp_path)
    assert_changed(expected, base)
    torch.testing.assert_close(got, expected, **TOL)
    config = peftlab.adapter_configs(model)["default"]
    extra = {"rslora": {"rslora": True}, "pissa": {"init": "pissa"}, "olora": {"init": "olora"}}.get(case, {})
    method = "dora" if case == "dora" else "lora"
    assert config == peftlab.config(method, r=8, alpha=16, targets=config.targets, **extra)
    # detach gives the base model back exactly (PiSSA/OLoRA: the recomputed residual is undone)
    peftlab.detach(model)
    torch.testing.assert_close(computed(model, minilm_batch), base, atol=0, rtol=0)


def test_minilm_import_peft_pissa_converted_to_plain_lora(minilm_batch, tmp_path):
    # peft's own conversion: save the initial adapter, train, save relative to it (rank 2r LoRA)
    peft_model = get_peft_model(minilm_model(), MINILM["pissa"][1]())
    peft_model.save_pretrained(tmp_path / "initial")
    perturb_peft(peft_model)
    expected = computed(peft_model.eval(), minilm_batch)
    peft_model.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=tmp_path / "initial")
    model = minilm_model()
    peftlab.load(model, tmp_path / "converted")
    torch.testing.assert_close(computed(model, minilm_batch), expected, **TOL)
    config = peftlab.adapter_configs(model)["default"]
    assert (config.init, config.r, config.alpha) == ("kaiming", 16, 32)


# ---- tiny models: Conv1D, Embedding, Conv2d, patterns, modules_to_save ----------------------

TINY = {
    "gpt2-conv1d-patterns": (
        tiny_gpt2, token_batch,
        lambda: peftlab.LoRA(r=4, alpha=8, targets=["c_attn", "c_fc"],
                             overrides={"h.1.mlp.c_fc": {"r": 2}, "h.0.attn.c_attn": {"alpha": 3.0}}),
        lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                           rank_pattern={"h.1.mlp.c_fc": 2}, alpha_pattern={"h.0.attn.c_attn": 3})),
    "gpt2-conv1d-dora": (
        tiny_gpt2, token_batch,
        lambda: peftlab.DoRA(r=4, targets=["c_attn", "c_proj"]),
        lambda: LoraConfig(r=4, lora_alpha=16, use_dora=True, target_modules=["c_attn", "c_proj"],
                           fan_in_fan_out=True)),
    # (peft's OLoRA does not transpose Conv1D weights and fails there; PiSSA does)
    "gpt2-pissa-rslora": (
        tiny_gpt2, token_batch,
        lambda: peftlab.LoRA(r=4, init="pissa", rslora=True, targets=["c_fc"]),
        lambda: LoraConfig(r=4, lora_alpha=16, init_lora_weights="pissa", use_rslora=True, target_modules=["c_fc"],
                           fan_in_fan_out=True)),
    "gaussian-init": (
        tiny_bert, token_batch,
        lambda: peftlab.LoRA(r=4, init="gaussian", targets="all-linear"),
        lambda: LoraConfig(r=4, lora_alpha=16, init_lora_weights="gaussian", target_modules="all-linear")),
    "embedding": (
        tiny_bert, token_batch,
        lambda: peftlab.LoRA(r=4, targets=["word_embeddings", "query"]),
        lambda: LoraConfig(r=4, lora_alpha=16, target_modules=["word_embeddings", "query"])),
    "conv2d-modules-to-save": (
        tiny_cnn, image_batch,
        lambda: peftlab.LoRA(r=2, targets=["conv1", "conv2"], also_train=["head"]),
        lambda: LoraConfig(r=2, lora_alpha=16, target_modules=["conv1", "conv2"], modules_to_save=["head"])),
    "dora-modules-to-save": (
        tiny_bert, token_batch,
        lambda: peftlab.DoRA(r=2, rslora=True, targets=["dense"], exclude=["pooler.dense"], also_train=["pooler"]),
        lambda: LoraConfig(r=2, lora_alpha=16, use_dora=True, use_rslora=True, target_modules=["dense"],
                           exclude_modules=["pooler.dense"], modules_to_save=["pooler"])),
}


@pytest.mark.parametrize("case", list(TINY))
def test_tiny_export_loads_in_peft_with_equal_outputs(case, tmp_path):
    make_model, make_batch, peftlab_config, _ = TINY[case]
    expected, got, base, _ = export_round(make_model, peftlab_config(), make_batch(), tmp_path)
    assert_changed(expected, base)
    torch.testing.assert_close(got, expected, **TOL)


@pytest.mark.parametrize("case", list(TINY))
def test_tiny_import_from_peft_with_equal_outputs(case, tmp_path):
    make_model, make_batch, _, peft_config = TINY[case]
    base = computed(make_model(), make_batch())
    expected, got, _ = import_round(make_model, peft_config(), make_batch(), tmp_path)
    assert_changed(expected, base)
    torch.testing.assert_close(got, expected, **TOL)


def test_patterns_and_modules_to_save_map_to_overrides_and_also_train(tmp_path):
    _, got, model = import_round(tiny_gpt2, TINY["gpt2-conv1d-patterns"][3](), token_batch(), tmp_path)
    config = peftlab.adapter_configs(model)["default"]
    assert config.overrides == {"transformer.h.1.mlp.c_fc": {"r": 2}, "transformer.h.0.attn.c_attn": {"alpha": 3}}
    sites = peftlab.adapters(model, "default")
    assert sites["transformer.h.1.mlp.c_fc"].A.shape == (2, 32)
    assert sites["transformer.h.0.attn.c_attn"].scale == 3 / 4 and sites["transformer.h.1.attn.c_attn"].scale == 2

    _, _, model = import_round(tiny_cnn, TINY["conv2d-modules-to-save"][3](), image_batch(), tmp_path / "cnn")
    assert peftlab.adapter_configs(model)["default"].also_train == ["head"]
    assert {"head.weight", "head.bias"} <= set(peftlab.trainable_parameters(model))

    # export writes per-site values under exact anchored keys
    model = tiny_gpt2()
    peftlab.attach(model, TINY["gpt2-conv1d-patterns"][2]())
    directory = peftlab.save(model, tmp_path / "out", format="peft")
    document = json.loads((directory / "adapter_config.json").read_text())
    assert document["rank_pattern"] == {r"^transformer\.h\.1\.mlp\.c_fc": 2}
    assert document["alpha_pattern"] == {r"^transformer\.h\.0\.attn\.c_attn": 3}
    assert document["fan_in_fan_out"] is True


def test_untrained_modules_to_save_still_train_after_import(tmp_path):
    peft_model = get_peft_model(tiny_bert(), LoraConfig(r=2, target_modules=["query"], modules_to_save=["pooler"]))
    peft_model.save_pretrained(tmp_path / "p")  # the pooler copy still equals the base pooler
    model = tiny_bert()
    peftlab.load(model, tmp_path / "p")
    assert peftlab.adapter_configs(model)["default"].also_train == ["pooler.dense"]
    assert {"pooler.dense.weight", "pooler.dense.bias"} <= set(peftlab.trainable_parameters(model))


class Nested(nn.Module):
    """Two layers whose names end alike: a plain target name 'proj' would select both."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(8, 8)
        self.block = nn.Module()
        self.block.proj = nn.Linear(8, 8)

    def forward(self, x):
        return self.block.proj(torch.relu(self.proj(x)))


def test_ambiguous_layer_names_are_targeted_exactly_both_ways(tmp_path):
    batch = {"x": torch.randn(3, 8, generator=torch.Generator().manual_seed(0))}
    expected, got, _, directory = export_round(Nested, peftlab.LoRA(r=2, targets="re:proj"), batch, tmp_path)
    torch.testing.assert_close(got, expected, **TOL)
    document = json.loads((directory / "adapter_config.json").read_text())
    assert document["target_modules"] == "(?:proj)"  # a regex: peft would read a list entry 'proj' as a suffix
    model = Nested()
    peftlab.load(model, directory)
    assert list(peftlab.adapters(model, "default")) == ["proj"]
    torch.testing.assert_close(computed(model, batch), expected, **TOL)


def test_several_adapters_use_peft_subdirectory_layout(tmp_path):
    model, batch = tiny_bert(), token_batch()
    peftlab.attach(model, peftlab.LoRA(r=2, targets=["query"]))
    peftlab.attach(model, peftlab.DoRA(r=2, targets=["value"]), name="other")
    perturb_peftlab(model)
    directory = peftlab.save(model, tmp_path / "both", format="peft")
    assert (directory / "adapter_config.json").is_file() and (directory / "other/adapter_config.json").is_file()
    peftlab.set_active(model, ["other"])
    only_other = computed(model, batch)

    peft_model = PeftModel.from_pretrained(tiny_bert(), directory / "other", adapter_name="other").eval()
    torch.testing.assert_close(computed(peft_model, batch), only_other, **TOL)

    fresh = tiny_bert()
    peftlab.load(fresh, directory)
    assert list(peftlab.adapter_configs(fresh)) == ["default", "other"]
    peftlab.set_active(fresh, ["other"])
    torch.testing.assert_close(computed(fresh, batch), only_other, **TOL)


# ---- bad input -----------------------------------------------------------------------------


def untouched_after(model, call, *patterns):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(peftlab.PeftlabError) as err:
        call()
    for pattern in patterns:
        assert pattern in str(err.value), str(err.value)
    assert set(model.state_dict()) == set(state)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert "_peftlab" not in model.__dict__


@pytest.fixture
def peft_dir(tmp_path):
    """A valid peft LoRA adapter for tiny_bert, saved by peft itself."""
    peft_model = get_peft_model(tiny_bert(), LoraConfig(r=4, target_modules=QV))
    perturb_peft(peft_model)
    peft_model.save_pretrained(tmp_path / "peft")
    return tmp_path / "peft"


def edit(directory, **fields):
    path = directory / "adapter_config.json"
    document = json.loads(path.read_text())
    document.update(fields)
    path.write_text(json.dumps(document))


@pytest.mark.parametrize("field, value, message", [
    ("bias", "all", "bias='all'"),
    ("lora_bias", True, "lora_bias=True"),
    ("init_lora_weights", "loftq", "init_lora_weights='loftq'"),
    ("init_lora_weights", "pissa_niter_4", "path_initial_model_for_weight_conversion"),
    ("layer_replication", [[0, 1], [0, 2]], "layer_replication"),
    ("trainable_token_indices", [1, 2], "trainable_token_indices"),
    ("peft_type", "LOHA", "'LOHA' adapter"),  # IA3 and LN_TUNING have their own readers
    ("lora_shards", 4, "field 'lora_shards'"),
])
def test_peft_fields_peftlab_cannot_honour(peft_dir, field, value, message):
    edit(peft_dir, **{field: value})
    model = tiny_bert()
    untouched_after(model, lambda: peftlab.load(model, peft_dir), message)


def test_peft_adapter_for_another_model(peft_dir):
    from transformers import BertConfig, BertModel

    other = BertModel(BertConfig(vocab_size=100, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64)).eval()
    untouched_after(other, lambda: peftlab.load(other, peft_dir), "made for another model", "48 x 48", "32 x 32")
    gpt2 = tiny_gpt2()
    untouched_after(gpt2, lambda: peftlab.load(gpt2, peft_dir), "made for another model", "no layer")


def test_peft_rank_that_contradicts_its_config(peft_dir):
    edit(peft_dir, rank_pattern={"value": 2})
    model = tiny_bert()
    untouched_after(model, lambda: peftlab.load(model, peft_dir), "rank 4", "gives it rank 2")


def test_peft_dora_on_a_layer_kind_peftlab_dora_does_not_adapt(tmp_path):
    peft_model = get_peft_model(tiny_cnn(), LoraConfig(r=2, target_modules=["conv1"], use_dora=True))
    peft_model.save_pretrained(tmp_path / "p")
    model = tiny_cnn()
    untouched_after(model, lambda: peftlab.load(model, tmp_path / "p"), "dora on the conv2d layer 'conv1'",
                    "no peftlab counterpart")


def test_damaged_peft_tensor_file(peft_dir):
    path = peft_dir / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-50])
    model = tiny_bert()
    untouched_after(model, lambda: peftlab.load(model, peft_dir), str(path), "damaged")


def test_export_refuses_what_peft_would_compute_differently(tmp_path):
    model = tiny_gpt2()  # lm_head is tied to the input embedding; peft unties modules_to_save
    peftlab.attach(model, peftlab.LoRA(r=2, targets=["c_attn"], also_train=["lm_head"]))
    with pytest.raises(peftlab.PeftlabError, match="tied to transformer.wte.weight"):
        peftlab.save(model, tmp_path / "tied", format="peft")
    assert not (tmp_path / "tied").exists()

    model = nn.Sequential(nn.Conv2d(3, 4, 3, dilation=2))
    peftlab.attach(model, peftlab.LoRA(r=2, targets=["0"]))
    with pytest.raises(peftlab.PeftlabError, match="dilated"):
        peftlab.save(model, tmp_path / "dilated", format="peft")
    assert not (tmp_path / "dilated").exists()


def test_export_refuses_methods_the_peft_lora_format_cannot_hold(tmp_path):
    model = tiny_bert()
    peftlab.attach(model, peftlab.LoRA(r=2, targets=["query"]))
    peftlab.attach(model, peftlab.config("randlora", r=4, targets=["value"]), name="full_rank")
    with pytest.raises(peftlab.PeftlabError, match="'randlora', whose change of .*value is not a low-rank product"):
        peftlab.save(model, tmp_path / "mixed", format="peft")
    assert not (tmp_path / "mixed").exists()  # nothing written, not even the LoRA


def test_minilm_low_rank_methods_export_as_a_plain_lora(minilm_batch, tmp_path):
    # SoRA's gates and VeRA's shared bases are folded into the factors: peft sees a LoRA of scale 1
    config = peftlab.config("sora", r=4, targets=QV, overrides={"encoder.layer.0.attention.self.query": {"r": 2}})
    expected, got, base, directory = export_round(minilm_model, config, minilm_batch, tmp_path)
    assert_changed(expected, base)
    torch.testing.assert_close(got, expected, **TOL)
    document = json.loads((directory / "adapter_config.json").read_text())
    assert (document["r"], document["lora_alpha"], document["lora_dropout"], document["use_rslora"]) == (4, 4, 0.0, False)
    assert document["rank_pattern"] == {"^encoder\\.layer\\.0\\.attention\\.self\\.query": 2}
    assert document["alpha_pattern"] == {"^encoder\\.layer\\.0\\.attention\\.self\\.query": 2}


def test_export_warns_when_per_site_dropout_cannot_be_kept(tmp_path):
    model = tiny_bert()
    peftlab.attach(model, peftlab.LoRA(r=2, dropout=0.1, targets=QV, overrides={"value": {"dropout": 0.0}}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peftlab.save(model, tmp_path / "d", format="peft")
    assert any("one dropout for all layers" in str(w.message) for w in caught)
