"""What timm_fslt sees in a model's modules: which carry a maskable weight (and are
initialised), which are already frozen, which are norms, and the dtypes of the frozen
layers' random weights.  How those weights are drawn is ``timm_fslt.regen.init``."""
from __future__ import annotations

import fnmatch
import sys
from typing import Iterable, Optional, Sequence

import torch
from torch import nn
from torch.nn.parameter import UninitializedParameter
from torch.nn.utils import parametrize

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def is_pyg_linear(module: nn.Module) -> bool:
    """Whether ``module`` is PyG's ``Linear`` (False without importing PyG when it is not loaded)."""
    if "torch_geometric" not in sys.modules:  # never import PyG just to look
        return False
    # (imported here: torch_geometric is an optional, heavy dependency)
    from torch_geometric.nn.dense.linear import Linear as PygLinear
    return isinstance(module, PygLinear)


def is_maskable(module: nn.Module) -> bool:
    """Convs (any dim, grouped, transposed, timm subclasses), linears (torch, timm, PyG)."""
    return isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) or is_pyg_linear(module)


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORM_TYPES) or type(module).__name__.endswith(("Norm", "Norm1d", "Norm2d"))


def is_frozen_layer(module: nn.Module) -> bool:
    """Whether any of ``module``'s tensors carries a ``FrozenSupermask`` (usually its ``weight``)."""
    if not parametrize.is_parametrized(module):
        return False
    return any(type(p).__name__ == "FrozenSupermask"
               for plist in module.parametrizations.values() for p in plist)


def has_frozen_weight(module: nn.Module) -> bool:
    """Whether ``module`` is a conv or linear layer whose ``weight`` is masked (what the
    torch-pruning integration cuts; a module with only other masked tensors, e.g. an LSTM
    or a GAT conv's attention vectors, is not one)."""
    return is_maskable(module) and parametrize.is_parametrized(module, "weight") and any(
        type(p).__name__ == "FrozenSupermask" for p in module.parametrizations["weight"])


def iter_sites(model: nn.Module):
    """(key, module, parameter name, supermask) of every masked tensor, in the group's order of
    registration (the key is the supermask's ``layer_name``: the module's name for a ``weight``)."""
    for _, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for pname, plist in module.parametrizations.items():
            for p in plist:
                if type(p).__name__ == "FrozenSupermask":
                    yield p.layer_name, module, pname, p


# Counts every module and parameter registration in the process (torch's global hooks): a
# frozen model walks its modules again only when this moved since its last forward, to
# notice a layer added after freeze (e.g. timm's reset_classifier).
_registrations = 0


def _count_registration(*args):
    global _registrations
    _registrations += 1


nn.modules.module.register_module_module_registration_hook(_count_registration)
nn.modules.module.register_module_parameter_registration_hook(_count_registration)


def module_registrations() -> int:
    return _registrations


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
    for _, module, pname, supermask in iter_sites(model):
        out[id(supermask)] = module.parametrizations[pname].original.dtype
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
