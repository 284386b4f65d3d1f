"""Where a layer's free weights are: the cached index every refresh and backward reads."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from timm_fslt.regen import pattern as freezing


def _free_shapes(n_free: int) -> tuple:
    """The shapes a layer's scores may have: the row ``(1, n_free)`` (what FrozenSupermask makes)
    or 1-D ``(n_free,)`` (timm_fslt 0.2's, or a tensor put in place by other code)."""
    return ((1, n_free), (n_free,))


def free_entries(weight_shaped: torch.Tensor, frozen: torch.Tensor) -> torch.Tensor:
    """The entries of a weight-shaped tensor at the free positions of ``frozen``, row-major."""
    return weight_shaped.reshape(-1)[frozen.reshape(-1).to(weight_shaped.device) == freezing.FREE]


class _FreeIndex(NamedTuple):
    """What a refresh needs to know about one layer's frozen code (cached)."""

    frozen: torch.Tensor  # the code this was computed from (identity = validity)
    version: int  # its version counter then
    index: Optional[torch.Tensor]  # int32 flat (row-major) positions of the free weights; None: all free
    n_free: int
    n_locked: int


def _free_index_of(frozen: torch.Tensor, positions: torch.Tensor, n_locked: Optional[int] = None) -> _FreeIndex:
    """The ``_FreeIndex`` of a frozen code whose free entries are at the row-major ``positions``
    (and which has ``n_locked`` locked entries: counted if None)."""
    numel, n_free = frozen.numel(), positions.numel()
    # int32 (layers have < 2**31 weights): half the memory of int64 indices
    index = None if n_free == numel else positions.to(device=frozen.device, dtype=torch.int32)
    if n_locked is None:  # (the code is -1, 0 or +1: its sum is locked - pruned, pruned + locked = numel - n_free)
        n_locked = (int(frozen.sum(dtype=torch.int64)) + numel - n_free) // 2
    return _FreeIndex(frozen, frozen._version, index, n_free, n_locked)
