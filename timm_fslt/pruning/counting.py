"""What a frozen network costs: torch-pruning's MAC and parameter counter, taught frozen layers.

torch-pruning matches counting hooks by exact type (a frozen layer is a
``Parametrized<Class>`` of its own) and forgets custom hooks after every call, so
the hooks for frozen layers and PyG ``Linear`` are built from the model and set
per call.
"""
from __future__ import annotations

from torch import nn
from torch_pruning.utils import op_counter as tp_op_counter

from timm_fslt.nn.modules import has_frozen_weight, is_pyg_linear
from timm_fslt.nn.supermask import FrozenSupermask
from timm_fslt.pruning.geometry import is_conv

__all__ = ["count_ops_and_params", "op_counting_hooks"]


def op_counting_hooks(model: nn.Module) -> dict:
    """torch-pruning counting hooks for the frozen layers and PyG Linears of ``model``, by exact type."""
    hooks = {}
    for module in model.modules():
        if has_frozen_weight(module) or is_pyg_linear(module):
            hooks[type(module)] = (tp_op_counter.conv_flops_counter_hook if is_conv(module)
                                   else tp_op_counter.linear_flops_counter_hook)
    return hooks


def count_ops_and_params(model: nn.Module, example_inputs, layer_wise: bool = False):
    """``tp.utils.count_ops_and_params`` that also counts frozen layers (and PyG Linears).

    MACs and parameters of a frozen layer are those of the same dense plain layer
    (what ``timm_fslt.materialize`` gives; the mask is not exploited): its weight
    counts, not its scores, which exist for the free weights only.
    torch-pruning forgets custom hooks after every call, so they are set per call.
    """
    tp_op_counter.CUSTOM_MODULES_MAPPING = {**tp_op_counter.CUSTOM_MODULES_MAPPING,
                                            **op_counting_hooks(model)}
    result = tp_op_counter.count_ops_and_params(model, example_inputs, layer_wise=layer_wise)

    def unscored(module: nn.Module) -> int:  # weights of frozen layers in module without a score
        return sum(m.frozen.numel() - m.scores.numel() for m in module.modules()
                   if isinstance(m, FrozenSupermask))

    if not layer_wise:
        macs, params = result
        return macs, params + unscored(model)
    macs, params, layer_macs, layer_params = result
    layer_params = {m: (None if n is None else n + unscored(m)) for m, n in layer_params.items()}
    return macs, params + unscored(model), layer_macs, layer_params
