"""timm_fslt: strong lottery tickets inside partially frozen random networks.

    model = timm_fslt.freeze(timm.create_model("resnet18"), prune=0.35, lock=0.35)

then train the scores with an ordinary PyTorch loop.
"""
__version__ = "0.1.0"

from .core import FreezeConfig, freeze, get_config, get_group, recompute_masked_weights, refresh_masks
from .layers import find_maskable, iter_frozen
from .materialize import materialize
from .report import SizeReport, size_report
from .rng import GENERATOR_VERSION
from .supermask import FrozenSupermask
from . import models  # registers conv6 / resnet18_cifar in timm
from .errors import TicketError
from .architecture import register_builder
from .ticket import create_model, load_ticket, save_ticket
from .hub import push_to_hub

__all__ = [
    "FreezeConfig", "FrozenSupermask", "GENERATOR_VERSION", "SizeReport", "find_maskable",
    "freeze", "get_config", "get_group", "iter_frozen", "materialize", "recompute_masked_weights",
    "refresh_masks", "size_report",
    "TicketError", "create_model", "load_ticket", "push_to_hub", "register_builder", "save_ticket",
]

# Structural compaction and the torch-pruning bridge import torch-pruning on first use.
_LAZY = {"compact": "compaction", "restore_structure": "compaction",
         "torch_pruning_kwargs": "integrations.torch_pruning"}
__all__ += list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
