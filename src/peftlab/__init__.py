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

# Importing the method files binds the subpackage `peftlab.methods` to the name `methods`;
# the public function of that name (every registered method name) must win.
from .registry import methods  # noqa: E402,F811

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
    # method configs
    "AdaLoRA", "ALLoRA", "CorDA", "DoRA", "DSEE", "EVA", "FLoRA", "IncreLoRA", "LaMDA", "LoLDU", "LoRA",
    "LoRAGA", "LoRASB", "NOLA", "RandLoRA", "SoRA", "SVFit", "VeRA",
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
