"""``materialize``: the ticket as an ordinary model, for deployment and export."""
from __future__ import annotations

import copy

import torch
from torch import nn

from timm_fslt.frozen import get_group, remove_group
from timm_fslt.nn.modules import is_frozen_layer


def _unparametrize(module: nn.Module) -> None:
    """Replace every parametrized tensor by a plain Parameter holding its current value.

    ``parametrize.remove_parametrizations`` deletes the property from the module's
    class, and a deep copy shares that dynamically created class with the original
    model, so it would break the original. Swapping the class back is local.
    """
    values = {name: getattr(module, name).detach().clone() for name in module.parametrizations}
    module.__class__ = module.__class__.__bases__[0]
    del module._modules["parametrizations"]
    for name, value in values.items():
        module._buffers.pop(name, None)
        # requires_grad=False as in the frozen model's no-grad forward: a parameter that requires
        # grad sends some kernels (broadcast matmuls) down another path even under no_grad
        setattr(module, name, nn.Parameter(value, requires_grad=False))


def _graph_tensors(model: nn.Module) -> dict:
    """``copy.deepcopy`` memo entries for tensors a module keeps from its last forward that are
    still attached to the autograd graph (e.g. PyG's ``SuperGATConv.att_x``): copied detached."""
    memo = {}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                memo[id(value)] = value.detach().clone()
    return memo


def materialize(model: nn.Module) -> nn.Module:
    """A plain copy of a frozen model whose masked tensors are ``W * mask * scale``.

    The copy has the original module classes (timm, torch or PyG) with ordinary
    parameters and no hooks; its outputs are bit-identical to the frozen model's in
    eval mode, so it can be saved, scripted (torch.jit.script, which refuses the frozen
    model) or exported (ONNX, torch.export: the frozen model exports too, but its graph
    keeps the random weight and the mask apart and multiplies them).  Its parameters
    do not require grad (as in the frozen model's forward, except those the freeze
    config trains); call ``plain.requires_grad_(True)`` to fine-tune it.  The frozen
    model itself is left untouched.
    """
    get_group(model).refresh()
    plain = copy.deepcopy(model, _graph_tensors(model))
    with torch.no_grad():
        for _, module in list(plain.named_modules()):
            if is_frozen_layer(module):
                _unparametrize(module)
    for module in plain.modules():
        module.__dict__.pop("_fslt_fates", None)
    remove_group(plain)
    return plain
