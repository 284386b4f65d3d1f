"""The CPU mask refresh in two compiled passes over the scores: select and write every mask.

What ``SupermaskGroup.refresh`` computes on the CPU -- in each segment (the whole model in global
scope, each layer in layerwise scope) the ``k`` largest ``|score|``, ties kept lowest index first,
written into the masks at the free positions -- done without the generic path's tensors: the
generic path writes every ``|s|`` into a buffer, brackets the k-th largest with a sample, then
builds a selected vector per layer and copies it into the mask (about ten passes and several
allocations per step, ``regen/topk.py``).  Here:

1. ``band_scan``: one pass over every score's float32 bits (read as the ordered keys of
   ``topk.magnitude_keys``: the bits without the sign, every NaN one key above ``+inf``) finds the
   largest key (the finiteness check), counts the keys above and inside a narrow band
   ``[lo, hi]`` (vectorised, 64 keys at a time) and copies the few keys inside it out.  The band
   comes from the last refresh of the same segment: its k-th largest key with a margin of ranks
   either side (at first a thousandth of the segment's: in a ResNet-18 search at lr 0.1 the k-th
   largest moved about 0.02 % of the ranks per step; every miss widens it four times).
2. The exact k-th largest is found among the candidates (``np.partition``).
3. ``write_changes``: one pass computes each free weight's bit (key above the k-th, or equal to
   it within the first ties), counts the kept ones per layer and compares the bits with the last
   refresh's (a byte per free weight, in free order), 64 at a time, vectorised; only where a bit
   changed are the mask (and the kept product) written.  ``write_selected`` writes every bit, when
   the last refresh's bits are not known (the first refresh, a mask written by someone else).

The band only decides the cost, never the answer: when the k-th largest key is not inside it
(the first refresh, a large step, replaced scores), the segment's k-th largest is found exactly
by ``topk.kth_largest`` on its keys and the band is re-centred from a sample.  Nothing is kept
between refreshes but each segment's band and margin and each layer's last count of keys inside.
Tested bit for bit against a stable sort and the generic refresh (``tests/test_cpu_select.py``);
used for contiguous float32 scores with int32 free indexes on the CPU, when the compiled kernels
are on (``regen/native.py``).
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from timm_fslt.regen import native
from timm_fslt.regen.topk import NAN_KEY_32, kth_largest

_FULL = 1 << 14  # segments up to this size take all their keys as candidates
_MARGIN = 1 / 1024  # ranks either side of the k-th largest inside the next band, as a share of a segment
_WIDEST = 1 / 32  # the margin after misses at most
_SAMPLE = 1 << 16
_ABOVE_ALL = 0x7FFFFFFF  # a key above every score's key (they are at most NAN_KEY_32)
_EMPTY = (NAN_KEY_32 + 1, NAN_KEY_32 + 1)  # a band no key lies in or above: a segment without one


class BandState:
    """What one group's refreshes pass on to the next: per segment its band ``(lo, hi)`` and margin,
    per layer how many keys lay inside the band (to size its share of the candidate buffer), and how
    the refreshes went (``hits``: the k-th largest was inside the band; ``misses``: it was not, and
    was found over the whole segment)."""

    def __init__(self):
        self.bands: dict = {}
        self.margins: dict = {}
        self.inside: dict = {}
        self.hits = 0
        self.misses = 0


def _keys(bits: list) -> np.ndarray:
    """The ordered keys of the scores whose bits are ``bits`` (arrays, back to back): one new array,
    the size of the scores, and nothing else (a miss happens at the first refresh, inside freeze)."""
    keys = np.concatenate(bits)
    np.bitwise_and(keys, 0x7FFFFFFF, out=keys)
    return np.minimum(keys, NAN_KEY_32, out=keys)


def _band_from_sample(keys: np.ndarray, k: int, margin: int) -> tuple[int, int]:
    """A band around the k-th largest of a segment's ``keys`` from a strided sample: ``margin`` ranks
    either side, plus eight standard deviations of a sampled quantile's rank."""
    n = keys.shape[0]
    keys = keys[::max(1, n // _SAMPLE)].copy()
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

    ``layers``: ``(bits, mask, index, product, (sel, current))`` per layer -- the scores' float32 bits
    as a 1-D int32 array, the mask's bytes (uint8, flat), the int32 free positions (NumPy views of
    contiguous CPU tensors; the caller bumps the masks' version counters); None or ``(weight, out,
    scale)``: flat float32 arrays of the weight and of its kept product ``W * mask * scale`` (scale: a
    float, or None for none), whose entries are rewritten where a mask bit changes; and a uint8 array
    of one byte per free weight, the selected bits in free order, with whether it holds the mask's
    bits now (then only the bits that change are written; else every bit, and ``sel`` is filled).
    ``segments``: ``(first layer, end layer, k)`` in order, covering the layers: keep the ``k``
    largest keys of each."""
    k = native.kernels()
    sizes = [layer[0].shape[0] for layer in layers]
    offsets = np.cumsum([0] + sizes).tolist()
    owner, bands, names = [], [], []
    for s, (first, end, _) in enumerate(segments):
        n = offsets[end] - offsets[first]
        names.append((first, end, n))
        bands.append(state.bands.get(names[s], _EMPTY) if n > _FULL else (0, NAN_KEY_32))
        owner += [s] * (end - first)
    # each layer's share of the candidate buffer: twice its last count inside, or all its keys
    room = [sizes[j] if names[owner[j]][2] <= _FULL else 2 * state.inside.get((names[owner[j]], j), 0) + 256
            for j in range(len(layers))]
    starts = np.cumsum([0] + room).tolist()
    cand = np.empty(starts[-1], dtype=np.int32)
    scan = k["band_scan"]

    def job(j):
        lo, hi = (np.int32(v) for v in bands[owner[j]])
        n, base = sizes[j], starts[j]
        return (n, lambda a, b: (a, b, *scan(layers[j][0], a, b, lo, hi, cand, base + a * room[j] // max(n, 1),
                                             base + b * room[j] // max(n, 1))))
    found = native.run_pieces([job(j) for j in range(len(layers))])
    if check_finite and any(piece[2] >= 0x7F800000 for parts in found for piece in parts):
        return None
    limits = []  # per segment: (kth, position of the last tie kept in the segment's flat order)
    for s, (first, end, kept) in enumerate(segments):
        n = offsets[end] - offsets[first]
        if kept <= 0 or kept >= n:
            limits.append((_ABOVE_ALL, -1) if kept <= 0 else (-1, -1))
            continue
        above = sum(piece[3] for j in range(first, end) for piece in found[j])
        inside = sum(piece[4] for j in range(first, end) for piece in found[j])
        for j in range(first, end):
            state.inside[(names[s], j)] = sum(piece[4] for piece in found[j])
        margin = state.margins.get(names[s], max(1024, int(n * _MARGIN)))
        if above < kept <= above + inside:
            lo, hi = bands[s]
            cands = np.concatenate([_piece_keys(layers[j][0], piece, lo, hi, cand, starts[j], room[j], sizes[j])
                                    for j in range(first, end) for piece in found[j]])
            at = inside - (kept - above)  # the k-th largest's ascending position among the candidates
            picks = sorted({max(at - margin, 0), at, min(at + margin, inside - 1)})
            ordered = np.partition(cands, picks)
            kth = int(ordered[at])
            n_above = above + int(np.count_nonzero(ordered[at + 1:] > kth))  # (all after at are >= kth)
            n_ties = int(np.count_nonzero(cands == kth))
            if n > _FULL:
                state.bands[names[s]] = (int(ordered[picks[0]]) if at - margin >= 0 else lo,
                                         int(ordered[picks[-1]]) if at + margin < inside else hi)
            state.hits += 1
        else:
            keys = _keys([layers[j][0] for j in range(first, end)])
            kth, n_above, n_ties = kth_largest(torch.from_numpy(keys), kept)
            if n > _FULL:
                if names[s] in state.bands:  # (a band missed: wider from now on)
                    margin = state.margins[names[s]] = min(4 * margin, max(1024, int(n * _WIDEST)))
                state.bands[names[s]] = _band_from_sample(keys, kept, margin)
            del keys
            state.misses += 1
        limits.append((kth, _last_tie(layers, offsets, first, end, kth, kept - n_above, n_ties, k)))
    write_all, write_changes = k["write_selected"], k["write_changes"]
    none = np.empty(0, dtype=np.float32)

    def writer(j):
        kth = np.int32(limits[owner[j]][0])
        last = limits[owner[j]][1] - (offsets[j] - offsets[segments[owner[j]][0]])  # (in the layer's order)
        bits, mask, index, product, (sel, current) = layers[j]
        weight, out, scale = product if product is not None else (none, none, None)
        write = write_changes if current else write_all
        return sizes[j], lambda a, b: write(bits, sel, mask, index, a, b, kth, last - a, weight, out,
                                            np.float32(scale or 1.0), scale is not None, product is not None)
    return [int(sum(parts)) for parts in native.run_pieces([writer(j) for j in range(len(layers))])]


def _piece_keys(bits, piece: tuple, lo: int, hi: int, cand, base: int, room: int, n: int) -> np.ndarray:
    """The keys in ``[lo, hi]`` one piece of a layer found: from its share of the buffer, or again
    from the scores if they did not all fit."""
    a, b, _, _, m = piece
    c_start = base + a * room // max(n, 1)
    if m <= base + b * room // max(n, 1) - c_start:
        return cand[c_start:c_start + m]
    keys = _keys([bits[a:b]])
    return keys[(keys >= lo) & (keys <= hi)]


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
