"""The structure record: which channels of the original layers a pruned frozen model keeps.

``StructureRecorder`` writes ``model.fslt_structure`` while the pruners cut;
``check_structure`` and ``removed_indices`` read one back (a ticket's ``structure``
field), for ``timm_fslt.pruning.restore.restore_structure``.
"""
from __future__ import annotations

import json
import weakref
from typing import Any

from torch import nn

from timm_fslt.pruning.geometry import plain_class

__all__ = ["StructureRecorder", "check_structure", "removed_indices"]


class StructureRecorder:
    """Keeps ``model.fslt_structure`` current while modules of ``model`` are sliced.

    ``model.fslt_structure`` maps a module's qualified name to a JSON-ready entry:

    * frozen layer: ``{"type": "Conv2d", "frozen": true, "source_shape": [...],
      "kept": {"<weight dim>": [original indices]}, "removed_numel": n, "removed_kept": k}``
      -- every remaining weight sits at these coordinates of the original layer,
      which is where the seed regenerates it; the two counters are the sparsity
      budget kept by ``timm_fslt.compact``.
    * any other sliced module (BatchNorm, an unfrozen conv, ...):
      ``{"type": "BatchNorm2d", "frozen": false, "source_channels": {"out": n},
      "kept": {"out": [...]}}``, with axis "out"/"in" as torch-pruning's
      ``prune_out_channels``/``prune_in_channels`` see it (one axis "out" for
      modules whose two are the same, like BatchNorm).

    Absent or empty means full size.  Indices compose over repeated pruning.
    """

    def __init__(self, model: nn.Module):
        self._model = weakref.ref(model)

    @property
    def model(self) -> nn.Module:
        model = self._model()
        if model is None:
            raise RuntimeError("the model these pruners were built for no longer exists")
        return model

    def name_of(self, module: nn.Module) -> str:
        for name, candidate in self.model.named_modules():
            if candidate is module:
                return name
        raise ValueError(
            f"{type(module).__name__} is not a module of the model these pruners were built for "
            "(timm_fslt.pruning.torch_pruning.pruners(model)); its cut could not be recorded, "
            "so the ticket could not be regenerated")

    def structure(self) -> dict:
        model = self.model
        structure = getattr(model, "fslt_structure", None)
        if structure is None:
            structure = {}
            model.fslt_structure = structure
        return structure

    @staticmethod
    def _compose(kept: dict, key: str, size: int, keep: list[int]) -> None:
        previous = kept.get(key)
        if previous is None:
            previous = list(range(size))
        kept[key] = [previous[i] for i in keep]

    def record_frozen(self, module: nn.Module, name: str, dim: int, keep: list[int]) -> None:
        supermask = module.parametrizations.weight[0]
        entry = self.structure().setdefault(name, {
            "type": plain_class(module).__name__, "frozen": True,
            "source_shape": list(supermask.frozen.shape), "kept": {},
            "removed_numel": 0, "removed_kept": 0})
        self._compose(entry["kept"], str(dim), supermask.frozen.shape[dim], keep)

    def record_budget(self, name: str, supermask) -> None:
        entry = self.structure()[name]
        entry["removed_numel"] = int(supermask.removed_numel)
        entry["removed_kept"] = int(supermask.removed_kept)

    def record_channels(self, module: nn.Module, name: str, axis: str, keep: list[int],
                        size: int) -> None:
        entry = self.structure().setdefault(name, {
            "type": type(module).__name__, "frozen": False, "source_channels": {}, "kept": {}})
        entry["source_channels"].setdefault(axis, size)
        self._compose(entry["kept"], axis, size, keep)


def check_structure(structure: Any) -> dict:
    """``structure`` as plain JSON data, each entry checked to have the fields its kind needs."""
    if not isinstance(structure, dict):
        raise ValueError(f"structure must be a dict (model.fslt_structure), got {type(structure).__name__}")
    try:
        normal = json.loads(json.dumps(structure))
    except (TypeError, ValueError) as err:
        raise ValueError(f"structure must be JSON-serialisable: {err}") from None
    for name, entry in normal.items():
        if not isinstance(entry, dict) or "kept" not in entry or "type" not in entry \
                or not isinstance(entry["kept"], dict):
            raise ValueError(f"structure entry {name!r} must be a dict with 'type' and 'kept', got {entry!r:.80}")
        if entry.get("frozen") and "source_shape" not in entry:
            raise ValueError(f"structure entry {name!r} of a frozen layer lacks 'source_shape'")
        if not entry.get("frozen") and "source_channels" not in entry:
            raise ValueError(f"structure entry {name!r} lacks 'source_channels'")
    return normal


def removed_indices(kept: Any, size: int, where: str) -> list[int]:
    """The indices in ``range(size)`` a recorded ``kept`` list leaves out (checked: increasing, in range)."""
    if not isinstance(kept, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in kept):
        raise ValueError(f"{where}: kept indices must be a list of ints")
    if any(b <= a for a, b in zip(kept, kept[1:])) or (kept and not (0 <= kept[0] and kept[-1] < size)):
        raise ValueError(f"{where}: kept indices must be increasing and lie in [0, {size})")
    if not kept:
        raise ValueError(f"{where}: at least one channel must be kept")
    present = set(kept)
    return [i for i in range(size) if i not in present]
