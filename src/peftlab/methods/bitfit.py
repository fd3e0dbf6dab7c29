"""BitFit: simple parameter-efficient fine-tuning for transformer-based masked language models
(Ben Zaken, Goldberg & Ravfogel 2022, arXiv 2106.10199).

Only the model's bias terms train (section 2 of the paper): every layer keeps

    h = W0 x + b          W0 frozen, b trained where it is

including the biases of the normalisation layers (the paper trains all of them). Nothing new
is added, so the output is unchanged at attach and there is nothing to merge: the trained
biases are the model's own (merge and unmerge leave them be; detach puts the original values
back, bit for bit; detach(keep_merged=True) keeps the trained ones).

A model-level, in-place method (peftlab.model_level.InPlace): `targets` chooses the modules
whose own bias trains (None: every module), `exclude` leaves some out. Save writes only the
biases. A model without biases (Llama and SmolLM2 have none) is refused before any change.
peft has no BitFit format: save(format="peft") refuses it.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import PeftlabError
from ..model_level import InPlace, module_parameters
from ..registry import MethodConfig, register
from ..targets import select


def chosen_modules(model: nn.Module, config: MethodConfig) -> list[str]:
    """The modules `targets` (None: all of them) and `exclude` choose, root excluded."""
    if config.targets is None:
        return select(model, lambda name, module: True, config.exclude)
    return select(model, config.targets, config.exclude)


@register("bitfit")
@dataclass
class BitFit(MethodConfig):
    site_adapters = False
    model_adapter = True
    trainable_formula = "every bias of the chosen modules (out per layer)"

    def build_model(self, model: nn.Module, initialize: bool = True) -> InPlace:
        biases = module_parameters(model, chosen_modules(model, self), lambda name, p: name == "bias")
        if not biases:
            where = "this model has" if self.targets is None else f"the modules chosen by {self.targets!r} have"
            raise PeftlabError(f"BitFit trains biases, but {where} none (layers built with bias=False, as in "
                               "Llama): choose another method, e.g. lora or ln_tuning")
        return InPlace(biases)
