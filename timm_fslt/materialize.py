"""``materialize``: the ticket as an ordinary model, for deployment and export."""
from __future__ import annotations

import copy

import torch
from torch import nn

from timm_fslt.frozen import get_group, remove_group
from timm_fslt.nn.modules import is_frozen_layer


def _unparametrize(module: nn.Module) -> None:
    """Replace the parametrized weight by a plain Parameter holding its current value.

    ``parametrize.remove_parametrizations`` deletes the property from the module's
    class, and a deep copy shares that dynamically created class with the original
    model, so it would break the original. Swapping the class back is local.
    """
    value = module.weight.detach().clone()
    module.__class__ = module.__class__.__bases__[0]
    del module._modules["parametrizations"]
    module.weight = nn.Parameter(value)


def materialize(model: nn.Module) -> nn.Module:
    """A plain copy of a frozen model whose weights are ``W * mask * scale``.

    The copy has the original module classes (timm, torch or PyG) with ordinary
    ``weight`` parameters and no hooks; its outputs equal the frozen model's in
    eval mode, so it can be saved, fine-tuned or exported (ONNX, torch.export).
    The frozen model itself is left untouched.
    """
    get_group(model).refresh()
    plain = copy.deepcopy(model)
    with torch.no_grad():
        for _, module in list(plain.named_modules()):
            if is_frozen_layer(module):
                _unparametrize(module)
    remove_group(plain)
    for param in plain.parameters():
        param.requires_grad_(True)
    return plain
