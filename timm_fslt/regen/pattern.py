"""How many weights of each layer are pruned or locked, and which ones.

The per-layer counts follow the reference implementation's rule: a layer-wise
density distribution (``epl``, ``erk`` or ``igq``) is evaluated once at the
density ``1 - prune`` to get the pruned count and once at ``1 - (prune + lock)``
to get the frozen count; ``locked = frozen - pruned``.  Within a layer the frozen
positions are a uniformly random subset of exact size, drawn from the
counter-based generator so the pattern regenerates from the seed alone.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from timm_fslt.regen import native, rng
from timm_fslt.regen.topk import keys_topk_mask

DISTRIBUTIONS = ("epl", "erk", "igq")

PRUNED, FREE, LOCKED = -1, 0, 1


def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _erk_densities(shapes: Sequence[tuple[int, ...]], density: float) -> list[float]:
    """Erdos-Renyi-Kernel: density proportional to sum(shape)/prod(shape), capped at 1."""
    counts = [math.prod(s) for s in shapes]
    raw = [sum(s) / c for s, c in zip(shapes, counts)]
    dense: set[int] = set()
    while True:
        budget = density * sum(counts) - sum(counts[i] for i in dense)
        rest = [i for i in range(len(shapes)) if i not in dense]
        denom = sum(raw[i] * counts[i] for i in rest)
        eps = budget / denom if denom > 0 else 0.0
        over = [i for i in rest if eps * raw[i] > 1.0]
        if not over:
            break
        dense.update(over)
    return [1.0 if i in dense else max(0.0, eps * raw[i]) for i in range(len(shapes))]


def _igq_densities(shapes: Sequence[tuple[int, ...]], density: float) -> list[float]:
    """Ideal Gas Quotas (Vysogorets & Kempe, 2021): layer l keeps n_l / (F * n_l + 1)."""
    counts = [math.prod(s) for s in shapes]
    total = sum(counts)
    target = density * total
    if density >= 1.0:
        return [1.0] * len(shapes)
    if density <= 0.0:
        return [0.0] * len(shapes)

    def kept(force: float) -> float:
        return sum(c / (force * c + 1.0) for c in counts)

    lo, hi = 0.0, 1.0
    while kept(hi) > target:
        hi *= 2.0
    for _ in range(200):  # bisection on the "force"; kept() is decreasing in it
        mid = 0.5 * (lo + hi)
        if kept(mid) > target:
            lo = mid
        else:
            hi = mid
    force = 0.5 * (lo + hi)
    return [1.0 / (force * c + 1.0) for c in counts]


def layer_densities(distribution: str, shapes: Sequence[tuple[int, ...]], density: float) -> list[float]:
    if distribution == "epl":
        return [density] * len(shapes)
    if distribution == "erk":
        return _erk_densities(shapes, density)
    if distribution == "igq":
        return _igq_densities(shapes, density)
    raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")


def frozen_counts(shapes: Sequence[tuple[int, ...]], prune: float, lock: float,
                  distribution: str = "epl") -> list[tuple[int, int]]:
    """(pruned, locked) count for each layer."""
    counts = [math.prod(s) for s in shapes]
    keep_after_prune = layer_densities(distribution, shapes, 1.0 - prune)
    keep_after_freeze = layer_densities(distribution, shapes, max(0.0, 1.0 - prune - lock))
    out = []
    for n, dp, df in zip(counts, keep_after_prune, keep_after_freeze):
        n_pruned = n - min(n, round_half_up(dp * n))
        n_frozen = n - min(n, round_half_up(df * n))
        out.append((n_pruned, max(0, n_frozen - n_pruned)))
    return out


def frozen_code(seed: int, name: str, shape: Sequence[int], n_pruned: int, n_locked: int,
                device=None) -> torch.Tensor:
    """Ternary int8 code (-1 pruned, +1 locked, 0 free) with exactly the given counts.

    Positions are ranked by their 32-bit hash (index breaks ties), which is a
    uniformly random permutation; the first ``n_pruned`` are pruned and the next
    ``n_locked`` locked.  A sparse source (prune p, lock 0) therefore prunes the
    same positions as a frozen source with the same seed and prune ratio.
    """
    n = math.prod(shape)
    if n >= 2 ** 31:
        raise ValueError(f"layer {name!r} has {n} weights; at most 2**31 - 1 per layer are supported")
    if n_pruned + n_locked > n:
        raise ValueError(f"layer {name!r}: {n_pruned} pruned + {n_locked} locked exceeds {n} weights")
    n_frozen = n_pruned + n_locked
    if n_frozen == 0:
        return torch.zeros(tuple(shape), dtype=torch.int8, device=device)
    if native.usable(device, numel=n) is not None:  # the same code, compiled: a radix select (regen/native.py)
        code = native.frozen_code(rng.stream_key(seed, name, "freeze"), n, n_pruned, n_locked)
        return code.view(tuple(shape))
    # Rank by (hash, index) without a sort: the first r positions in that order are
    # the r largest of ``~(hash - 2**31)`` (an order-reversing int32 key) with ties
    # going to the lower index -- exactly what keys_topk_mask selects, in linear time.
    keys = rng.bits(seed, name, "freeze", n, device, dtype=torch.int32,
                    transform=lambda h: h.sub_(1 << 31).bitwise_not_())
    code = keys_topk_mask(keys, n_frozen).to(torch.int8)  # pruned or locked: 1
    if n_pruned:
        code.masked_fill_(keys_topk_mask(keys, n_pruned), PRUNED)
    return code.view(tuple(shape))


def valid_keys(keys) -> bool:
    """Whether ``keys`` is a pair of freeze keys ``0 <= t1 <= t2 < 2**64`` (ints)."""
    try:
        t1, t2 = keys
    except (TypeError, ValueError):
        return False
    return all(isinstance(t, int) and not isinstance(t, bool) for t in (t1, t2)) \
        and 0 <= t1 <= t2 <= KEY_SENTINEL_ALL


# -- the same pattern as an elementwise rule: two 64-bit thresholds per layer ------------
KEY_SENTINEL_NONE = 0  # t for a rank of 0: no key is below it
KEY_SENTINEL_ALL = 2 ** 64 - 1  # t when the rank is the whole layer: every key is below it


def freeze_key(h: int, index: int) -> int:
    """The 64-bit rank key of one element: ``h * 2**32 + index`` (unique; orders like (h, index))."""
    return (int(h) << 32) | int(index)


def _key_at_rank(h: torch.Tensor, rank_set: torch.Tensor, r: int, n: int) -> int:
    """The smallest key among the elements NOT in the first ``r`` ranks (``rank_set`` marks those)."""
    if r == 0:
        return KEY_SENTINEL_NONE
    if r == n:
        return KEY_SENTINEL_ALL
    rest = ~rank_set
    h_min = int(h[rest].min())
    index = int(((h == h_min) & rest).nonzero()[0, 0])  # ties: the lowest index ranks first
    return freeze_key(h_min, index)


def freeze_keys(seed: int, name: str, shape: Sequence[int], n_pruned: int, n_locked: int,
                device=None) -> tuple[int, int]:
    """``(t1, t2)``: the code of element ``i`` is a pure function of its own key
    ``key = h * 2**32 + i`` (``h`` its 32-bit "freeze" hash): pruned if ``key < t1``,
    locked if ``t1 <= key < t2``, free otherwise (unsigned 64-bit compares).

    ``t1`` is the key of rank ``n_pruned`` (0-based) in ascending key order and ``t2``
    that of rank ``n_pruned + n_locked``: exactly the rank rule of ``frozen_code``.
    Sentinels: a rank of 0 gives 0 (nothing is below it), a rank equal to the layer's
    size gives 2**64 - 1 (above every key: ``h < 2**32`` and ``i < 2**31``).  So no
    pruning is ``t1 = 0``; no locking is ``t2 = t1``; everything frozen is ``t2 = 2**64 - 1``.
    """
    code = frozen_code(seed, name, shape, n_pruned, n_locked, device).reshape(-1)
    return freeze_keys_of_code(seed, name, code, n_pruned, n_locked)


def freeze_keys_of_code(seed: int, name: str, code: torch.Tensor, n_pruned: int, n_locked: int
                        ) -> tuple[int, int]:
    """``freeze_keys`` from the layer's code already regenerated (``frozen_code``)."""
    code = code.reshape(-1)
    n = code.numel()
    h = rng.bits(seed, name, "freeze", n, code.device)
    t1 = _key_at_rank(h, code == PRUNED, n_pruned, n)
    if n_locked == 0:
        return t1, t1
    return t1, _key_at_rank(h, code != FREE, n_pruned + n_locked, n)
