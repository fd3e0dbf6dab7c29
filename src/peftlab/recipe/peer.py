"""The `peft` peer: the same method trained through the `peft` library, for the bench's side-by-side column.

A peer run is an ordinary run of the training recipe (same model, data, split, seed, batches,
optimizer, schedule and learning rate) whose model is adapted by `peft` instead of peftlab:
`adapt(model, run, calibration)` is handed to the recipe (trainer.Hooks.adapt) and returns an
`Adaptation` holding the `peft.PeftModel`.

The run config's method section is a peftlab config (`{name: dora, r: 8, ...}`); `METHODS`
maps each method that `peft` also implements to the `peft` config with the same
hyperparameters. What each mapping needs to say:

    sites          peftlab resolves `targets`/`exclude` to module names; `peft` gets that exact
                   list, so both adapt the same layers
    head           a classifier's new head trains in full in both (`also_train` here,
                   `modules_to_save` there)
    calibration    EVA, CorDA and LoRA-GA get the recipe's calibration batches, the same ones
                   peftlab's initialisation sees (CorDA one unpadded sequence at a time, the
                   only input `peft`'s CorDA takes)
    AdaLoRA        `update_and_allocate(step)` after each optimizer step; its orthogonality
                   regulariser, which `peft` adds inside forward only when the model computes
                   its own loss (the recipe computes the loss from the logits), is added the way
                   `peft`'s AdaLoraModel.forward computes it
    VeRA/RandLoRA  `peft` draws one pair of shared bases at the largest layer shape and slices
                   it; peftlab with `basis_shape: null` draws per shape. Same distribution, other
                   draws: the peer column compares the methods, not the random numbers

Per-pattern overrides (a rank per site) are not mapped: such a config has no peer.
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Callable

import torch
from torch import nn

from .adaptation import ADAPTER_NAME, Adaptation, trained_parameters
from ..errors import PeftlabError



@dataclasses.dataclass
class PeerPlan:
    """A `peft` config and what has to happen around `get_peft_model`."""

    config: Any  # a peft PeftConfig
    before: Callable[[nn.Module, list[dict]], None] | None = None  # (base model, calibration batches)
    after: Callable[[nn.Module, list[dict]], None] | None = None  # (peft model, calibration batches)
    after_step: Callable[[nn.Module, int], None] | None = None  # (peft model, step)
    regularization: Callable[[nn.Module], torch.Tensor | None] | None = None
    low_cpu_mem_usage: bool = False  # adapters start empty and `after` fills them (peft's advice for EVA)


# ---- one mapping per method ------------------------------------------------------------------


def _lora_family(cfg, sites: list[str], head: list[str], **extra: Any) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=sites,
                      modules_to_save=head or None, **extra)


def _lora_init(cfg) -> Any:
    """peftlab's LoRA `init` (and PiSSA's svd_niter) as peft's init_lora_weights."""
    if cfg.init == "kaiming":
        return True
    if cfg.init == "pissa" and getattr(cfg, "svd_niter", None) is not None:
        return f"pissa_niter_{cfg.svd_niter}"
    return cfg.init  # gaussian, pissa, olora: the same names in peft


def lora(cfg, sites, head) -> PeerPlan:
    return PeerPlan(_lora_family(cfg, sites, head, use_rslora=cfg.rslora, init_lora_weights=_lora_init(cfg)))


def dora(cfg, sites, head) -> PeerPlan:
    return PeerPlan(_lora_family(cfg, sites, head, use_rslora=cfg.rslora, init_lora_weights=_lora_init(cfg),
                                 use_dora=True))


def eva(cfg, sites, head) -> PeerPlan:
    from peft import EvaConfig, initialize_lora_eva_weights

    options = EvaConfig(rho=cfg.rho, tau=cfg.tau, use_label_mask=cfg.use_label_mask,
                        label_mask_value=cfg.label_mask_value, whiten=cfg.whiten,
                        adjust_scaling_factors=cfg.adjust_scaling_factors)
    config = _lora_family(cfg, sites, head, init_lora_weights="eva", eva_config=options)

    def token_mask(inputs: dict, peft_config) -> torch.Tensor:
        # As peftlab's EVA: padding is left out; labels mask tokens only when they are per token
        # (a classifier's one label per example says nothing about which tokens to use).
        mask = inputs["attention_mask"].bool()
        labels = inputs.get("labels")
        if peft_config.eva_config.use_label_mask and labels is not None and labels.shape == mask.shape:
            mask = mask & (labels != peft_config.eva_config.label_mask_value)
        return mask.nonzero()

    def initialise(peft_model: nn.Module, batches: list[dict]) -> None:
        initialize_lora_eva_weights(peft_model, batches, prepare_model_inputs_fn=token_mask,
                                    show_progress_bar=False)

    return PeerPlan(config, after=initialise, low_cpu_mem_usage=True)


def corda(cfg, sites, head) -> PeerPlan:
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    config = _lora_family(cfg, sites, head, init_lora_weights="corda", corda_config=CordaConfig(corda_method=cfg.mode))

    def collect(model: nn.Module, batches: list[dict]) -> None:
        # peft's CorDA takes the covariance of each forward's (tokens, features) input, so it is fed
        # one unpadded sequence at a time, as its official code does (peftlab's takes the padded
        # batches and computes the same per-sequence statistic, padding left out)
        with torch.no_grad():
            preprocess_corda(model, config, run_model=lambda: [model(**row) for row in single_sequences(batches)])

    return PeerPlan(config, before=collect)


def single_sequences(batches: list[dict]) -> list[dict]:
    """Right-padded batches as batches of one sequence each, padding removed."""
    rows = []
    for batch in batches:
        for i, mask in enumerate(batch["attention_mask"]):
            length = int(mask.sum())
            rows.append({k: v[i:i + 1, :length] if v.dim() == 2 else v[i:i + 1] for k, v in batch.items()})
    return rows


def lora_ga(cfg, sites, head) -> PeerPlan:
    from peft.tuners.lora import LoraGAConfig, preprocess_loraga

    options = LoraGAConfig(direction=cfg.direction, scale=cfg.scale_mode, stable_gamma=cfg.stable_gamma)
    config = _lora_family(cfg, sites, head, init_lora_weights="lora_ga", lora_ga_config=options)

    def estimate(model: nn.Module, batches: list[dict]) -> None:
        def train_step() -> None:  # the gradient of the task loss, accumulated over the batches
            for batch in batches:
                model(**batch).loss.backward()

        preprocess_loraga(model, config, train_step)
        model.zero_grad(set_to_none=True)

    return PeerPlan(config, before=estimate)


def adalora(cfg, sites, head) -> PeerPlan:
    from peft import AdaLoraConfig

    config = AdaLoraConfig(init_r=cfg.init_r, target_r=cfg.target_r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                           tinit=cfg.tinit, tfinal=cfg.tfinal, deltaT=cfg.delta_t, beta1=cfg.beta1, beta2=cfg.beta2,
                           orth_reg_weight=cfg.orth_reg_weight, total_step=cfg.total_steps, target_modules=sites,
                           modules_to_save=head or None)

    def orthogonality(peft_model: nn.Module) -> torch.Tensor | None:
        # ||P^T P - I||_F + ||Q Q^T - I||_F averaged over the factor matrices, times orth_reg_weight
        terms = []
        for name, p in peft_model.named_parameters():
            if ("lora_A" in name or "lora_B" in name) and ADAPTER_NAME in name and p.numel() > 0:
                gram = p @ p.T if "lora_A" in name else p.T @ p
                terms.append(torch.linalg.matrix_norm(gram - torch.eye(gram.shape[0], dtype=gram.dtype)))
        return cfg.orth_reg_weight * torch.stack(terms).mean() if terms else None

    return PeerPlan(config, after_step=lambda peft_model, step: peft_model.base_model.update_and_allocate(step),
                    regularization=orthogonality)


def vera(cfg, sites, head) -> PeerPlan:
    from peft import VeraConfig

    return PeerPlan(VeraConfig(r=cfg.r, target_modules=sites, projection_prng_key=cfg.seed, vera_dropout=cfg.dropout,
                               d_initial=cfg.d_initial, modules_to_save=head or None))


def randlora(cfg, sites, head) -> PeerPlan:
    from peft import RandLoraConfig

    return PeerPlan(RandLoraConfig(r=cfg.r, target_modules=sites, projection_prng_key=cfg.seed,
                                   randlora_alpha=cfg.alpha, randlora_dropout=cfg.dropout,
                                   sparse=cfg.bases == "sparse", very_sparse=cfg.bases == "very_sparse",
                                   modules_to_save=head or None))


# Registry name -> mapping. Aliases of LoRA (rslora, pissa, olora) build LoRA configs.
METHODS: dict[str, Callable[..., PeerPlan]] = {
    "lora": lora, "rslora": lora, "pissa": lora, "olora": lora, "dora": dora, "eva": eva, "corda": corda,
    "lora_ga": lora_ga, "adalora": adalora, "vera": vera, "randlora": randlora,
}


# ---- the recipe's hook -------------------------------------------------------------------------


def sites_of(model: nn.Module, cfg) -> list[str]:
    """The module names peftlab would adapt for this config (targets, exclude, supported hosts)."""
    from ..hosts import host_kind
    from ..targets import select

    modules = dict(model.named_modules())
    names = [n for n in select(model, cfg.targets, cfg.exclude)
             if host_kind(modules[n]) is not None and host_kind(modules[n]).name in cfg.hosts]
    if not names:
        raise PeftlabError(f"targets {cfg.targets!r} select no layer of this model for the peft peer run")
    return names


def plan_for(run, model: nn.Module, head: str | None) -> PeerPlan:
    from ..registry import config as method_config

    name = run.method["name"]
    if name not in METHODS:
        raise PeftlabError(f"`peft` has no counterpart of {name!r} here; peer runs exist for: {', '.join(METHODS)}")
    cfg = method_config(name, **{k: v for k, v in run.method.items() if k != "name"})
    if cfg.overrides:
        raise PeftlabError(f"method {name} has per-site overrides, which the peer mapping does not translate: "
                           "run the peer without overrides, or leave this method out of `peer`")
    return METHODS[name](cfg, sites_of(model, cfg), [head] if head else [])


def adapt(model: nn.Module, run, calibration: Callable[[], list[dict]]) -> Adaptation:
    """trainer.Hooks.adapt for peer runs: the model adapted by `peft` with the run's method."""
    from peft import get_peft_model

    from .models import head_name

    head = head_name(model) if run.kind == "classification" else None
    plan = plan_for(run, model, head)
    batches = calibration() if plan.before or plan.after else []
    if plan.before:
        plan.before(model, batches)
    peft_model = get_peft_model(model, plan.config, adapter_name=ADAPTER_NAME, low_cpu_mem_usage=plan.low_cpu_mem_usage)
    if plan.after:
        plan.after(peft_model, batches)
    peft_model.train()

    def save(directory: pathlib.Path) -> None:
        peft_model.save_pretrained(str(directory))

    return Adaptation(
        model=peft_model,
        param_groups=lambda lr: [{"params": trained_parameters(peft_model), "lr": lr}],
        save=save,
        regularization=(lambda: plan.regularization(peft_model)) if plan.regularization else (lambda: None),
        after_step=(lambda step, optimizer: plan.after_step(peft_model, step)) if plan.after_step else None,
    )
