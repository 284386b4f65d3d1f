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

import functools
import itertools
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


# -- without reading anything back: a segmented radix select ---------------------------------------
#
# The selection above reads counts and the threshold back to the host (cheap on the CPU, a stall of
# the stream on a GPU).  ``segments_topk_mask`` gives the same bits with every count kept on the
# device: the k-th largest key of each segment is found digit by digit (11, 10 and 10 bits: the keys
# have 31), each digit from a histogram of the keys that share the digits found so far, and the ties
# at the threshold are kept lowest index first through a running count.  Every step is a fixed
# number of whole-tensor operations, whatever the data, and all segments (one per layer in
# layerwise scope) are selected together.
_DIGITS = ((20, 11), (10, 10), (0, 10))  # (shift, width): bits 30..20, 19..10, 9..0
# keys at or above this (the bit patterns of +inf and NaN) fall into the first digit's top bins
_NONFINITE_DIGIT = 0x7F800000 >> 20


def segments_topk_mask(keys: torch.Tensor, sizes: list, ks: list) -> tuple:
    """``keys_topk_mask`` of each segment, without a host synchronisation.

    ``keys``: 1-D int32 keys in ``[0, 2**31)`` (``magnitude_keys``), the segments back to back
    (``sizes``, Python ints summing to ``keys.numel()``); ``ks``: how many to keep in each
    (``0 <= k <= size``).  Returns ``(mask, nonfinite)``: the bool mask (exactly ``ks[j]`` marked
    in segment ``j``: the largest keys, ties lowest index first) and a device int64 tensor with
    each segment's number of keys of +inf or NaN magnitudes (read it when convenient)."""
    n, s = keys.numel(), len(sizes)
    if keys.dim() != 1 or keys.dtype != torch.int32:
        raise ValueError(f"keys must be a 1-D int32 tensor, got {keys.dtype} of shape {tuple(keys.shape)}")
    if sum(sizes) != n or len(ks) != s or any(not 0 <= k <= m for k, m in zip(ks, sizes)):
        raise ValueError(f"sizes must sum to {n} and each k lie in [0, size], got sizes={sizes} ks={ks}")
    device = keys.device
    need, counts, starts = _segment_constants(tuple(sizes), tuple(ks), device)
    segment = None  # segment number of every key (only with more than one segment)
    if s > 1:
        segment = torch.repeat_interleave(torch.arange(s, dtype=torch.int32, device=device), counts, output_size=n)
    prefix = torch.zeros(s, dtype=torch.int32, device=device)  # the threshold's digits found so far
    nonfinite = None
    for step, (shift, width) in enumerate(_DIGITS):
        bins = 1 << width
        digit = keys >> shift
        if step:
            digit &= bins - 1
            # only the keys that share the threshold's higher digits take part
            here = (keys >> (shift + width)) == (prefix if segment is None else prefix.index_select(0, segment))
            weight = here.to(torch.int32)
        else:
            weight = torch.ones((), dtype=torch.int32, device=device).expand(n)
        if segment is not None:
            digit += segment * bins
        hist = torch.zeros(s * bins, dtype=torch.int32, device=device).index_add_(0, digit, weight).view(s, bins)
        if not step:
            nonfinite = hist[:, _NONFINITE_DIGIT:].sum(1)
        # at_least[j, d]: keys of segment j (still taking part) whose digit is d or more
        at_least = hist.flip(1).cumsum(1, dtype=torch.int64).flip(1)
        chosen = (at_least >= need[:, None]).sum(1) - 1  # the largest d with at_least >= need
        above = torch.nn.functional.pad(at_least, (0, 1)).gather(1, (chosen + 1)[:, None]).squeeze(1)
        need = need - above
        prefix = prefix * bins + chosen.to(torch.int32)
    threshold = prefix if segment is None else prefix.index_select(0, segment)
    mask = keys > threshold
    ties = keys == threshold
    # each tie's rank among its segment's ties (1, 2, ...): a running count, less the segment's start
    rank = torch.cumsum(ties, 0, dtype=torch.int32)
    if segment is not None:
        before = torch.nn.functional.pad(rank, (1, 0)).index_select(0, starts)
        rank -= before.index_select(0, segment)
        need = need.index_select(0, segment)
    mask |= ties.logical_and_(rank <= need)
    return mask, nonfinite


@functools.lru_cache(maxsize=16)
def _segment_constants(sizes: tuple, ks: tuple, device: torch.device) -> tuple:
    """``(ks, sizes, starts)`` as int64 device tensors: the same every step of a model, so copied to
    the device once (callers never write them)."""
    starts = [0] + list(itertools.accumulate(sizes))[:-1]
    return tuple(torch.tensor(values, dtype=torch.int64, device=device) for values in (ks, sizes, starts))


@functools.lru_cache(maxsize=16)
def _segment_ends(sizes: tuple, device: torch.device) -> torch.Tensor:
    return torch.tensor(list(itertools.accumulate(sizes)), dtype=torch.int64, device=device)


def segment_sums(mask: torch.Tensor, sizes: list) -> torch.Tensor:
    """How many entries of each segment of the 1-D bool ``mask`` are set (int64, on its device,
    without a host synchronisation)."""
    ends = _segment_ends(tuple(sizes), mask.device)
    running = torch.nn.functional.pad(torch.cumsum(mask, 0, dtype=torch.int64), (1, 0))
    at = running.index_select(0, ends)
    return at - torch.nn.functional.pad(at, (1, 0))[:-1]
