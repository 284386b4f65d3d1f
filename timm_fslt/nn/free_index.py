"""Where a layer's free weights are: the cached index every refresh and backward reads."""
from __future__ import annotations

import math
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


def weight_shaped(scores: torch.Tensor, frozen: torch.Tensor, index: Optional[torch.Tensor], fill: float) -> torch.Tensor:
    """One value per free weight (``index``: their positions, None: all) put in ``frozen``'s shape,
    ``fill`` elsewhere (a new tensor)."""
    out = torch.full(tuple(frozen.shape), fill, dtype=scores.dtype, device=scores.device)
    flat, scores = out.view(-1), scores.reshape(-1)
    if index is None:
        flat.copy_(scores)
    else:
        flat.index_copy_(0, index.to(device=out.device, dtype=torch.int64), scores)
    return out


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


def legacy_scores(state_dict: dict, key: str, frozen, shape: tuple) -> None:
    """In place: older scores at ``state_dict[key]`` put in the ``shape`` of today's ``(1, n_free)`` row:
    (a) from before scores were stored for the free weights only, in the weight's shape: their free
    entries; (b) timm_fslt 0.2's 1-D free scores: the same values as the row.  Nothing is lost either
    way; any other shape is left for torch's size-mismatch message."""
    scores = state_dict.get(key)
    if isinstance(scores, torch.Tensor) and isinstance(frozen, torch.Tensor) and scores.shape != shape:
        n_free = int((frozen == freezing.FREE).sum())
        if tuple(scores.shape) == tuple(frozen.shape) and tuple(scores.shape) not in _free_shapes(n_free):
            scores = free_entries(scores, frozen)
        if tuple(scores.shape) in _free_shapes(n_free) or scores.dim() == 1:
            # (a 1-D tensor of another size as a row too: torch then names both sizes)
            state_dict[key] = scores.reshape(shape if scores.numel() == math.prod(shape) else (1, -1))


# What a layer keeps between steps only to save work (never copied or pickled with it)
STEP_CACHES = ("_free_weight", "_long_index", "_product", "_product_of", "_selected", "level", "_redrawn")


def frozen_positions_written(layer, free: "_FreeIndex") -> None:
    """Write ``layer.mask``'s pruned and locked positions (the locked weights) unless the last mask
    write (``layer._mask_ready``) is still there: they only change with the frozen code (or if someone
    wrote the mask), so this runs once, not every step; a refresh then writes the free positions."""
    mask, ready = layer.mask, layer._mask_ready
    if ready is None or ready[0] is not mask or ready[1] != mask._version or ready[2] is not free:
        torch.eq(layer.frozen, freezing.LOCKED, out=mask)


def cached_free_values(layer, weight: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``weight``'s entries at the free positions ``index`` (row-major), kept on ``layer`` until the
    weight, its version or the index changes: the backward multiplies by them every step."""
    cached = layer.__dict__.get("_free_weight")
    if cached is None or cached[0] is not weight or cached[1] != weight._version or cached[2] is not index:
        values = weight.detach().contiguous().view(-1).index_select(0, index)
        cached = layer.__dict__["_free_weight"] = (weight, weight._version, index, values)
    return cached[3]


def moved_caches(layer, fn, frozen, mask, free: Optional[_FreeIndex], ready: Optional[tuple], current: bool) -> None:
    """After ``layer._apply(fn)``: its free index (``fn`` applied, if it was valid and stays an int32
    tensor of its shape), its record of the written mask and of its last refresh, carried over to the
    new tensors; the step caches dropped (the weight is not the layer's own: it moves next)."""
    for name in STEP_CACHES:
        layer.__dict__.pop(name, None)
    if free is None or free.frozen is not frozen or free.version != frozen._version or layer.frozen is frozen:
        return
    index = None if free.index is None else fn(free.index)
    if index is not None and (not isinstance(index, torch.Tensor) or index.dtype != torch.int32
                              or index.shape != free.index.shape):
        return
    new = layer._free = _FreeIndex(layer.frozen, layer.frozen._version, index, free.n_free, free.n_locked)
    if ready is not None and ready[0] is mask and ready[1] == mask._version and ready[2] is free:
        layer._mask_ready = (layer.mask, layer.mask._version, new)
    if current:
        layer.__dict__.update(_seen_version=layer.scores._version, _seen_scores=layer.scores)


def long_index(layer, index: torch.Tensor, device) -> torch.Tensor:
    """``index`` as int64 on ``device``, for ``index_copy_``: converted every step on the CPU (where
    that is faster than ``index_put_`` with the int32 index, and costs no memory), kept on the layer
    (8 bytes per free weight) on other devices, where a conversion is one more kernel per step."""
    if torch.device(device).type == "cpu":
        return index.to(device=device, dtype=torch.int64)
    cached = layer.__dict__.get("_long_index")
    if cached is None or cached[0] is not index or cached[1].device != torch.device(device):
        cached = layer.__dict__["_long_index"] = (index, index.to(device=device, dtype=torch.int64))
    return cached[1]


def write_magnitudes(layer, out: torch.Tensor, free: _FreeIndex) -> None:
    """Write ``layer``'s free scores' magnitudes into the 1-D float32 ``out``."""
    scores = layer.scores.detach()
    if tuple(scores.shape) not in _free_shapes(free.n_free):
        raise RuntimeError(
            f"layer {layer.layer_name!r}: scores has shape {tuple(scores.shape)} but the frozen code has "
            f"{free.n_free} free weights; scores holds one entry per free weight (shape (1, n_free), "
            "row-major order). Replace scores and frozen together (or use timm_fslt's torch-pruning pruners)")
    scores = scores.reshape(-1)
    if scores.dtype == out.dtype and scores.device == out.device and scores.is_contiguous():
        torch.abs(scores, out=out)
    else:
        out.copy_(scores).abs_()
