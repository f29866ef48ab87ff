"""Low-rank optimizers, exposed as ordinary ``torch.optim.Optimizer`` objects.

Gradient-projection optimizers (GaLore family, Fira, APOLLO, Flora, ...) and adapter-side
optimizers (LoRA+, LoRA-Pro, LoFT, ALLoRA).
"""

from .adapter_side import *  # noqa: F401,F403  (loraplus, lora_pro, loft, allora)
from .adapter_side import __all__ as _adapter_side_all
from .apollo import apollo, apollo_mini
from .elementwise_adamw import ElementwiseAdamW
from .fira import fira
from .flora import flora
from .galore import galore
from .optimizer import LowRankOptimizer, NonFiniteGradientError, split_targets, state_bytes
from .osd import osd
from .projectors import projectors
from .q_galore import q_galore
from .transforms import chain, inner_names

__all__ = [
    *_adapter_side_all,
    "galore", "fira", "apollo", "apollo_mini", "flora", "q_galore", "osd", "projectors", "state_bytes",
    "inner_names", "chain", "split_targets", "LowRankOptimizer", "NonFiniteGradientError", "ElementwiseAdamW",
]
