"""``materialize``: the ticket as an ordinary model, for deployment and export."""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize

from .core import _refresh_hook, get_group
from .layers import is_frozen_layer


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
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
                # freeze() made the random weight a buffer; an ordinary layer owns a Parameter.
                weight = module._buffers.pop("weight")
                module.weight = nn.Parameter(weight.detach().clone())
    for key, hook in list(plain._forward_pre_hooks.items()):
        if hook is _refresh_hook:
            del plain._forward_pre_hooks[key]
    del plain._fslt_group
    del plain.fslt_config
    for param in plain.parameters():
        param.requires_grad_(True)
    return plain
