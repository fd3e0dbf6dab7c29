"""What prompt and prefix methods share: the model's attention layout and virtual tokens.

Soft prompts (prompt tuning, P-tuning) put P trained vectors in front of the input embeddings;
prefixes (prefix tuning, P-tuning v2, MAM's prefix half) put P trained keys and values in
front of every attention layer's own. Both act on the base model (`model.base_model`: the
BertModel of a BertForSequenceClassification, the LlamaModel of a LlamaForCausalLM) through
forward hooks (peftlab.model_level), never by wrapping it:

    before its forward   the call is translated from the caller's world (no virtual tokens)
                         into the model's: attention_mask gets P ones in front, position_ids
                         move by P; a prompt's embeddings are prepended (when nothing is cached
                         yet), a prefix is written into the key/value cache (when it is empty)
    after its forward    a prompt's P positions are cut from last_hidden_state, so logits line
                         up with the caller's tokens and labels (the pooled output, computed
                         inside, still sees them, as in `peft`)

Because every call is translated the same way, `generate` with the KV cache (prefill, then one
token at a time) computes what it computes without the cache (the whole sequence each step):
positions of real tokens start at P in both, as in `peft`'s forward.

Layout of a prefix, as `peft` stores it (so its files load as they are): one (P, 2 * layers *
kv_dim) matrix, kv_dim = kv_heads * head_dim; viewed as (P, 2 * layers, kv_heads, head_dim),
row 2l holds layer l's keys and row 2l + 1 its values. Keys are used as stored (no rotary
embedding is applied to them), as in `peft`.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import PeftlabError
from ..model_level import ROOT, ModelAdapter, ModelHooks


@dataclass
class Layout:
    """Where virtual tokens go in one model, and the sizes a prefix needs."""

    backbone: nn.Module  # the base model whose forward takes inputs_embeds (and a cache)
    embedding: nn.Module  # its input embedding
    config: Any  # the transformers config (text part)
    layers: int
    kv_heads: int
    head_dim: int
    hidden: int
    max_positions: int | None  # config.max_position_embeddings
    cache_arg: str | None  # the forward's cache keyword ("cache" or "past_key_values"); None: no cache
    positional: list[str]  # the forward's positional parameter names, to name positional arguments

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def arguments(self, args: tuple, kwargs: dict) -> dict:
        """The call's arguments by name (positional ones named after the forward's parameters)."""
        named = dict(zip(self.positional, args))
        named.update(kwargs)
        if self.cache_arg and "past_key_values" in named and self.cache_arg != "past_key_values":
            named[self.cache_arg] = named.pop("past_key_values")  # the older name of the same argument
        return named


def find_layout(model: nn.Module, method: str, needs_cache: bool) -> Layout:
    """The model's layout, or a PeftlabError naming what is missing (nothing is changed)."""
    config = getattr(model, "config", None)
    backbone = getattr(model, "base_model", None)
    if config is None or not isinstance(backbone, nn.Module):
        raise PeftlabError(f"method {method!r} needs a transformers model (with .config and .base_model); "
                           f"{type(model).__name__} has no recognised attention layout: use a site method such as lora")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    params = inspect.signature(backbone.forward).parameters
    cache_arg = next((n for n in ("cache", "past_key_values") if n in params), None)
    sizes = {n: getattr(text, n, None) for n in ("num_hidden_layers", "num_attention_heads", "hidden_size")}
    missing = [n for n, v in sizes.items() if not isinstance(v, int)]
    missing += ["inputs_embeds"] if "inputs_embeds" not in params else []
    missing += ["a key/value cache argument"] if needs_cache and cache_arg is None else []
    if missing:
        raise PeftlabError(f"method {method!r} does not recognise the attention layout of {type(model).__name__} "
                           f"(its base model lacks {', '.join(missing)}): use a BERT-, GPT-2- or Llama-style "
                           "transformers model, or a site method such as lora")
    heads = sizes["num_attention_heads"]
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    return Layout(
        backbone=backbone, embedding=backbone.get_input_embeddings(), config=text,
        layers=sizes["num_hidden_layers"], kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or sizes["hidden_size"] // heads, hidden=sizes["hidden_size"],
        max_positions=getattr(text, "max_position_embeddings", None), cache_arg=cache_arg,
        positional=[n for n, p in params.items() if p.kind == kind],
    )


def check_positions(layout: Layout, tokens: int, owner: str) -> None:
    """Virtual tokens take positions too: refuse more than the model has (leaving one for text)."""
    limit = layout.max_positions
    if limit is not None and tokens >= limit:
        raise PeftlabError(f"{owner} num_virtual_tokens={tokens} is longer than the model's position limit "
                           f"(max_position_embeddings={limit}), leaving no room for text: "
                           f"use num_virtual_tokens < {limit}")


def check_no_other(model: nn.Module, owner: str) -> None:
    """One set of virtual tokens per model: a second would shift the first's positions."""
    root = model._modules.get(ROOT)
    taken = [n.split(".")[0] for n, m in (root.named_modules() if root is not None else ()) if isinstance(m, VirtualTokens)]
    if taken:
        raise PeftlabError(f"{owner}: adapter {taken[0]!r} already puts virtual tokens into this model; "
                           "detach it first (one prompt or prefix adapter per model)")


# ---- translating a call ------------------------------------------------------------------------


def batch_size(named: dict) -> int:
    source = named.get("input_ids")
    return (source if source is not None else named["inputs_embeds"]).shape[0]


def extend_mask(named: dict, tokens: int, total: int) -> None:
    """attention_mask (batch, seen + new) -> (batch, P + seen + new): the virtual tokens are always seen.
    Without one, an all-ones mask of the full length `total` (an encoder needs it to see the prefix)."""
    mask, batch = named.get("attention_mask"), batch_size(named)
    if mask is None:
        device = (named.get("input_ids") if named.get("input_ids") is not None else named["inputs_embeds"]).device
        named["attention_mask"] = torch.ones(batch, total, dtype=torch.long, device=device)
    elif mask.dim() == 2:
        named["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], tokens), mask], dim=1)
    else:
        raise PeftlabError("prompt and prefix adapters need a 2-d attention_mask (batch, length); got "
                           f"{mask.dim()}-d: pass the tokenizer's mask")


def shift_positions(named: dict, tokens: int, prepend: bool) -> None:
    """position_ids move by P (real tokens start at P); prepend: the prompt's own 0..P-1 go in front."""
    positions = named.get("position_ids")
    if positions is None:
        return
    shifted = positions + tokens
    if prepend:
        own = torch.arange(tokens, device=positions.device, dtype=positions.dtype)
        shifted = torch.cat([own.expand(*positions.shape[:-1], tokens), shifted], dim=-1)
    named["position_ids"] = shifted


def cached_length(layout: Layout, named: dict) -> int:
    cache = named.get(layout.cache_arg) if layout.cache_arg else None
    return cache.get_seq_length() if cache is not None else 0


def wants_cache(layout: Layout, named: dict) -> bool:
    """Whether the caller asked for a cache back (use_cache, or the config's default)."""
    use = named.get("use_cache")
    return bool(getattr(layout.config, "use_cache", False) if use is None else use)


def without_cache(output: Any, key: str) -> Any:
    """The output without the cache a prefix call made for itself (the caller asked for none: a
    cache handed back would be fed into the next call of generate(use_cache=False))."""
    if isinstance(output, tuple) or output.get(key) is None:
        return output
    return type(output)(**{k: v for k, v in output.items() if k != key})


def cut_prompt(output: Any, tokens: int) -> Any:
    """The base model's output with the prompt's P positions cut from last_hidden_state."""
    if isinstance(output, tuple):
        return (output[0][:, tokens:], *output[1:])
    output["last_hidden_state"] = output["last_hidden_state"][:, tokens:]
    return output


def fill_cache(layout: Layout, named: dict, keys_values: Tensor) -> None:
    """Write the prefix into the call's cache when it is empty (a new one when there is none).

    keys_values: (P, 2 * layers * kv_dim) in peft's layout (see the module docstring).
    """
    from transformers import DynamicCache

    cache = named.get(layout.cache_arg)
    if cache is None:
        cache = named[layout.cache_arg] = DynamicCache(config=layout.config)
    elif cache.get_seq_length() > 0:
        return  # a cache that already holds this prefix: a later step of generate
    batch, tokens = batch_size(named), keys_values.shape[0]
    # (P, 2 * layers * kv_dim) -> (2 * layers, kv_heads, P, head_dim): the cache's per-layer layout
    per_layer = keys_values.view(tokens, 2 * layout.layers, layout.kv_heads, layout.head_dim).permute(1, 2, 0, 3)
    for layer in range(layout.layers):
        keys = per_layer[2 * layer].unsqueeze(0).expand(batch, -1, -1, -1)  # (batch, kv_heads, P, head_dim)
        values = per_layer[2 * layer + 1].unsqueeze(0).expand(batch, -1, -1, -1)
        cache.update(keys, values, layer)


# ---- the model-level adapter -----------------------------------------------------------------


class VirtualTokens(ModelAdapter):
    """P virtual tokens from a trained `encoder` (a module whose forward() gives them), as a prompt
    in front of the input embeddings (mode "prompt": (P, hidden)) or as keys and values in front
    of every attention layer's (mode "prefix": (P, 2 * layers * kv_dim))."""

    identity_at_init = False  # the virtual tokens change the output from the start

    def __init__(self, layout: Layout, encoder: nn.Module, tokens: int, mode: str):
        super().__init__()
        self.encoder = encoder
        self.tokens = tokens
        self.mode = mode
        self.__dict__["layout"] = layout  # a plain reference: the backbone is not the adapter's submodule
        self.cut = 0  # positions the running call prepended, cut from its output
        self.own_cache = False  # the running call's cache was made here, and the caller wants none back

    def install(self, model: nn.Module, hooks: ModelHooks) -> None:
        hooks.before(self.layout.backbone, self.before)
        hooks.after(self.layout.backbone, self.after)

    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        layout, tokens = self.layout, self.tokens
        named = layout.arguments(args, kwargs)
        seen = cached_length(layout, named)
        new = (named["input_ids"] if named.get("input_ids") is not None else named["inputs_embeds"]).shape[1]
        self.cut = 0
        if self.mode == "prefix":
            self.own_cache = named.get(layout.cache_arg) is None and not wants_cache(layout, named)
            fill_cache(layout, named, self.encoder().to(layout.embedding.weight.dtype))
            extend_mask(named, tokens, (seen or tokens) + new)  # the cache holds the prefix from now on
            shift_positions(named, tokens, prepend=False)
            return (), named
        prepend = seen == 0  # nothing cached yet: the prompt goes in front of this call's tokens
        extend_mask(named, tokens, (seen or tokens) + new)  # a cache holds the prompt's positions too
        shift_positions(named, tokens, prepend=prepend)
        if prepend:
            embeds = named.get("inputs_embeds")
            embeds = layout.embedding(named["input_ids"]) if embeds is None else embeds
            prompt = self.encoder().to(embeds.dtype).unsqueeze(0).expand(embeds.shape[0], -1, -1)
            named["inputs_embeds"], named["input_ids"] = torch.cat([prompt, embeds], dim=1), None
            if named.get("token_type_ids") is not None:
                types = named["token_type_ids"]
                named["token_type_ids"] = torch.cat([types.new_zeros(types.shape[0], tokens), types], dim=1)
            self.cut = tokens
        return (), named

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        cut, self.cut = self.cut, 0
        if self.own_cache:
            self.own_cache = False
            return without_cache(output, self.layout.cache_arg)
        return cut_prompt(output, cut) if cut else None


# ---- the `peft` format (peftlab.io.peft): the virtual tokens as the model sees them -------------


def peft_task_type(model: nn.Module, trains_head: bool) -> str | None:
    """peft's task_type (it picks the PeftModel class that runs the prompt): a causal LM's, a classifier's
    when its head is saved with it (peft's SEQ_CLS loader needs the head in the file), else plain features."""
    name = type(model).__name__
    if name.endswith("ForCausalLM"):
        return "CAUSAL_LM"
    return "SEQ_CLS" if trains_head and name.endswith("ForSequenceClassification") else "FEATURE_EXTRACTION"


def peft_keys(model: nn.Module, config: Any, adapter: VirtualTokens, token_dim: int, heads: int) -> dict[str, Any]:
    """adapter_config.json keys every peft prompt-learning type has (one transformer stack)."""
    return {"task_type": peft_task_type(model, bool(config.also_train)), "num_virtual_tokens": adapter.tokens,
            "token_dim": token_dim, "num_transformer_submodules": 1, "num_attention_heads": heads,
            "num_layers": adapter.layout.layers}


def peft_virtual_tokens(document: dict, tensors: dict[str, Tensor], width: str) -> Tensor:
    """The (P, width) `prompt_embeddings` of a peft prompt-learning file, checked against its config."""
    if set(tensors) != {"prompt_embeddings"}:
        raise PeftlabError(f"a peft {document.get('peft_type')} file holds exactly 'prompt_embeddings'; this one "
                           f"holds {sorted(tensors)[:3]}")
    if document.get("num_transformer_submodules", 1) not in (1, None):
        raise PeftlabError("num_transformer_submodules != 1 (an encoder-decoder prompt): peftlab's prompts and "
                           "prefixes cover one transformer stack")
    embeddings = tensors["prompt_embeddings"]
    tokens = document.get("num_virtual_tokens")
    if embeddings.dim() != 2 or embeddings.shape[0] != tokens:
        raise PeftlabError(f"prompt_embeddings has shape {tuple(embeddings.shape)}, the config says "
                           f"num_virtual_tokens={tokens}: expected ({tokens}, {width})")
    return embeddings
