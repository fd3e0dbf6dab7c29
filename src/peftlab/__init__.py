"""peftlab: parameter-efficient fine-tuning methods behind one small core.

    model = peftlab.attach(model, peftlab.LoRA(r=8, targets=["query", "value"]))
    ...train...
    peftlab.save(model, "run/adapter")          # or format="peft"
    peftlab.merge(model)                         # W <- W + s B A

Everything a user imports is listed in `__all__` below, one name per operation. The training
recipe (`peftlab.recipe`), the command line (`peftlab.cli`) and the bench (`peftlab.bench`) are
built on this surface and are not part of it.
"""
from .core import (Adapter, PeftLoRA, adapter_configs, adapters, attach, detach, disabled, merge, param_groups, per_example,
                   regularization, set_active, step, summary, trainable_parameters, unmerge)
from .errors import PeftlabError
from .io import load, save
from .registry import MethodConfig, config, from_json, method_class, register

# Every method's config class, one import per method file.
from .methods.adalora import AdaLoRA
from .methods.allora import ALLoRA
from .methods.corda import CorDA
from .methods.dora import DoRA
from .methods.dsee import DSEE
from .methods.eva import EVA
from .methods.flora import FLoRA
from .methods.increlora import IncreLoRA
from .methods.lamda import LaMDA
from .methods.loldu import LoLDU
from .methods.lora import LoRA
from .methods.lora_ga import LoRAGA
from .methods.lora_sb import LoRASB
from .methods.nola import NOLA
from .methods.randlora import RandLoRA
from .methods.sora import SoRA
from .methods.svfit import SVFit
from .methods.vera import VeRA
from .methods.hft import HFT
from .methods.lisa import LISA
from .methods.lora_moe import LoRAMoE
from .methods.s2ft import S2FT
from .methods.spiel import SpIEL
from .methods.houlsby import Houlsby
from .methods.pfeiffer import Pfeiffer
from .methods.parallel_adapter import ParallelAdapter
from .methods.compacter import Compacter
from .methods.compacter_pp import CompacterPP
from .methods.ia3 import IA3
from .methods.ssf import SSF
from .methods.bitfit import BitFit
from .methods.ln_tuning import LNTuning
from .methods.prompt import PromptTuning
from .methods.prefix import PrefixTuning
from .methods.p_tuning_v2 import PTuningV2
from .methods.mam import MAM
from .methods.intrinsic import Intrinsic
from . import analysis  # looking inside weight changes: peftlab.analysis.intruder_dimensions, ...
from . import quantize  # a quantized frozen base: peftlab.quantize.quantize(model, "nf4"), dequantize_model, ...
from .methods.delta import Delta
from .model_level import ModelAdapter

# Importing the method files binds the subpackage `peftlab.methods` to the name `methods`;
# the public function of that name (every registered method name) must win.
from .registry import methods  # noqa: E402,F811
# Likewise the loss functions win over the subpackage `peftlab.losses`.
from .losses import loss, losses  # noqa: E402,F811
from .optim import optimizer, optimizers  # noqa: E402  (optimizers by name: the train config's `optimizer:`)
# Combining attached adapters (task arithmetic, TIES, DARE, ...): the function wins over its module.
from .combine import combine  # noqa: E402

__all__ = [
    # attaching and detaching
    "attach", "detach", "merge", "unmerge", "disabled", "set_active", "per_example",
    # inspecting what is attached
    "adapters", "adapter_configs", "summary", "trainable_parameters",
    # the three training hooks
    "param_groups", "regularization", "step",
    # files: peftlab's format, or format="peft"
    "save", "load",
    # methods by name, and writing a new one
    "methods", "config", "method_class", "from_json", "register", "MethodConfig", "Adapter", "PeftLoRA",
    "PeftlabError",
    # losses by name (the train config's `loss:` section)
    "loss", "losses",
    # optimizers by name (the train config's `optimizer:` section)
    "optimizer", "optimizers",
    # one adapter from several attached ones
    "combine",
    # method configs
    "AdaLoRA", "ALLoRA", "CorDA", "DoRA", "DSEE", "EVA", "FLoRA", "IncreLoRA", "LaMDA", "LoLDU", "LoRA",
    "LoRAGA", "LoRASB", "NOLA", "RandLoRA", "SoRA", "SVFit", "VeRA",
    "HFT", "LISA", "LoRAMoE", "S2FT", "SpIEL",
    "Houlsby", "Pfeiffer", "ParallelAdapter", "Compacter", "CompacterPP",
    "IA3", "SSF", "BitFit", "LNTuning", "ModelAdapter",
    "PromptTuning", "PrefixTuning", "PTuningV2", "MAM",
    "Intrinsic",
    # diagnostics of weight changes (a submodule): intruder dimensions, spectra, subspace similarity
    "analysis",
    "Delta",
    # a quantized frozen base (a submodule): quantize, dequantize_model, merge_errors, LoftQ
    "quantize",
]
__version__ = "0.1.0"

# Names of earlier releases, kept working for one release with a warning naming the new call.
_RENAMED = {
    "configs": ("adapter_configs", lambda: adapter_configs),
    "export_peft": ('save(model, directory, format="peft")',
                    lambda: lambda model, directory, **kw: save(model, directory, format="peft", **kw)),
    "import_peft": ("load(model, directory)", lambda: load),
}


def __getattr__(name: str):
    if name in _RENAMED:
        import warnings

        new, target = _RENAMED[name]
        warnings.warn(f"peftlab.{name} is renamed: use peftlab.{new}", DeprecationWarning, stacklevel=2)
        return target()
    raise AttributeError(f"module 'peftlab' has no attribute {name!r}")
