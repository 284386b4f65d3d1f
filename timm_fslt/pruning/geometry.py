"""Where a layer keeps its channels: the shape facts the pruners and ``compact`` share.

No torch-pruning here: these read a module's class, groups and transposition only.
"""
from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize

__all__ = ["channel_attrs", "is_conv", "is_depthwise", "is_grouped", "plain_class", "weight_dims"]


def plain_class(module: nn.Module) -> type:
    """The class a parametrized layer had before freezing (``Conv2d`` for ``ParametrizedConv2d``)."""
    cls = type(module)
    if parametrize.is_parametrized(module):
        return cls.__bases__[0]
    return cls


def is_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd)


def channel_attrs(module: nn.Module) -> tuple[str, str]:
    """Names of the (in, out) channel attributes of a conv / torch Linear / PyG Linear."""
    if isinstance(module, nn.Linear):
        return "in_features", "out_features"
    return "in_channels", "out_channels"


def weight_dims(module: nn.Module) -> tuple[int, int]:
    """Weight dims holding the (out, in) channels: transposed convs store (in, out, ...)."""
    if is_conv(module) and module.transposed:
        return 1, 0
    return 0, 1


def is_depthwise(module: nn.Module) -> bool:
    return (is_conv(module) and module.groups > 1
            and module.groups == module.in_channels == module.out_channels)


def is_grouped(module: nn.Module) -> bool:
    return is_conv(module) and module.groups > 1 and not is_depthwise(module)
