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
    IA3            the same sites, and peftlab's `feedforward` patterns resolved on them as
                   `feedforward_modules`; both start at l = 1
    LN tuning      the norm layers peftlab would train; `peft` trains a copy of each
                   (ln_tuning_layers) where peftlab trains the layer in place: the same values
    prompts and    the same P, encoder width m (given explicitly: peftlab's defaults, the hidden
    prefixes       size and kv_dim, are not `peft`'s) and init (`vocab` is SAMPLE_VOCAB); the
                   task type picks `peft`'s forward (SEQ_CLS for a classifier, CAUSAL_LM).
                   Both build the same modules in the same order, so under the run's seed they
                   draw the same starting values: the runs match step for step. Differences:
                   `peft`'s P-tuning encoder has no vocabulary init (peftlab's default for
                   `prompt`, encoder: mlp, is init: vocab; init: random is the same start);
                   `peft`'s classifier prefix forward names the cache `past_key_values`, which
                   transformers 5's backbones call `cache`, so the peer gives the backbone that
                   alias (`peft`'s own prefix, mask, pooling and head run unchanged); `peft`'s
                   causal-LM prompt forward returns logits for the prompt's positions too, which
                   the peer cuts, as peftlab does, for the recipe's (batch, tokens) labels

Per-pattern overrides (a rank per site) are not mapped: such a config has no peer.
"""
from __future__ import annotations

import dataclasses
import inspect
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


def _lora_family(cfg, model: nn.Module, head: list[str], **extra: Any) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=sites_of(model, cfg),
                      modules_to_save=head or None, **extra)


def _lora_init(cfg) -> Any:
    """peftlab's LoRA `init` (and PiSSA's svd_niter) as peft's init_lora_weights."""
    if cfg.init == "kaiming":
        return True
    if cfg.init == "pissa" and getattr(cfg, "svd_niter", None) is not None:
        return f"pissa_niter_{cfg.svd_niter}"
    return cfg.init  # gaussian, pissa, olora: the same names in peft


def lora(cfg, model, head) -> PeerPlan:
    return PeerPlan(_lora_family(cfg, model, head, use_rslora=cfg.rslora, init_lora_weights=_lora_init(cfg)))


def dora(cfg, model, head) -> PeerPlan:
    return PeerPlan(_lora_family(cfg, model, head, use_rslora=cfg.rslora, init_lora_weights=_lora_init(cfg),
                                 use_dora=True))


def eva(cfg, model, head) -> PeerPlan:
    from peft import EvaConfig, initialize_lora_eva_weights

    options = EvaConfig(rho=cfg.rho, tau=cfg.tau, use_label_mask=cfg.use_label_mask,
                        label_mask_value=cfg.label_mask_value, whiten=cfg.whiten,
                        adjust_scaling_factors=cfg.adjust_scaling_factors)
    config = _lora_family(cfg, model, head, init_lora_weights="eva", eva_config=options)

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


def corda(cfg, model, head) -> PeerPlan:
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    config = _lora_family(cfg, model, head, init_lora_weights="corda", corda_config=CordaConfig(corda_method=cfg.mode))

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


def lora_ga(cfg, model, head) -> PeerPlan:
    from peft.tuners.lora import LoraGAConfig, preprocess_loraga

    options = LoraGAConfig(direction=cfg.direction, scale=cfg.scale_mode, stable_gamma=cfg.stable_gamma)
    config = _lora_family(cfg, model, head, init_lora_weights="lora_ga", lora_ga_config=options)

    def estimate(model: nn.Module, batches: list[dict]) -> None:
        def train_step() -> None:  # the gradient of the task loss, accumulated over the batches
            for batch in batches:
                model(**batch).loss.backward()

        preprocess_loraga(model, config, train_step)
        model.zero_grad(set_to_none=True)

    return PeerPlan(config, before=estimate)


def adalora(cfg, model, head) -> PeerPlan:
    from peft import AdaLoraConfig

    config = AdaLoraConfig(init_r=cfg.init_r, target_r=cfg.target_r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                           tinit=cfg.tinit, tfinal=cfg.tfinal, deltaT=cfg.delta_t, beta1=cfg.beta1, beta2=cfg.beta2,
                           orth_reg_weight=cfg.orth_reg_weight, total_step=cfg.total_steps,
                           target_modules=sites_of(model, cfg), modules_to_save=head or None)

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


def vera(cfg, model, head) -> PeerPlan:
    from peft import VeraConfig

    return PeerPlan(VeraConfig(r=cfg.r, target_modules=sites_of(model, cfg), projection_prng_key=cfg.seed,
                               vera_dropout=cfg.dropout, d_initial=cfg.d_initial, modules_to_save=head or None))


def randlora(cfg, model, head) -> PeerPlan:
    from peft import RandLoraConfig

    return PeerPlan(RandLoraConfig(r=cfg.r, target_modules=sites_of(model, cfg), projection_prng_key=cfg.seed,
                                   randlora_alpha=cfg.alpha, randlora_dropout=cfg.dropout,
                                   sparse=cfg.bases == "sparse", very_sparse=cfg.bases == "very_sparse",
                                   modules_to_save=head or None))


def ia3(cfg, model, head) -> PeerPlan:
    from peft import IA3Config

    from ..hosts import host_kind
    from ..registry import Site

    sites = sites_of(model, cfg)
    modules = dict(model.named_modules())
    kinds = {name: host_kind(modules[name]) for name in sites}
    # peftlab's `feedforward` patterns, resolved against the same sites: the layers whose input is scaled
    feedforward = [name for name in sites if cfg.is_feedforward(Site(name, modules[name], kinds[name]))]
    return PeerPlan(IA3Config(target_modules=sites, feedforward_modules=feedforward, init_ia3_weights=True,
                              fan_in_fan_out=any(kind.name == "conv1d" for kind in kinds.values()),
                              modules_to_save=head or None))


def ln_tuning(cfg, model, head) -> PeerPlan:
    from peft import LNTuningConfig

    from ..methods.ln_tuning import norm_modules

    return PeerPlan(LNTuningConfig(target_modules=norm_modules(model, cfg), modules_to_save=head or None))


def prompt(cfg, model, head) -> PeerPlan:
    from peft import PromptEncoderConfig, PromptTuningConfig, PromptTuningInit

    from ..methods.prefixes import find_layout, peft_task_type

    task_type = peft_task_type(model, bool(head))
    if cfg.encoder == "mlp":  # P-tuning: peft's PromptEncoder, the same MLP (hidden -> m -> m -> hidden, ReLU)
        width = cfg.encoder_hidden_size or find_layout(model, cfg.method, needs_cache=False).hidden
        config = PromptEncoderConfig(task_type=task_type, num_virtual_tokens=cfg.num_virtual_tokens,
                                     encoder_reparameterization_type="MLP", encoder_hidden_size=width,
                                     modules_to_save=head or None)
    else:
        init = PromptTuningInit.SAMPLE_VOCAB if cfg.init == "vocab" else PromptTuningInit.RANDOM
        config = PromptTuningConfig(task_type=task_type, num_virtual_tokens=cfg.num_virtual_tokens,
                                    prompt_tuning_init=init, modules_to_save=head or None)
    return PeerPlan(config, after=_logits_without_prompt)


def _logits_without_prompt(peft_model: nn.Module, batches: list[dict]) -> None:
    """A causal LM's logits cut to the caller's tokens, as peftlab's prompt gives them.

    `peft`'s causal-LM prompt forward returns logits for the P prompt positions too,
    (batch, P + tokens, vocabulary), and shifts the labels only when it computes the loss itself;
    the recipe computes the loss from the logits and its own (batch, tokens) labels.
    """
    config = peft_model.peft_config[ADAPTER_NAME]
    if config.task_type != "CAUSAL_LM":
        return  # a classifier's logits are one row per example

    def cut(module: nn.Module, args: tuple, output: Any) -> Any:
        output["logits"] = output["logits"][:, config.num_virtual_tokens:]
        return output

    peft_model.register_forward_hook(cut)


def _prefix_config(cfg, model, head, projection: bool, width: int | None) -> PeerPlan:
    from peft import PrefixTuningConfig

    from ..methods.prefixes import find_layout, peft_task_type

    kv_dim = find_layout(model, cfg.method, needs_cache=True).kv_dim
    config = PrefixTuningConfig(task_type=peft_task_type(model, bool(head)), num_virtual_tokens=cfg.num_virtual_tokens,
                                prefix_projection=projection, encoder_hidden_size=width or kv_dim,
                                modules_to_save=head or None)
    return PeerPlan(config, after=_backbone_takes_past_key_values)


def prefix(cfg, model, head) -> PeerPlan:
    return _prefix_config(cfg, model, head, projection=cfg.projection, width=cfg.encoder_hidden_size)


def p_tuning_v2(cfg, model, head) -> PeerPlan:
    return _prefix_config(cfg, model, head, projection=False, width=None)


def _backbone_takes_past_key_values(peft_model: nn.Module, batches: list[dict]) -> None:
    """Let `peft`'s classifier prefix forward reach a backbone whose cache argument is named `cache`.

    PeftModelForSequenceClassification hands the prefix to the backbone (BertModel, LlamaModel)
    as `past_key_values` and refuses a backbone whose forward does not name that argument;
    transformers 5 names it `cache`. The backbone's forward gets the old name as an alias, so
    `peft`'s own prefix cache, attention mask, pooling and classifier run unchanged.
    """
    from peft import PeftModelForSequenceClassification

    if not isinstance(peft_model, PeftModelForSequenceClassification):
        return  # peft's other prefix forwards pass the cache on through the model's own keyword arguments
    backbone = peft_model.base_model.get_submodule(peft_model.transformer_backbone_name)
    parameters = inspect.signature(backbone.forward).parameters
    if "past_key_values" in parameters or "cache" not in parameters:
        return
    forward = backbone.forward

    def forward_with_past_key_values(*args: Any, past_key_values: Any = None, **kwargs: Any) -> Any:
        return forward(*args, cache=past_key_values, **kwargs)

    backbone.forward = forward_with_past_key_values


# Registry name -> mapping (cfg, model, head) -> PeerPlan. Aliases of LoRA (rslora, pissa, olora) build LoRA configs.
METHODS: dict[str, Callable[..., PeerPlan]] = {
    "lora": lora, "rslora": lora, "pissa": lora, "olora": lora, "dora": dora, "eva": eva, "corda": corda,
    "lora_ga": lora_ga, "adalora": adalora, "vera": vera, "randlora": randlora, "ia3": ia3, "ln_tuning": ln_tuning,
    "prompt": prompt, "prefix": prefix, "p_tuning_v2": p_tuning_v2,
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
    return METHODS[name](cfg, model, [head] if head else [])


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
