"""peftlab: parameter-efficient fine-tuning methods behind one small core.

    model = peftlab.attach(model, peftlab.LoRA(r=8, targets=["query", "value"]))
    ...train...
    peftlab.save(model, "run/adapter")          # or format="peft"
    peftlab.merge(model)                         # W <- W + s B A
"""
from .core import (Adapter, adapters, attach, configs, detach, disabled, merge, param_groups, per_example,
                   regularization, set_active, step, summary, trainable_parameters, unmerge)
from .errors import PeftlabError
from .io import export_peft, import_peft, load, save
from .registry import MethodConfig, config, from_json, method_class, methods, register
from .methods.lora import LoRA

__all__ = [
    "Adapter", "LoRA", "MethodConfig", "PeftlabError", "adapters", "attach", "config", "configs", "detach",
    "disabled", "export_peft", "from_json", "import_peft", "load", "merge", "method_class", "methods",
    "param_groups", "per_example", "register", "regularization", "save", "set_active", "step", "summary",
    "trainable_parameters", "unmerge",
]
__version__ = "0.1.0"

# Importing peftlab.methods (the package of method files) binds that package to the name
# `methods` here; the public function of the same name must win.
from .registry import methods  # noqa: E402,F811


def __getattr__(name: str):
    """Every registered config class by its class name: peftlab.DoRA, peftlab.VeRA, ...

    Method files register themselves; none of them needs a line in this file.
    """
    from .registry import _METHODS, _load_builtin_methods

    _load_builtin_methods()
    for cls in _METHODS.values():
        if cls.__name__ == name:
            return cls
    raise AttributeError(f"module 'peftlab' has no attribute {name!r}")
