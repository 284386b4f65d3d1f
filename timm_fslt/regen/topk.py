"""Exact top-k selection with deterministic tie-breaking, in linear time.

``keys_topk_mask(keys, k)`` marks exactly ``k`` entries: every key above the k-th
largest, then as many of the keys equal to it as are still needed, lowest index
first.  That is the set a stable descending sort keeps (the tests compare with one,
``tests/regen_reference.py``), including the sort's conventions ``-0.0 == +0.0`` and
NaN above ``+inf`` for the values the keys stand for.

Nothing is sorted.  Values are mapped to integer keys with the same order (for
non-negative float32, such as score magnitudes, the IEEE bit pattern already is
one: ``magnitude_keys``), and the k-th largest key is found (``kth_largest``):

* up to ``_DIRECT`` keys: ``torch.kthvalue`` (quickselect on the CPU, radix select
  on CUDA);
* more: a strided sample of ``_SAMPLE`` keys gives a bracket ``[lo, hi]`` around
  the wanted rank (``4 sqrt(sample size)`` sample positions either side: at least
  8 standard deviations of a quantile's sampled rank); one pass counts the keys
  above ``hi``, one collects the few (about 3 %) inside the bracket, and
  ``kthvalue`` on those finishes.  If the bracket misses (only adversarial
  layouts, e.g. a period equal to the sampling stride, can make it), ``kthvalue``
  on all keys runs instead: the answer is always exact, only its cost depends on
  the data.  Neither path sorts, and nothing runs ``torch.sort``, whose parallel
  CPU path is slow when other processes share the cores.
"""
from __future__ import annotations

import math

import torch

_DIRECT = 1 << 18  # up to this many keys, kthvalue on all of them is as fast (measured crossover ~200K)
_SAMPLE = 1 << 16  # sample size of the bracketing step

# Every NaN bit pattern of a non-negative float32 is clamped to this key: above
# +inf (0x7F800000) and equal to each other, as torch.sort orders them.
NAN_KEY_32 = 0x7F800001


def magnitude_keys(values: torch.Tensor) -> torch.Tensor:
    """In place: reinterpret non-negative float32 ``values`` as ordered int32 keys.

    ``values`` must hold ``|x|`` (sign bit clear, e.g. from ``abs_``); it is
    overwritten (NaNs are clamped to ``NAN_KEY_32``) and returned viewed as int32.
    """
    if values.dtype != torch.float32:
        raise TypeError(f"values must be float32 magnitudes, got {values.dtype}")
    return values.view(torch.int32).clamp_max_(NAN_KEY_32)


def _count(mask: torch.Tensor) -> int:
    return int(torch.count_nonzero(mask))


def _bracketed(keys: torch.Tensor, k: int):
    """(kth, n_above, n_ties) from a sample bracket, or None if the bracket misses."""
    n = keys.numel()
    sample = keys[::n // _SAMPLE]
    s = sample.numel()
    rank = (n - k) * s // n  # where the k-th largest sits in the ascending sample
    margin = 4 * math.isqrt(s) + 8
    lo_at, hi_at = rank - margin, rank + margin
    if lo_at <= 0 and hi_at >= s - 1:
        return None

    def sample_at(i):  # the i-th smallest sampled key
        return torch.kthvalue(sample, i + 1).values

    if hi_at < s - 1:
        above = keys > sample_at(hi_at)
        n_above_hi = _count(above)
        inside = torch.logical_not(above) if lo_at <= 0 else (keys >= sample_at(lo_at)).logical_xor_(above)
    else:
        n_above_hi = 0
        inside = keys >= sample_at(lo_at)
    need = k - n_above_hi  # rank of the k-th largest among the keys inside the bracket
    candidates = keys[inside]
    if not 1 <= need <= candidates.numel():
        return None
    kth = torch.kthvalue(candidates, candidates.numel() - need + 1).values
    return (int(kth), n_above_hi + _count(candidates > kth), _count(candidates == kth))


def _check_k(keys: torch.Tensor, k: int) -> None:
    if keys.dim() != 1 or keys.is_floating_point():
        raise ValueError(f"keys must be a 1-D integer tensor, got {keys.dtype} of shape {tuple(keys.shape)}")
    if not 1 <= k <= keys.numel():
        raise ValueError(f"k must lie in [1, {keys.numel()}], got {k}")


def kth_largest(keys: torch.Tensor, k: int) -> tuple[int, int, int]:
    """For 1-D integer ``keys`` and ``1 <= k <= n``: the k-th largest key, how many
    keys are above it, and how many equal it."""
    _check_k(keys, k)
    if keys.numel() > _DIRECT:
        found = _bracketed(keys, k)
        if found is not None:
            return found
    kth = torch.kthvalue(keys, keys.numel() - k + 1).values  # the (n - k + 1)-th smallest
    return int(kth), _count(keys > kth), _count(keys == kth)


def keys_topk_mask(keys: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` largest integer ``keys`` (ties: lower index wins)."""
    n = keys.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=keys.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=keys.device)
    _check_k(keys, k)
    found = _bracketed(keys, k) if n > _DIRECT else None
    if found is None:
        kth = int(torch.kthvalue(keys, n - k + 1).values)
        at_least = keys >= kth
        if _count(at_least) == k:  # the usual case: no tie to break at the threshold
            return at_least
        n_above = _count(keys > kth)
    else:
        kth, n_above, n_ties = found
        if n_above + n_ties == k:
            return keys >= kth
    # Keep only the first `k - n_above` tied entries in index order.
    ties = keys == kth
    keep_ties = torch.cumsum(ties, 0, dtype=torch.int32) <= k - n_above
    return (keys > kth).logical_or_(ties.logical_and_(keep_ties))
