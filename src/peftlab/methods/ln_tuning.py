"""LN tuning: tuning LayerNorm in attention (Zhao et al. 2023, arXiv 2312.11420; peft's LNTuningConfig).

Only the normalisation layers' own parameters train:

    LayerNorm:  h = g * (x - mean) / sqrt(var + eps) + b      g, b trained where they are
    RMSNorm:    h = g * x / sqrt(mean(x^2) + eps)             g trained

Nothing new is added, so the output is unchanged at attach and there is nothing to merge
(merge and unmerge leave the trained values be; detach puts the original values back, bit for
bit; detach(keep_merged=True) keeps the trained ones).

A model-level, in-place method (peftlab.model_level.InPlace): `targets` chooses the norm layers
(None: every module whose class name contains "Norm": LayerNorm, LlamaRMSNorm, ...);
a target that is not a norm layer is refused. save(format="peft") writes peft's LN_TUNING
files (`<norm>.ln_tuning_layers.<weight|bias>`; peft trains a copy of each norm layer, which
computes the same) and load reads them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import Tensor, nn

from ..errors import PeftlabError
from ..model_level import MODEL, InPlace, module_parameters
from ..registry import MethodConfig, register
from ..targets import select

_PEFT_LAYERS = "ln_tuning_layers"


def is_norm(module: nn.Module) -> bool:
    return "Norm" in type(module).__name__ and any(True for _ in module.parameters(recurse=False))


def norm_modules(model: nn.Module, config: MethodConfig) -> list[str]:
    """The norm layers `targets` (None: every norm layer) and `exclude` choose; refuses other modules."""
    if config.targets is None:
        return select(model, lambda name, module: is_norm(module), config.exclude)
    chosen = select(model, config.targets, config.exclude)
    modules = dict(model.named_modules())
    others = [f"{n} ({type(modules[n]).__name__})" for n in chosen if not is_norm(modules[n])]
    if others:
        raise PeftlabError(f"LNTuning trains normalisation layers, but targets {config.targets!r} also matched "
                           f"{', '.join(others[:4])}: narrow targets (e.g. ['LayerNorm']) or leave them None")
    return chosen


@register("ln_tuning")
@dataclass
class LNTuning(MethodConfig):
    site_adapters = False
    model_adapter = True
    trainable_formula = "the norm layers' own weight (and bias): 2 * hidden per LayerNorm"
    peft_type = "LN_TUNING"

    def build_model(self, model: nn.Module, initialize: bool = True) -> InPlace:
        return InPlace(module_parameters(model, norm_modules(model, self)))

    # ---- the peft format: base_model.model.<norm>.ln_tuning_layers.<param> ----------------------------

    def peft_export(self, model: nn.Module, adapters: dict[str, Any],
                    in_place: dict[str, Tensor]) -> tuple[dict[str, Any], dict[str, Tensor]]:
        modules = norm_modules(model, self)
        tensors = {}
        for module in modules:
            for local, _ in model.get_submodule(module).named_parameters(recurse=False):
                tensors[f"{module}.{_PEFT_LAYERS}.{local}"] = in_place[f"{module}.{local}"]
        return {"target_modules": modules}, tensors

    @classmethod
    def peft_import(cls, model: nn.Module, document: dict[str, Any], tensors: dict[str, Tensor],
                    exact_pattern: Callable[[str], str]) -> tuple[MethodConfig, dict[str, dict[str, Tensor]],
                                                                  dict[str, Tensor]]:
        values, modules = {}, []
        marker = f".{_PEFT_LAYERS}."
        for key, value in tensors.items():
            if marker not in key:
                raise PeftlabError(f"peft LN_TUNING file holds {key!r}; such a file holds only "
                                   f"<norm layer>{marker}<parameter> tensors")
            module, local = key.split(marker, 1)
            modules.append(module)
            values[f"{module}.{local}"] = value
        config = cls(targets=[exact_pattern(m) for m in dict.fromkeys(modules)])
        return config, {MODEL: {}}, values
