"""Re-applying a structure record to a freshly frozen full-size model.

This is how a pruned or compacted ticket is regenerated from its seed: the model is
built and frozen at full size, then every recorded cut is made again with the same
pruners (``timm_fslt.pruning.pruners``), so each kept weight is regenerated at its
original coordinates.  It sits above the pruners (it runs them), which is why it is
not in ``timm_fslt.pruning.record`` (the pruners write the record).
"""
from __future__ import annotations

import copy
import json
from typing import Optional

from torch import nn

from timm_fslt.frozen import get_group
from timm_fslt.pruning.geometry import plain_class, weight_dims
from timm_fslt.pruning.pruners import (FrozenDepthwiseConvPruner, FrozenLayerPruner, RecordedCoupledPruner,
                                       RecordedPruner, pruners)
from timm_fslt.pruning.record import check_structure, removed_indices

__all__ = ["restore_structure"]


def _plan_frozen(name: str, entry: dict, module: nn.Module, pruner) -> list:
    if not isinstance(pruner, FrozenLayerPruner):
        raise ValueError(f"structure entry {name!r} is a frozen layer but the model's {name!r} "
                         "is not frozen (different freeze include/exclude?)")
    shape = list(module.parametrizations.weight[0].frozen.shape)
    if shape != entry["source_shape"]:
        raise ValueError(f"layer {name!r} has weight shape {shape}, the structure was recorded on "
                         f"{entry['source_shape']}: rebuild the model with the same architecture")
    out_dim, in_dim = weight_dims(module)
    plans = []
    for dim_key, kept in entry["kept"].items():
        dim = int(dim_key)
        if dim not in (out_dim, in_dim) or (isinstance(pruner, FrozenDepthwiseConvPruner)
                                            and dim != out_dim):
            raise ValueError(f"structure entry {name!r}: weight dim {dim} holds no channels")
        fn = pruner.prune_out_channels if dim == out_dim else pruner.prune_in_channels
        plans.append((fn, module, removed_indices(kept, shape[dim], f"structure entry {name!r} dim {dim}"),
                      name, dim_key))
    for counter in ("removed_numel", "removed_kept"):
        value = entry.get(counter, 0)
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"structure entry {name!r}: {counter} must be a non-negative int")
    return plans


def _plan_channels(name: str, entry: dict, module: nn.Module, pruner) -> list:
    if not isinstance(pruner, RecordedPruner):
        raise ValueError(f"structure entry {name!r} ({entry['type']}) cannot be cut in this model")
    plans = []
    for axis, kept in entry["kept"].items():
        if axis not in ("out", "in") or (axis == "in" and isinstance(pruner, RecordedCoupledPruner)):
            raise ValueError(f"structure entry {name!r}: unknown channel axis {axis!r}")
        size = pruner.get_out_channels(module) if axis == "out" else pruner.get_in_channels(module)
        if size != entry["source_channels"].get(axis):
            raise ValueError(f"module {name!r} has {size} {axis}put channels, the structure was "
                             f"recorded on {entry['source_channels'].get(axis)}")
        fn = pruner.prune_out_channels if axis == "out" else pruner.prune_in_channels
        plans.append((fn, module, removed_indices(kept, size, f"structure entry {name!r} {axis}"),
                      name, axis))
    return plans


def _plan(model: nn.Module, normal: dict) -> list:
    """Every cut of ``normal`` as (pruning fn, module, removed indices, name, key), all checked."""
    pruner_of = pruners(model)
    modules = dict(model.named_modules())
    plans = []
    for name, entry in normal.items():
        module = modules.get(name)
        if module is None or name == "":
            raise ValueError(f"structure names module {name!r}, which this model does not have "
                             "(different architecture?)")
        pruner = pruner_of.get(type(module))
        kind = plain_class(module).__name__
        if kind != entry["type"]:
            raise ValueError(f"structure entry {name!r} is a {entry['type']}, the model has a {kind}")
        plan_entry = _plan_frozen if entry.get("frozen") else _plan_channels
        plans += plan_entry(name, entry, module, pruner)
    return plans


def restore_structure(model: nn.Module, structure: Optional[dict]) -> nn.Module:
    """Re-apply recorded channel removals to a freshly frozen full-size model (in place).

    ``model`` must be built and frozen exactly as the model the structure was
    recorded on (same architecture, same ``FreezeConfig``), so every kept weight is
    regenerated from the seed at its original coordinates.  Afterwards the model
    has the same shapes, random weights, frozen codes, sparsity budget and
    ``fslt_structure`` as the recorded one; its masks follow once its scores (or the
    ticket's mask bits) are loaded.  ``None`` or ``{}`` leaves the model full size.
    """
    group = get_group(model)  # ValueError if the model is not frozen
    if structure is None or (isinstance(structure, dict) and not structure):
        return model
    normal = check_structure(structure)
    if getattr(model, "fslt_structure", None):
        raise ValueError("model already has channels removed (model.fslt_structure is set); "
                         "restore_structure needs a freshly frozen full-size model")
    plans = _plan(model, normal)  # validate everything first, so a bad structure leaves the model unchanged

    expected = copy.deepcopy(normal)
    for fn, module, removed, name, key in plans:
        if removed:
            fn(module, removed)
        else:  # a full index list is no cut at all
            del expected[name]["kept"][key]
    expected = {name: entry for name, entry in expected.items() if entry["kept"]}
    by_name = {name: m for name, m in model.named_modules()}
    for name, entry in expected.items():
        if entry.get("frozen"):
            supermask = by_name[name].parametrizations.weight[0]
            supermask.removed_numel = entry.get("removed_numel", 0)
            supermask.removed_kept = entry.get("removed_kept", 0)
            model.fslt_structure[name]["removed_numel"] = supermask.removed_numel
            model.fslt_structure[name]["removed_kept"] = supermask.removed_kept
    group.refresh(force=True)
    if json.loads(json.dumps(getattr(model, "fslt_structure", None) or {})) != expected:
        raise RuntimeError("internal error: the restored structure differs from the recorded one")
    return model
