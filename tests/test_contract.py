"""The contract table for the core methods: each row runs the same checks (tests/contract.py).

Rows: LoRA with each initialisation and rsLoRA on nn.Linear (a tiny BERT), LoRA on
transformers' Conv1D (tiny GPT-2), nn.Embedding and nn.Conv2d, and per-pattern overrides.
Other methods add their rows in their own test files.
"""
import pytest

import peftlab
from conftest import image_batch, tiny_bert, tiny_cnn, tiny_gpt2, token_batch
from contract import Case, run_contract

QV = ["query", "value"]

ROWS = [
    Case("lora-kaiming-linear", lambda: peftlab.LoRA(r=4, targets=QV), tiny_bert, token_batch),
    Case("lora-gaussian-linear", lambda: peftlab.LoRA(r=4, init="gaussian", targets=QV), tiny_bert, token_batch),
    Case("lora-pissa-linear", lambda: peftlab.config("pissa", r=4, targets=QV), tiny_bert, token_batch),
    Case("lora-pissa-fast-svd", lambda: peftlab.LoRA(r=4, init="pissa", svd_niter=4, targets=QV), tiny_bert, token_batch),
    Case("lora-olora-linear", lambda: peftlab.config("olora", r=4, targets=QV), tiny_bert, token_batch),
    Case("rslora-linear", lambda: peftlab.LoRA(r=4, rslora=True, dropout=0.1, targets="all-linear"), tiny_bert, token_batch),
    Case("lora-overrides", lambda: peftlab.LoRA(r=2, targets=QV, overrides={"value": {"r": 6, "alpha": 3.0}}),
         tiny_bert, token_batch),
    Case("lora-conv1d", lambda: peftlab.LoRA(r=4, targets=["c_attn", "c_fc"]), tiny_gpt2, token_batch),
    Case("lora-pissa-conv1d", lambda: peftlab.LoRA(r=4, init="pissa", targets=["c_attn"]), tiny_gpt2, token_batch),
    Case("lora-embedding", lambda: peftlab.LoRA(r=4, targets=["word_embeddings"]), tiny_bert, token_batch),
    Case("lora-conv2d", lambda: peftlab.LoRA(r=2, targets=["conv1", "conv2"]), tiny_cnn, image_batch),
    Case("lora-head-also-trained", lambda: peftlab.LoRA(r=2, targets=["c_attn"], also_train=["lm_head"]),
         tiny_gpt2, token_batch, peft_refusal="tied to transformer.wte.weight"),
]


@pytest.mark.parametrize("case", ROWS, ids=str)
def test_contract(case, tmp_path):
    run_contract(case, tmp_path)
