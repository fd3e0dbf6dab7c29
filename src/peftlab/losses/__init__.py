"""Classification losses by name, for the train config's `loss:` section and plain PyTorch loops.

    fn = peftlab.loss("ldr_kl", lam=10.0)          # a callable (logits, labels, **batch) -> scalar
    peftlab.losses()                               # every registered name

One file per loss (importing this package registers every file); registry.py holds the config
base class `LossConfig`, `@register_loss`, `loss()` and `losses()`.
"""
# Registration order is the listing order of `peftlab losses`.
from . import cross_entropy, ldr_kl, aldr_kl, gce, sce, mae, nce_rce, focal, z_loss  # noqa: F401,I001  (registers)
from .registry import IGNORE_INDEX, LossConfig, loss, loss_class, losses, register_loss

__all__ = ["LossConfig", "register_loss", "loss", "loss_class", "losses", "IGNORE_INDEX"]
