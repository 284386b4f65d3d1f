"""timm_fslt: strong lottery tickets inside partially frozen random networks.

    model = timm_fslt.freeze(timm.create_model("resnet18"), prune=0.35, lock=0.35)

then train the scores with an ordinary PyTorch loop.
"""
__version__ = "0.1.0"

from .core import FreezeConfig, freeze, get_config, get_group, refresh_masks
from .layers import find_maskable, iter_frozen
from .materialize import materialize
from .report import SizeReport, size_report
from .rng import GENERATOR_VERSION
from .supermask import FrozenSupermask
from . import models  # registers conv6 / resnet18_cifar in timm

__all__ = [
    "FreezeConfig", "FrozenSupermask", "GENERATOR_VERSION", "SizeReport", "find_maskable",
    "freeze", "get_config", "get_group", "iter_frozen", "materialize", "refresh_masks", "size_report",
]
