"""Which modules carry a maskable weight, and how their random weights are drawn."""
from __future__ import annotations

import fnmatch
import math
import sys
from typing import Iterable, Optional, Sequence

import torch
from torch import nn
from torch.nn.parameter import UninitializedParameter
from torch.nn.utils import parametrize

from timm_fslt.regen import rng

WEIGHT_INITS = ("kaiming_uniform", "kaiming_normal", "signed_kaiming_constant")
SCORE_INITS = ("kaiming_normal", "kaiming_uniform")

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def _is_pyg_linear(module: nn.Module) -> bool:
    if "torch_geometric" not in sys.modules:  # never import PyG just to look
        return False
    from torch_geometric.nn.dense.linear import Linear as PygLinear
    return isinstance(module, PygLinear)


def is_maskable(module: nn.Module) -> bool:
    """Convs (any dim, grouped, transposed, timm subclasses), linears (torch, timm, PyG)."""
    return isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) or _is_pyg_linear(module)


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORM_TYPES) or type(module).__name__.endswith(("Norm", "Norm1d", "Norm2d"))


def is_frozen_layer(module: nn.Module) -> bool:
    return parametrize.is_parametrized(module, "weight") and any(
        type(p).__name__ == "FrozenSupermask" for p in module.parametrizations["weight"])


def _matches(name: str, patterns: Optional[Sequence[str]]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns or ())


def find_maskable(model: nn.Module, include: Optional[Sequence[str]] = None,
                  exclude: Optional[Sequence[str]] = None) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every layer to mask, in registration order.

    ``include``/``exclude`` are fnmatch patterns on qualified module names
    (e.g. ``"layer4.*"``, ``"fc"``); ``include=None`` means every maskable layer.
    """
    out = []
    for name, module in model.named_modules():
        if not is_maskable(module):
            continue
        if include is not None and not _matches(name, include):
            continue
        if _matches(name, exclude):
            continue
        out.append((name, module))
    return out


def check_initialized(name: str, module: nn.Module) -> None:
    weight = module.weight
    if isinstance(weight, UninitializedParameter) or getattr(module, "in_channels", 0) == -1:
        raise ValueError(
            f"layer {name!r} ({type(module).__name__}) is lazy and not initialised yet; "
            "run one forward pass with example inputs before calling timm_fslt.freeze")


def fan_in(shape: Sequence[int]) -> int:
    """torch's fan-in of a weight of this shape (conv: in/groups * kernel, linear: in)."""
    if len(shape) < 2:
        return max(int(shape[0]), 1) if shape else 1
    return int(shape[1]) * math.prod(shape[2:])


_RELU_GAIN = math.sqrt(2.0)


def random_weight(kind: str, seed: int, name: str, shape: Sequence[int], device=None,
                  dtype=torch.float32, stream: str = "weight",
                  positions: Optional[torch.Tensor] = None,
                  generator_version: int = rng.GENERATOR_VERSION) -> torch.Tensor:
    """Regenerable initial values for one layer (weights or scores).

    kaiming_uniform: U(-b, b), b = sqrt(2) * sqrt(3 / fan_in)
    kaiming_normal:  N(0, 2 / fan_in)
    signed_kaiming_constant: +-sqrt(2) / sqrt(fan_in), the sign a fair coin

    ``positions`` (row-major element indices, e.g. of the free weights): only those
    values, 1-D, bit-identical to ``random_weight(...).reshape(-1)[positions]``.

    Version 2 (``rng`` docstring): an exact integer per element times one float64
    constant -- ``(2h + 1 - 2**32) * (b * 2**-32)``, ``(+-1) * std``,
    ``(+-Z) * (std * 2**-38)`` -- rounded to float32 and then, for 16-bit dtypes, to
    ``dtype`` (torch's float64 -> bfloat16/float16 conversion also goes through
    float32; doing it explicitly keeps that a property of this code).  Version 1
    computed the uniform and signed values in float64 steps that are exact except
    for the same final multiplication, so they are bit-identical; only its normal
    differs (``rng._normal_v1``).
    """
    rng.check_version(generator_version)
    n = math.prod(shape)
    std = _RELU_GAIN / math.sqrt(fan_in(shape))  # Python floats: IEEE, correctly rounded everywhere
    if kind not in WEIGHT_INITS:
        raise ValueError(f"init must be one of {WEIGHT_INITS}, got {kind!r}")
    # Each generator chunk is scaled in float64 and rounded to `dtype` (the same bits
    # as scaling the whole float64 tensor, without holding it).
    if generator_version == 1:
        if kind == "kaiming_uniform":
            bound = std * math.sqrt(3.0)
            values = rng.uniform(seed, name, stream, n, device, dtype=dtype, positions=positions,
                                 transform=lambda u: u.mul_(2.0).sub_(1.0).mul_(bound))
        elif kind == "kaiming_normal":
            values = rng.normal(seed, name, stream, n, device, dtype=dtype, positions=positions,
                                transform=lambda z: z.mul_(std), version=1)
        else:
            values = rng.bits(seed, name, stream, n, device, dtype=dtype, positions=positions,
                              transform=lambda h: (h >> 31).to(torch.float64).mul_(2.0).sub_(1.0).mul_(std))
        return values if positions is not None else values.view(tuple(shape))
    if kind == "kaiming_uniform":
        factor = std * math.sqrt(3.0) * 2.0 ** -32  # the bound, times an exact power of two

        def integer(h):  # 2h + 1 - 2**32: odd, |.| < 2**32
            return h.mul_(2).add_(1 - (1 << 32))
    elif kind == "kaiming_normal":
        factor = std * 2.0 ** -rng.NORMAL_FRAC
        integer = rng._normal_fixed
    else:
        factor = std

        def integer(h):  # bit 31: 1 -> +1, 0 -> -1
            return (h >> 31).mul_(2).sub_(1)
    wide = dtype in (torch.float64, torch.float32)

    def value(h):
        out = integer(h).to(torch.float64).mul_(factor)  # exact conversion, ONE rounding
        return out if wide else out.to(torch.float32)  # then float32 -> dtype when stored
    values = rng.bits(seed, name, stream, n, device, dtype=dtype, positions=positions, transform=value)
    return values if positions is not None else values.view(tuple(shape))


def weight_shape(module: nn.Module) -> tuple[int, ...]:
    return tuple(module.weight.shape)


def iter_frozen(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if is_frozen_layer(module):
            yield name, module


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the name a ticket records)."""
    return str(dtype).replace("torch.", "")


def frozen_weight_dtypes(model: nn.Module) -> dict:
    """``{id(FrozenSupermask): dtype of the random weight W}`` for every frozen layer."""
    out = {}
    for _, module in iter_frozen(model):
        dtype = module.parametrizations["weight"].original.dtype
        for p in module.parametrizations["weight"]:
            out[id(p)] = dtype
    return out


def cast_to_recorded_dtypes(model: nn.Module, rows) -> None:
    """Give a rebuilt model's masked layers the weight dtypes a ticket recorded (``rows``:
    config.json "layers"; rows without "dtype", from older tickets, are float32).

    The weights are regenerated at the layer's dtype, so a bfloat16 ticket must be rebuilt
    in bfloat16.  If every layer has the same recorded dtype, the whole model is cast (as
    ``model.to(torch.bfloat16)`` made it); otherwise the named layers only.  Raises
    ValueError for a dtype name that is not a torch floating dtype.
    """
    wanted = {row["name"]: row["dtype"] for row in rows if isinstance(row.get("dtype"), str)}
    if not wanted:
        return
    dtypes = {name: getattr(torch, d, None) for name, d in wanted.items()}
    bad = sorted({wanted[n] for n, d in dtypes.items() if not (isinstance(d, torch.dtype) and d.is_floating_point)})
    if bad:
        raise ValueError(f"the ticket records layer dtypes that are not torch floating dtypes: {bad}")
    modules = dict(model.named_modules())
    distinct = set(dtypes.values())
    if len(distinct) == 1:
        dtype = distinct.pop()
        if any(getattr(modules.get(n), "weight", None) is not None and modules[n].weight.dtype != dtype
               for n in wanted):
            model.to(dtype)
        return
    for name, dtype in dtypes.items():
        if name in modules:
            modules[name].to(dtype)
