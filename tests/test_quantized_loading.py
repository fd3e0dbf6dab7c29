"""A quantized base loaded layer by layer (peftlab.quantize.load_quantized through the recipe's loader),
and LoRA `init: loftq` from the run config.

The loader must give the model that loading in fp32 and then quantizing gives, bit for bit (logits and
state dict, the new classification head drawn with the same random numbers), keep tied weights tied,
hold at most one full-precision weight of a quantized layer at a time, and refuse bad input before
reading a tensor. LoftQ through the recipe starts closer to the fp32 model than plain NF4, and a run
with it saves and resumes. The model is a tiny random Llama (hidden 64: NF4 quantizes every linear
layer) with SmolLM2's tokenizer, written to a temporary directory as an ordinary safetensors checkpoint.
"""
from __future__ import annotations

import gc
import shutil
import warnings
import weakref

import pytest
import torch

import peftlab
from peftlab import PeftlabError
from peftlab import quantize as Q
from peftlab.recipe import config as runconfig, data, models, trainer
from peftlab.recipe.config import ModelName
from run_helpers import save_tiny_llama

LABELS = ["negative", "positive"]
LINEARS_PER_LAYER = 7  # q k v o gate up down


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A 2-layer Llama, tied embeddings, saved as config.json + model.safetensors + tokenizer."""
    folder = save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-64"), hidden=64, heads=4, kv_heads=2, positions=128)
    assert (folder / "model.safetensors").is_file()
    return folder


def load(name, kind: str, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fallback (fp32 first) warns: it must not be taken here
        model, _ = models.load(name, kind, None if kind == "sft" else LABELS, **kwargs)
    return model


def load_then_quantize(path, kind: str, scheme: str, seed: int = 0):
    """What the recipe did before: the fp32 model, then peftlab.quantize.quantize."""
    model = load(str(path), kind, seed)
    Q.quantize(model, scheme)
    return model


def logits(model, seed: int = 1) -> torch.Tensor:
    ids = torch.randint(0, 2000, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def hidden(model, seed: int = 1) -> torch.Tensor:
    ids = torch.randint(0, 2000, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True).hidden_states[-1]


# ---- layer by layer == load, then quantize ----------------------------------------------------------


@pytest.mark.parametrize("kind", ["sft", "classification"])
@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_layer_by_layer_equals_load_then_quantize_bit_for_bit(checkpoint, scheme, kind):
    before = load_then_quantize(checkpoint, kind, scheme)
    after = load(ModelName(str(checkpoint), scheme), kind)
    quantized = [n for n, m in after.named_modules() if Q.is_quantized(m)]
    assert len(quantized) == 2 * LINEARS_PER_LAYER
    assert quantized == [n for n, m in before.named_modules() if Q.is_quantized(m)]
    assert torch.equal(logits(after), logits(before))  # the quantizers are deterministic: no tolerance
    expected, got = before.state_dict(), after.state_dict()
    assert list(got) == list(expected)
    for key, value in expected.items():  # packed weights, scales, norms, the new head (same draws)
        assert torch.equal(got[key], value), key
    for (name, mine), (_, theirs) in zip(after.named_buffers(), before.named_buffers()):  # rotary inv_freq
        assert torch.equal(mine, theirs), name
    assert not any(t.is_meta for t in [*after.parameters(), *after.buffers()])
    assert not after.training and after.config.to_dict() == before.config.to_dict()


def test_tied_weights_stay_tied_and_the_head_stays_in_full_precision(checkpoint):
    model = load(ModelName(str(checkpoint), "nf4"), "sft")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype == torch.float32
    reference = load(str(checkpoint), "sft")
    assert torch.equal(model.lm_head.weight, reference.lm_head.weight)


def test_at_most_one_full_precision_weight_of_a_quantized_layer_is_alive_at_a_time(checkpoint, monkeypatch):
    read = models.CheckpointTensors.__getitem__
    alive: list[weakref.ref] = []
    most = []

    def spying(self, key):
        if not key.endswith("_proj.weight"):
            return read(self, key)
        gc.collect()
        most.append(sum(ref() is not None for ref in alive))  # earlier linear weights still held
        value = read(self, key)
        alive.append(weakref.ref(value))
        return value

    monkeypatch.setattr(models.CheckpointTensors, "__getitem__", spying)
    load(ModelName(str(checkpoint), "nf4"), "sft")
    assert len(alive) == 2 * LINEARS_PER_LAYER
    assert max(most) <= 1, most  # the one being quantized; never the fp32 model


# ---- bad input: refused before a tensor is read ---------------------------------------------------


class Reads(dict):
    """A tensor source that records what is read."""

    def __init__(self, values):
        super().__init__(values)
        self.read = []

    def __getitem__(self, key):
        self.read.append(key)
        return super().__getitem__(key)


def skeleton():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def test_an_unknown_scheme_is_refused_before_anything_is_read(checkpoint, monkeypatch):
    source = Reads({k: torch.zeros(v.shape) for k, v in skeleton().state_dict().items()})
    model = skeleton()
    with pytest.raises(PeftlabError, match="unknown quantization 'nf2': use one of 'nf4', 'int8'"):
        Q.load_quantized(model, source, "nf2")
    assert source.read == [] and all(p.is_meta for p in model.parameters())
    opened = []
    monkeypatch.setattr(models, "CheckpointTensors", lambda *a: opened.append(a))
    with pytest.raises(PeftlabError, match="unknown quantization 'nf2'"):
        models.load(ModelName(str(checkpoint), "nf2"), "sft")
    assert opened == []


def test_a_missing_tensor_is_named_before_anything_is_read():
    values = {k: torch.zeros(v.shape) for k, v in skeleton().state_dict().items()}
    del values["model.layers.0.mlp.up_proj.weight"]
    source, model = Reads(values), skeleton()
    with pytest.raises(PeftlabError, match="no value for 1 .* model.layers.0.mlp.up_proj.weight"):
        Q.load_quantized(model, source, "int8")
    assert source.read == []


# ---- LoftQ from the run config --------------------------------------------------------------------


def sets(checkpoint, output, *extra):
    return [f"model={{name: {checkpoint}, quantize: nf4}}", "task=movie-sentiment", f"output={output}",
            "method={name: lora, r: 8, alpha: 8, targets: all-linear, init: loftq}", "data.limit=64",
            "data.max_length=16", "train.batch_size=8", "train.steps=6", "train.save_every=3", "train.log_every=1",
            "train.progress=false", "optimizer.lr=0.01", "seed=0", *extra]


def test_loftq_without_a_quantized_base_is_refused_at_validation(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("no model may load"))
    plain = [s.replace(", quantize: nf4", "") for s in sets(checkpoint, tmp_path / "run")]
    with pytest.raises(PeftlabError, match=r"method.init = 'loftq' needs a quantized base: set model: "
                                           r"\{name: .*, quantize: nf4\}"):
        runconfig.build(None, plain)
    assert not (tmp_path / "run").exists()


def test_loftq_from_the_recipe_starts_closer_to_the_fp32_model_than_plain_nf4(checkpoint, tmp_path):
    def step_zero(*extra):
        run = runconfig.build(None, sets(checkpoint, tmp_path / "unused", *extra))
        task = data.load(run.task, run.data, run.seed)
        torch.manual_seed(run.seed)  # as train() seeds it: the new head is drawn the same in every model
        adapted, _, _ = trainer.make_trainable(run, task, [], None, trainer.Hooks())
        return adapted.model.eval()

    loftq = step_zero()
    plain = step_zero("method.init=gaussian")  # B = 0: the plain NF4 model
    fp32 = load(str(checkpoint), "classification", seed=0)
    config = peftlab.adapter_configs(loftq)["default"]
    assert config.init == "loftq" and config.also_train == ["score"]
    exact = hidden(fp32)  # the last hidden states: a two-label head's 4 logits are too few to compare
    error = {name: ((hidden(m) - exact).norm() / exact.norm()).item() for name, m in
             [("loftq", loftq), ("plain", plain)]}
    assert error["loftq"] < 0.9 * error["plain"], error  # measured: 0.74 of it
    with peftlab.disabled(loftq):  # the base under the adapter is the quantized W (T = 1: q(W))
        assert torch.equal(logits(loftq), logits(plain))


def test_a_loftq_run_saves_a_and_b_and_resumes_with_the_same_losses(checkpoint, tmp_path):
    from safetensors.torch import load_file

    from run_helpers import step_losses

    run_dir = tmp_path / "run"
    iters = "method.loftq_iters=2"  # the base is then q(W - s B_1 A_1): a resumed run must quantize it again so
    trainer.train(runconfig.build(None, sets(checkpoint, run_dir, iters)), echo=lambda *a: None)
    losses = step_losses(run_dir)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    saved = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    factors = sorted(k for k in saved if ".adapters.default." in k)
    assert len(factors) == 2 * 2 * LINEARS_PER_LAYER and {k[-1] for k in factors} == {"A", "B"}
    shutil.rmtree(run_dir / "checkpoints" / "checkpoint-6")
    summary = trainer.train(runconfig.build(None, sets(checkpoint, run_dir, iters)), resume=True, echo=lambda *a: None)
    assert summary["resumed_from"].endswith("checkpoint-3")
    assert step_losses(run_dir) == pytest.approx(losses, rel=1e-5)  # steps 4-6 from the saved A, B
