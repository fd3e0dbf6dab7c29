"""Prompt tuning (Lester, Al-Rfou & Constant 2021, arXiv 2104.08691) and P-tuning (Liu et al. 2021,
arXiv 2103.10385): P trained vectors in front of the input embeddings.

    embeddings' = [E_p ; E(x)]                 E_p: (P, hidden)       prompt tuning
    embeddings' = [MLP(E_p) ; E(x)]            MLP: hidden -> m -> m -> hidden (ReLU)   P-tuning

The rest of the model is frozen; attention_mask gets P ones in front, and the model's output
is cut back to the caller's tokens (see methods/prefixes.py, which also handles the KV cache,
so `generate` works with the adapter attached).

Trained: E_p (P x hidden), plus the MLP's layers with encoder="mlp" (the reparameterisation
`peft` calls PromptEncoder; encoder_hidden_size m defaults to the hidden size).
Initialisation (`init`): "vocab" copies the input embeddings of P tokens drawn uniformly from
the vocabulary (the paper's best; `peft`'s SAMPLE_VOCAB), "random" draws E_p ~ N(0, 1) (`peft`'s
RANDOM, nn.Embedding's default); the MLP keeps nn.Linear's default init, as in `peft`.

No weight form: the prompt is an input, so merge is refused. save(format="peft") writes
peft's PROMPT_TUNING (encoder="none") or P_TUNING (encoder="mlp") adapter: one
`prompt_embeddings` (P, hidden) tensor, the prompt as the model sees it (MLP applied).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn

from ..errors import PeftlabError
from ..registry import MethodConfig, register
from .prefixes import VirtualTokens, check_no_other, check_positions, find_layout, peft_keys, peft_virtual_tokens

INITS = ("vocab", "random")
ENCODERS = ("none", "mlp")


class SoftPrompt(nn.Module):
    """E_p, optionally through peft's P-tuning MLP; forward() gives the prompt (P, hidden)."""

    def __init__(self, tokens: int, hidden: int, mlp_hidden: int | None):
        super().__init__()
        self.embedding = nn.Embedding(tokens, hidden)  # peft's names, so weights map one to one
        self.mlp_head = None if mlp_hidden is None else nn.Sequential(
            nn.Linear(hidden, mlp_hidden), nn.ReLU(), nn.Linear(mlp_hidden, mlp_hidden), nn.ReLU(),
            nn.Linear(mlp_hidden, hidden))

    def forward(self) -> Tensor:
        prompt = self.embedding.weight  # (P, hidden)
        return prompt if self.mlp_head is None else self.mlp_head(prompt)


@register("prompt")
@dataclass
class PromptTuning(MethodConfig):
    num_virtual_tokens: int = 20
    init: str = "vocab"
    encoder: str = "none"  # "mlp": P-tuning's reparameterisation (peft's PromptEncoder)
    encoder_hidden_size: int | None = None  # the MLP's width m; None: the model's hidden size

    site_adapters: ClassVar[bool] = False
    model_adapter: ClassVar[bool] = True
    peft_type: ClassVar[str] = "PROMPT_TUNING"  # P-tuning too: peft's saved form of both is the prompt itself
    trainable_formula: ClassVar[str] = "P x hidden (+ MLP 2 hidden m + m^2 with encoder=mlp)"

    def validate(self) -> None:
        self.check_positive_int("num_virtual_tokens")
        self.check_positive_int("encoder_hidden_size", optional=True)
        if self.init not in INITS:
            raise PeftlabError(f"PromptTuning init must be one of {INITS}, got {self.init!r}")
        if self.encoder not in ENCODERS:
            raise PeftlabError(f"PromptTuning encoder must be one of {ENCODERS} ('mlp' is P-tuning), "
                               f"got {self.encoder!r}")

    def build_model(self, model: nn.Module, initialize: bool = True) -> VirtualTokens:
        layout = find_layout(model, self.method, needs_cache=False)
        check_positions(layout, self.num_virtual_tokens, "PromptTuning")
        check_no_other(model, "PromptTuning")
        mlp_hidden = (self.encoder_hidden_size or layout.hidden) if self.encoder == "mlp" else None
        prompt = SoftPrompt(self.num_virtual_tokens, layout.hidden, mlp_hidden)
        if initialize and self.init == "vocab":
            words = layout.embedding.weight  # (vocab, hidden)
            ids = torch.randint(0, words.shape[0], (self.num_virtual_tokens,))
            with torch.no_grad():
                prompt.embedding.weight.copy_(words.detach()[ids.to(words.device)].float())
        return VirtualTokens(layout, prompt.to(layout.embedding.weight.device), self.num_virtual_tokens, "prompt")

    def peft_export(self, model: nn.Module, adapters: dict[str, Any],
                    in_place: dict[str, Tensor]) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """peft's PROMPT_TUNING form: the prompt (P, hidden) as the model sees it (the MLP applied)."""
        prompt: VirtualTokens = adapters[""]
        keys = {**peft_keys(model, self, prompt, prompt.layout.hidden, prompt.layout.config.num_attention_heads),
                "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None, "tokenizer_name_or_path": None,
                "tokenizer_kwargs": None}
        return keys, {"prompt_embeddings": prompt.encoder().detach().float()}

    @classmethod
    def peft_import(cls, model: nn.Module, document: dict[str, Any], tensors: dict[str, Tensor],
                    exact_pattern: Callable[[str], str]) -> tuple[MethodConfig, dict[str, dict[str, Tensor]], dict]:
        embeddings = peft_virtual_tokens(document, tensors, "hidden")
        config = cls(num_virtual_tokens=embeddings.shape[0], init="random")
        return config, {"": {"encoder.embedding.weight": embeddings}}, {}
