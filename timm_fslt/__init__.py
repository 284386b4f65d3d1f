"""timm_fslt: strong lottery tickets inside partially frozen random networks.

    model = timm_fslt.freeze(timm.create_model("resnet18"), prune=0.35, lock=0.35)

then train the scores with an ordinary PyTorch loop.
"""
from timm_fslt.version import __version__

from timm_fslt.frozen import (FreezeConfig, freeze, get_config, get_group, is_frozen, recompute_masked_weights,
                              refresh_masks)
from timm_fslt.nn.modules import find_maskable, iter_frozen
from timm_fslt.materialize import materialize
from timm_fslt.report import SizeReport, size_report
from timm_fslt.regen.rng import GENERATOR_VERSION
from timm_fslt.nn.supermask import FrozenSupermask
from timm_fslt import models  # registers conv6 / resnet18_cifar in timm
from timm_fslt.errors import TicketError
from timm_fslt.ticket.architecture import register_builder
from timm_fslt.ticket.io import create_model, load_ticket, save_ticket
from timm_fslt.ticket.hub import push_to_hub

__all__ = [
    "FreezeConfig", "FrozenSupermask", "GENERATOR_VERSION", "SizeReport", "find_maskable",
    "freeze", "get_config", "get_group", "is_frozen", "iter_frozen", "materialize", "recompute_masked_weights",
    "refresh_masks", "size_report",
    "TicketError", "create_model", "load_ticket", "push_to_hub", "register_builder", "save_ticket",
]

# Structural compaction and the torch-pruning bridge import torch-pruning on first use.
_LAZY = {"compact": "pruning.compact", "restore_structure": "pruning.compact",
         "torch_pruning_kwargs": "pruning.torch_pruning"}
__all__ += list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
