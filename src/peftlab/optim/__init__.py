"""Optimizers and optimizer parameter-group builders for adapted models."""
from .loraplus import loraplus_param_groups

__all__ = ["loraplus_param_groups"]
