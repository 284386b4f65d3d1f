"""Test-side counterparts of ``timm_fslt.regen``: the obvious computations the fast
library paths are checked against, and decoders only the tests need.

* ``order_keys`` / ``topk_mask``: top-k of any 1-D tensor through the library's
  ``keys_topk_mask`` (the library itself only selects score magnitudes);
  ``reference_topk_mask``: the same selection by a full stable sort.
* ``code_from_keys``: a layer's freezing code from its two thresholds, elementwise
  (what a chip streams; ``pattern.freeze_keys`` documents the rule).
* ``normal_fixed_stream``: version 2's integer normals ``+-Z`` of one stream.
"""
import math
from typing import Optional, Sequence

import torch

from timm_fslt.regen import pattern as freezing, rng
from timm_fslt.regen.topk import keys_topk_mask

_MAG_MASK = {torch.int32: 0x7FFFFFFF, torch.int64: 0x7FFFFFFFFFFFFFFF}
_INF_KEY = {torch.int32: 0x7F800000, torch.int64: 0x7FF0000000000000}


def order_keys(values: torch.Tensor) -> torch.Tensor:
    """Integer keys ordered like ``torch.sort`` orders ``values`` (integers pass through).

    Floats: ``key = +bits`` for positive, ``-magnitude bits`` for negative numbers,
    so ``-0.0`` and ``+0.0`` share key 0; every NaN gets the same key above ``+inf``.
    """
    if not values.is_floating_point():
        return values if values.dtype in (torch.int32, torch.int64) else values.to(torch.int64)
    if values.dtype != torch.float64:
        values = values.to(torch.float32)
    int_dtype = torch.int32 if values.dtype == torch.float32 else torch.int64
    raw = values.view(int_dtype)
    mag = raw & _MAG_MASK[int_dtype]
    nan = mag > _INF_KEY[int_dtype]
    key = torch.where(raw < 0, -mag, mag)
    return key.masked_fill_(nan, _INF_KEY[int_dtype] + 1)


def topk_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` largest entries of a 1-D tensor (ties: lower index wins)."""
    if values.dim() != 1:
        raise ValueError(f"values must be 1-D, got shape {tuple(values.shape)}")
    return keys_topk_mask(order_keys(values), k)


def reference_topk_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """The same selection by a full stable sort."""
    n = values.numel()
    out = torch.zeros(n, dtype=torch.bool, device=values.device)
    if k > 0:
        order = torch.sort(values, descending=True, stable=True).indices
        out[order[:min(k, n)]] = True
    return out


def code_from_keys(seed: int, name: str, shape: Sequence[int], t1: int, t2: int, device=None) -> torch.Tensor:
    """The ternary int8 code from the two thresholds, elementwise (what a chip streams)."""
    n = math.prod(shape)
    if not 0 <= t1 <= t2 <= freezing.KEY_SENTINEL_ALL:
        raise ValueError(f"layer {name!r}: freeze keys must satisfy 0 <= t1 <= t2 < 2**64, got {t1}, {t2}")
    h = rng.bits(seed, name, "freeze", n, device)
    index = torch.arange(n, dtype=torch.int64, device=h.device)

    def below(t: int) -> torch.Tensor:  # key < t, i.e. (h, i) < (t >> 32, t & (2**32 - 1)), in int64
        th, tl = t >> 32, t & 0xFFFFFFFF
        return (h < th) | ((h == th) & (index < tl))

    code = torch.zeros(n, dtype=torch.int8, device=h.device)
    code.masked_fill_(below(t2), freezing.LOCKED)
    code.masked_fill_(below(t1), freezing.PRUNED)
    return code.view(tuple(shape))


def normal_fixed_stream(seed: int, name: str, stream: str, numel: int, device=None, *,
                        positions: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Version 2's integer normals ``+-Z`` (int64; the value is ``Z * 2**-rng.NORMAL_FRAC``)."""
    return rng.bits(seed, name, stream, numel, device, positions=positions, transform=rng.normal_fixed)
