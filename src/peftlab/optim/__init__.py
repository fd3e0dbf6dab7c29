"""Optimizers and optimizer parameter-group builders for adapted models.

`optimizer(name, params, **fields)` builds any registered optimizer (registry.py); `optimizers()`
lists them. One file each: galore, fira, frugal, adam_atan2, sam, and builtin (torch's adamw,
sgd, adafactor).
"""
from .adam_atan2 import AdamAtan2
from .fira import Fira
from .frugal import Frugal
from .galore import GaLore
from .loraplus import loraplus_param_groups
from .registry import OptimizerConfig, optimizer, optimizer_config, optimizers, register_optimizer
from .sam import SAM

__all__ = ["AdamAtan2", "Fira", "Frugal", "GaLore", "OptimizerConfig", "SAM", "loraplus_param_groups",
           "optimizer", "optimizer_config", "optimizers", "register_optimizer"]
