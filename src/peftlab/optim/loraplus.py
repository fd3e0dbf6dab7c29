"""LoRA+: different learning rates for A and B (Hayou, Ghosh, Yu 2024, "LoRA+: Efficient Low Rank
Adaptation of Large Models", arXiv 2402.12354).

With A and B trained at one learning rate, feature learning is inefficient in wide models: the
paper's analysis gives lr_B = ratio * lr_A with ratio >> 1, and ratio = 2^4 = 16 as a good
default. LoRA+ is only an optimizer setting:

    optimizer = torch.optim.AdamW(loraplus_param_groups(model, lr=2e-4, ratio=16))

The groups, over the parameters that train now (peftlab.trainable_parameters):
    B      every adapter parameter named in `b_names` (default "B": the up-projection (out, r) of
           LoRA and its initialisations EVA, CorDA, LoRA-GA, PiSSA, OLoRA), lr = ratio * lr
    rest   every other trainable parameter (A, other adapter parameters, also_train modules), lr
    embedding  with `lr_embedding` set: every adapter parameter on an nn.Embedding site, at that
           rate (`peft`'s create_loraplus_optimizer uses 1e-6 there: on an embedding the roles of
           A and B are swapped, A being the lookup table)
`weight_decay` is set on every group. Empty groups are left out.
"""
from __future__ import annotations

from torch import nn

from ..core import adapters, adapter_configs, trainable_parameters
from ..errors import PeftlabError


def loraplus_param_groups(model: nn.Module, lr: float, ratio: float = 16.0, *, weight_decay: float = 0.0,
                          lr_embedding: float | None = None, b_names: tuple[str, ...] = ("B",)) -> list[dict]:
    """torch.optim parameter groups with B at ratio * lr and everything else trainable at lr."""
    if lr <= 0 or ratio <= 0:
        raise PeftlabError(f"LoRA+ needs lr > 0 and ratio > 0 (the paper suggests ratio=16), got lr={lr}, ratio={ratio}")
    if not adapter_configs(model):
        raise PeftlabError("LoRA+ groups an adapter's parameters: call peftlab.attach(model, config) first")
    trainable = {id(p): p for p in trainable_parameters(model).values()}
    fast, embedding, grouped = [], [], set()
    for name in adapter_configs(model):
        for adapter in adapters(model, name).values():
            for pname, p in adapter.named_parameters():
                if id(p) not in trainable or id(p) in grouped:
                    continue
                if adapter.kind.index_input and lr_embedding is not None:
                    embedding.append(p)
                elif pname in b_names:
                    fast.append(p)
                else:
                    continue
                grouped.add(id(p))
    if not fast:
        raise PeftlabError(f"LoRA+ found no trainable adapter parameter named {list(b_names)}: it applies to LoRA-style "
                           "adapters (B the up-projection); pass b_names=... for another method's factor")
    rest = [p for key, p in trainable.items() if key not in grouped]
    groups = [{"params": rest, "lr": lr}, {"params": fast, "lr": lr * ratio}]
    if embedding:
        groups.append({"params": embedding, "lr": lr_embedding})
    for g in groups:
        g["weight_decay"] = weight_decay
    return [g for g in groups if g["params"]]
