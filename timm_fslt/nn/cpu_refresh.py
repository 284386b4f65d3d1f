"""A ``SupermaskGroup``'s refresh on the CPU through the compiled two-pass selection
(``regen/cpu_select.py``): the same masks, scales and bookkeeping as the generic path of
``SupermaskGroup.refresh``, without its per-layer buffers and copies.

It applies when every layer's scores are contiguous float32 CPU tensors with one entry per free
weight, its mask is a contiguous CPU tensor, its free index is int32 (some weights are frozen),
the group is not asked to run sync-free, ``SupermaskGroup.compiled_refresh`` is not False and the
compiled kernels are on (``regen/native.py``); otherwise the generic path runs.  Where a layer's
kept product ``W * mask * scale`` (``nn/functional.py`` ``kept_product``) is current and nothing holds
it, the mask write also rewrites the product where a bit changes, so the next forward need not
compute it again.  Each layer keeps its selected bits in free order (``_selected``: one byte per free
weight), so that a refresh writes the mask where a bit changes only.
"""
from __future__ import annotations

import torch

from timm_fslt.nn.free_index import frozen_positions_written
from timm_fslt.nn.functional import product_to_update, product_updated
from timm_fslt.nn.sync_free import nonfinite_error
from timm_fslt.regen import cpu_select, native


def _applies(group, layers: list, frees: list) -> bool:
    if group.sync_free or group.compiled_refresh is False or not layers or native.kernels() is None:
        return False
    for layer, free in zip(layers, frees):
        scores, mask, index = layer.scores, layer.mask, free.index
        if (index is None or index.dtype != torch.int32 or scores.dtype != torch.float32
                or scores.device.type != "cpu" or mask.device.type != "cpu" or not scores.is_contiguous()
                or not mask.is_contiguous() or scores.numel() != free.n_free or index.device.type != "cpu"):
            return False
    return True


def _selected(layer, free):
    """(the layer's selected bits in free order as a uint8 array, whether they are the mask's now)."""
    made, mask = layer.__dict__.get("_selected"), layer.mask
    current = made is not None and made[1] is mask and made[2] == mask._version and made[0].numel() == free.n_free
    if not current:
        made = layer.__dict__["_selected"] = (torch.empty(free.n_free, dtype=torch.uint8), mask, -1)
    return made[0].numpy(), current


@torch.no_grad()
def refresh(group, layers: list, frees: list, counts: list):
    """Select and write every mask; returns the kept free weights per layer, None if the compiled
    path does not apply, or raises the group's non-finite error (nothing written)."""
    if not _applies(group, layers, frees):
        return None
    for layer, free in zip(layers, frees):
        frozen_positions_written(layer, free)
    n = len(layers)
    segments = [(0, n, counts[0])] if group.scope == "global" else [(i, i + 1, c) for i, c in enumerate(counts)]
    arrays, updated = [], []
    for layer, free in zip(layers, frees):
        product = product_to_update(layer, layer.mask)  # (the kept product, if it follows the mask)
        updated.append(product is not None)
        if product is not None:
            weight, out, scale = product
            product = (weight.view(-1).numpy(), out.view(-1).numpy(), scale)
        arrays.append((layer.scores.detach().view(-1).view(torch.int32).numpy(),
                       layer.mask.view(-1).view(torch.uint8).numpy(), free.index.numpy(), product,
                       _selected(layer, free)))
    kept = cpu_select.select_and_write(arrays, segments, group.band_state, group.check_finite)
    if kept is None:
        raise nonfinite_error(layers)
    for layer, free, product in zip(layers, frees, updated):
        mask = layer.mask
        torch.autograd.graph.increment_version(mask)  # (written through NumPy: as an in-place op would)
        layer._mask_ready = (mask, mask._version, free)
        layer.__dict__["_selected"] = layer.__dict__["_selected"][:2] + (mask._version,)
        if product:
            product_updated(layer, mask)
    return kept
