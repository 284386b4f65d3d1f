"""The CPU mask refresh in two compiled passes over the scores: select and write every mask.

What ``SupermaskGroup.refresh`` computes on the CPU -- in each segment (the whole model in global
scope, each layer in layerwise scope) the ``k`` largest ``|score|``, ties kept lowest index first,
written into the masks at the free positions -- done without the generic path's tensors: the
generic path writes every ``|s|`` into a buffer, brackets the k-th largest with a sample, then
builds a selected vector per layer and copies it into the mask (about ten passes and several
allocations per step, ``regen/topk.py``).  Here:

1. ``band_count``: one vectorised pass over every score's float32 bits (read as the ordered keys
   of ``topk.magnitude_keys``: the bits without the sign, every NaN one key above ``+inf``) finds
   the largest key (the finiteness check) and counts the keys above and inside a band
   ``[lo, hi]``.  The band comes from the last refresh of the same segment, centred on its k-th
   largest key with ``_MARGIN`` of its ranks either side: scores move little per optimizer step,
   so the k-th largest key usually stays inside.
2. ``band_keys``: the keys inside the band (about 1.6 % of them) are copied out, and the exact
   k-th largest is found among them (``np.partition``).
3. ``write_selected``: one pass writes each free weight's bit (key above the k-th, or equal to
   it within the first ties) into its mask and counts the kept ones per layer.

The band only decides the cost, never the answer: when the k-th largest key is not inside it
(the first refresh, a large step, replaced scores), the segment's k-th largest is found exactly
by ``topk.kth_largest`` on its keys and the band is re-centred from a sample.  Nothing is kept
between refreshes but the bands, two integers per segment.  Tested bit for bit against
``topk.keys_topk_mask`` (``tests/test_cpu_select.py``); used for contiguous float32 scores with
int32 free indexes on the CPU, when the compiled kernels are on (``regen/native.py``).
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from timm_fslt.regen import native
from timm_fslt.regen.topk import NAN_KEY_32, kth_largest

_FULL = 1 << 14  # segments up to this size take all their keys as candidates
_MARGIN = 1 / 128  # ranks either side of the k-th largest inside the next band, as a share of a segment
_SAMPLE = 1 << 16
THREADS = None
_ABOVE_ALL = 0x7FFFFFFF  # a key above every score's key (they are at most NAN_KEY_32)
_EMPTY = (NAN_KEY_32 + 1, NAN_KEY_32 + 1)  # a band no key lies in or above: a segment without one


class BandState:
    """What one group's refreshes pass on to the next: the band of each segment, and how the
    refreshes went (``hits``: the k-th largest was inside the band; ``misses``: it was found over
    the whole segment)."""

    def __init__(self):
        self.bands: dict = {}
        self.hits = 0
        self.misses = 0


def _keys(bits: list) -> np.ndarray:
    return np.minimum(np.concatenate(bits) & 0x7FFFFFFF, NAN_KEY_32)


def _band_from_sample(bits: list, k: int, n: int, margin: int) -> tuple[int, int]:
    """A band around the k-th largest key of the segment whose scores' bits are ``bits``
    (arrays, back to back), from a strided sample: ``margin`` ranks either side, plus eight
    standard deviations of a sampled quantile's rank."""
    keys = _keys(bits)[::max(1, n // _SAMPLE)]
    s = keys.shape[0]
    rank = (n - k) * s // n  # where the k-th largest sits in the ascending sample
    spread = margin * s // n + 4 * math.isqrt(s) + 8
    lo_at, hi_at = rank - spread, rank + spread
    picks = [i for i in (lo_at, hi_at) if 0 <= i < s]
    ordered = np.partition(keys, picks) if picks else keys
    return (int(ordered[lo_at]) if lo_at >= 0 else 0), (int(ordered[hi_at]) if hi_at < s else NAN_KEY_32)


def select_and_write(layers: list, segments: list, state: BandState, check_finite: bool) -> Optional[list]:
    """Write every layer's mask at its free positions from its scores, and return how many free
    weights each layer kept; None (nothing written) if ``check_finite`` and a score is NaN or infinite.

    ``layers``: ``(bits, mask, index)`` per layer -- the scores' float32 bits as a 1-D int32 array,
    the mask's bytes (uint8, flat), the int32 free positions (NumPy views of contiguous CPU tensors;
    the caller bumps the masks' version counters).  ``segments``: ``(first layer, end layer, k)`` in
    order, covering the layers: keep the ``k`` largest keys of each."""
    k = native.kernels()
    sizes = [bits.shape[0] for bits, _, _ in layers]
    offsets = np.cumsum([0] + sizes).tolist()
    owner, bands = [], []
    for s, (first, end, _) in enumerate(segments):
        n = offsets[end] - offsets[first]
        bands.append(state.bands.get((first, end, n), _EMPTY) if n > _FULL else (0, NAN_KEY_32))
        owner += [s] * (end - first)
    count = k["band_count"]
    jobs = [(sizes[j], lambda a, b, j=j, lo=np.int32(bands[owner[j]][0]), hi=np.int32(bands[owner[j]][1]):
             (a, *count(layers[j][0], a, b, lo, hi))) for j in range(len(layers))]
    found = native.run_pieces(jobs, THREADS)
    if check_finite and any(piece[1] >= 0x7F800000 for parts in found for piece in parts):
        return None
    above, hit = [], []  # per segment: keys above the band; whether its k-th largest key lies inside
    for s, (first, end, kept) in enumerate(segments):
        above.append(sum(piece[2] for j in range(first, end) for piece in found[j]))
        inside = sum(piece[3] for j in range(first, end) for piece in found[j])
        hit.append(0 < kept < offsets[end] - offsets[first] and above[s] < kept <= above[s] + inside)
    inside_keys = _gather(layers, jobs, found, owner, hit, bands, k)
    limits = []  # per segment: (kth, flat position of the last tie kept, relative to the segment)
    for s, (first, end, kept) in enumerate(segments):
        n = offsets[end] - offsets[first]
        if kept <= 0 or kept >= n:
            limits.append((_ABOVE_ALL, -1) if kept <= 0 else (-1, -1))
            continue
        margin = max(1024, int(n * _MARGIN))
        if hit[s]:
            cands = inside_keys[s]
            m = cands.shape[0]
            at = m - (kept - above[s])  # the k-th largest's ascending position among the candidates
            picks = sorted({max(at - margin, 0), at, min(at + margin, m - 1)})
            ordered = np.partition(cands, picks)
            kth = int(ordered[at])
            n_above = above[s] + int(np.count_nonzero(ordered[at + 1:] > kth))  # (all after at are >= kth)
            n_ties = int(np.count_nonzero(cands == kth))
            if n > _FULL:
                lo, hi = bands[s]
                state.bands[(first, end, n)] = (int(ordered[picks[0]]) if at - margin >= 0 else lo,
                                                int(ordered[picks[-1]]) if at + margin < m else hi)
            state.hits += 1
        else:
            bits = [layers[j][0] for j in range(first, end)]
            kth, n_above, n_ties = kth_largest(torch.from_numpy(_keys(bits)), kept)
            if n > _FULL:
                state.bands[(first, end, n)] = _band_from_sample(bits, kept, n, margin)
            state.misses += 1
        limits.append((kth, _last_tie(layers, offsets, first, end, kth, kept - n_above, n_ties, k)))
    write = k["write_selected"]
    out = native.run_pieces([(sizes[j], lambda a, b, j=j, kth=np.int32(limits[owner[j]][0]),
                              last=limits[owner[j]][1] - (offsets[j] - offsets[segments[owner[j]][0]]):
                              write(layers[j][0], layers[j][1], layers[j][2], a, b, kth, last - a))
                             for j in range(len(layers))], THREADS)
    return [int(sum(parts)) for parts in out]


def _gather(layers: list, jobs: list, found: list, owner: list, hit: list, bands: list, k) -> dict:
    """The keys inside the band of every segment whose k-th largest lies there, in flat order."""
    where, size = {}, [0] * len(hit)
    for j, parts in enumerate(found):
        s = owner[j]
        if hit[s]:
            for a, _, _, m in parts:
                where[(j, a)] = (size[s], m)
                size[s] += m
    outs = {s: np.empty(size[s], dtype=np.int32) for s in range(len(hit)) if hit[s]}
    if not outs:
        return outs
    copy = k["band_keys"]

    def body(j, a, b):
        s = owner[j]
        if hit[s]:
            at, m = where[(j, a)]
            copy(layers[j][0], a, b, np.int32(bands[s][0]), np.int32(bands[s][1]), outs[s][at:at + m])
    native.run_pieces([(n, lambda a, b, j=j: body(j, a, b)) for j, (n, _) in enumerate(jobs)], THREADS)
    return outs


def _last_tie(layers: list, offsets: list, first: int, end: int, kth: int, need: int, ties: int, k) -> int:
    """The position (in the segment's flat order) of the last of the ``need`` ties (keys equal to
    ``kth``) kept, lowest position first; past every position when all ``ties`` are kept."""
    if need >= ties:
        return offsets[end] - offsets[first]
    find = k["tie_position"]
    for j in range(first, end):
        at, seen = find(layers[j][0], np.int32(kth), need)
        if at >= 0:
            return offsets[j] - offsets[first] + int(at)
        need -= seen
    raise AssertionError("fewer ties than counted")  # (unreachable: the ties were counted in these keys)
