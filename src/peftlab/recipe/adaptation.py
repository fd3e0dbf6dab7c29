"""How a loaded model becomes trainable, seen from the training recipe.

The recipe (trainer.py) needs five things from whatever made a model trainable, and nothing
else; they are an `Adaptation`:

    model            the module the Trainer trains (the loaded model, or a wrapper around it)
    param_groups(lr) optimizer parameter groups
    save(directory)  writes what was trained
    regularization() a term added to the training loss, or None
    after_step(step, optimizer) called after each optimizer step, or None

peftlab's own way is `attach`: `of_method` attaches the run's method section, `of_peftlab`
wraps a model with a method attached already. The baselines are ordinary run configs too,
`method: {name: head-only}`, `method: {name: full}` and full-galore/full-fira/full-frugal (`baseline`), and `peftlab.peer`
trains the same methods through the `peft` library. All of them run through one loop, so a
comparison between them differs only in the adaptation.
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Callable

from torch import Tensor, nn

from ..errors import PeftlabError

ADAPTER_NAME = "default"  # the name a run's adapter is attached (and saved) under

# Baselines: not adapter methods (they are not in the registry), but run configs like any other.
# full-galore, full-fira, full-frugal are `full` trained with that memory-efficient optimizer
# (the run's optimizer section names it): the linear layers' weights are projected, everything
# else (embeddings, norms, biases, the task head) is in a `project: False` group.
BASELINE_OPTIMIZERS = {"full-galore": "galore", "full-fira": "fira", "full-frugal": "frugal"}
BASELINES = ("head-only", "full", *BASELINE_OPTIMIZERS)
BASELINE_FILE = "model.safetensors"  # what a baseline saves: every parameter it trained


def _no_regularization() -> Tensor | None:
    return None


@dataclasses.dataclass
class Adaptation:
    model: nn.Module
    param_groups: Callable[[float], list[dict]]
    save: Callable[[pathlib.Path], None]
    regularization: Callable[[], Tensor | None] = _no_regularization
    after_step: Callable[[int, Any], None] | None = None  # (step, optimizer)


def trained_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def of_peftlab(model: nn.Module, method) -> Adaptation:
    """The default: the method is attached already; peftlab's model-wide hooks do the rest."""
    from .. import core, io

    return Adaptation(
        model=model,
        param_groups=lambda lr: core.param_groups(model, lr),
        save=lambda directory: io.save(model, directory),
        regularization=lambda: core.regularization(model),
        after_step=(lambda step, optimizer: core.step(model, step, optimizer)) if method.step_hook else None,
    )


def of_method(model: nn.Module, method: dict[str, Any], head: str | None, calibrate: Callable[[], list[dict]],
              adapter_state: dict | None = None) -> Adaptation:
    """The run's method section attached to the loaded model.

    `head` (a classifier's new head) trains in full and is saved with the adapter. `calibrate()`
    gives the batches data-driven initialisations read; `adapter_state` (on resume) fills the
    adapters with saved values instead, so those initialisations do not run again.
    """
    from .. import core

    config = method_config(method, head)
    if is_loftq(method):  # attached by the loader (models.load), fitted to each weight as it was quantized
        return of_peftlab(model, config)
    calibration = calibrate() if config.needs_calibration and adapter_state is None else None
    core.attach(model, config, ADAPTER_NAME, calibration=calibration, state_dict=adapter_state)
    return of_peftlab(model, config)


def method_config(method: dict[str, Any], head: str | None):
    """The run's method section as a config; `head` (a classifier's new head) joins its also_train."""
    from ..registry import config

    fields = {k: v for k, v in method.items() if k != "name"}
    if head is not None:
        fields["also_train"] = list(dict.fromkeys([*fields.get("also_train", []), head]))
    return config(method["name"], **fields)


def is_loftq(method: dict[str, Any]) -> bool:
    """LoRA's `init: loftq`: A, B fitted while the base is quantized, so the model loader attaches it
    (on resume too: the same quantized base; the Trainer then loads the saved A, B)."""
    return method.get("init") == "loftq"


def baseline(name: str, model: nn.Module, head: str | None) -> Adaptation:
    """head-only: only the task head trains (a linear probe); full: every parameter trains.

    `head` is the classifier's module name; a causal LM has none, so head-only is refused there.
    """
    if name == "head-only":
        if head is None:
            raise PeftlabError("method head-only trains only a classification head, and this task's model has "
                               "none: use it for classification tasks, or choose another method")
        for parameter_name, parameter in model.named_parameters():
            parameter.requires_grad_(parameter_name.startswith(head + "."))
    elif name == "full" or name in BASELINE_OPTIMIZERS:
        for parameter in model.parameters():
            parameter.requires_grad_(True)
    else:
        raise PeftlabError(f"unknown baseline {name!r}; baselines are {', '.join(BASELINES)}")

    def save(directory: pathlib.Path) -> None:
        from safetensors.torch import save_file

        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        # Tied weights (e.g. SmolLM2's embedding and LM head) are stored once.
        tensors, seen = {}, set()
        for parameter_name, parameter in model.named_parameters():
            if parameter.requires_grad and parameter.data_ptr() not in seen:
                seen.add(parameter.data_ptr())
                tensors[parameter_name] = parameter.detach().cpu().contiguous()
        save_file(tensors, str(directory / BASELINE_FILE), metadata={"peftlab_baseline": name})

    if name in BASELINE_OPTIMIZERS:
        return Adaptation(model=model, param_groups=lambda lr: projected_groups(model, head, lr), save=save)
    return Adaptation(model=model, param_groups=lambda lr: [{"params": trained_parameters(model), "lr": lr}],
                      save=save)


def projected_groups(model: nn.Module, head: str | None, lr: float) -> list[dict]:
    """Two groups for the projecting optimizers: the weights of the nn.Linear layers outside the task
    head (the paper's attention and MLP matrices), and the rest with `project: False`. A linear weight
    shared with an embedding (a tied LM head) counts as the embedding."""
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    projected = {id(m.weight): m.weight for name, m in model.named_modules()
                 if isinstance(m, nn.Linear) and id(m.weight) not in embedded
                 and not (head is not None and (name == head or name.startswith(head + ".")))}
    rest = [p for p in trained_parameters(model) if id(p) not in projected]
    return [{"params": list(projected.values()), "lr": lr}, {"params": rest, "lr": lr, "project": False}]


def check_baseline_fields(method: dict) -> None:
    """A baseline takes no method fields (run-config validation calls this)."""
    fields = sorted(k for k in method if k != "name")
    if fields:
        raise PeftlabError(f"config key method: baseline {method['name']!r} takes no fields, got {fields}; "
                           "remove them or choose an adapter method")
