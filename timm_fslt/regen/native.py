"""Compiled CPU kernels for regeneration: the same bits as ``rng``'s torch ops, 10-20x faster.

Generator version 2 is integer arithmetic (``timm_fslt.regen.rng``'s docstring is the
specification), so a compiled loop reproduces it exactly: every element's hash
``mix(mix(mix(lo ^ k0) ^ hi ^ k1) + k2)`` in unsigned 64-bit variables (the products of
32-bit values and 32-bit constants fit, and are reduced mod 2**32 as the spec says), the
normal's fixed-point Horner scheme in signed 64-bit (arithmetic right shifts, as torch's),
and the one float64 multiplication and float32 rounding of the value.  The torch version
runs about 35 tensor ops per chunk of 2**18 elements; here one pass computes and stores
each value, on ``torch.get_num_threads()`` threads (numba ``nogil`` kernels on a thread pool
of this module: no numba threading layer, so nothing here conflicts with torch's OpenMP,
forks badly, or refuses concurrent callers).

Used on the CPU for generator version 2 when numba is installed (a dependency of
timm_fslt) unless ``TIMM_FSLT_KERNELS=torch``; the torch path stays for GPUs, version 1,
and machines without numba.  ``tests/test_native.py`` checks both paths against each other
and against the NumPy reference decoder, across ATen CPU capabilities and thread counts.

The kernels compile on first use (about 5-10 s once; numba caches the machine code next to
this file, so later processes load it in well under a second); importing this module
imports nothing heavy: numba is imported when a kernel is first needed.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np
import torch

ENV = "TIMM_FSLT_KERNELS"  # "torch": never use these kernels; unset or "native": use them when numba imports
RULES = {"kaiming_uniform": 0, "kaiming_normal": 1, "signed_kaiming_constant": 2}  # (init.WEIGHT_INITS)
_MIN_PARALLEL = 1 << 16  # elements below which one thread does the whole layer

_lock = threading.Lock()
_state: dict = {}  # "kernels": the compiled functions (or None: unavailable), "pool", "pool_size"


def _compile():
    # (ImportError if numba is missing: the torch path is used)
    from numba import float64, int32, int64, njit, uint32
    from numba.cpython.unsafe.numbers import leading_zeros

    from timm_fslt.reference_decoder import NORMAL_TABLE

    table = np.ascontiguousarray(np.array(NORMAL_TABLE, dtype=np.int64).T)  # (7, 256): one row per coefficient
    c1, c2 = np.uint32(0x7FEB352D), np.uint32(0x846CA68B)
    s15, s16, s31 = np.uint32(15), np.uint32(16), np.uint32(31)
    sign_bit = np.uint32(0x80000000)
    half = np.int64(1 << 27)  # round to nearest before each >> 28 (rng._HALF)

    # Unsigned 32-bit arithmetic wraps mod 2**32 (defined in C and LLVM, unlike signed overflow):
    # exactly the spec's "x * c mod 2**32"; every result is cast back to uint32 because numba,
    # like NumPy, widens uint32 arithmetic to 64 bits.
    @njit(inline="always")
    def mix(x):
        x = uint32(x ^ (x >> s16))
        x = uint32(x * c1)
        x = uint32(x ^ (x >> s15))
        x = uint32(x * c2)
        return uint32(x ^ (x >> s16))

    @njit(inline="always")
    def hash32(i, k0, k1, k2):  # i: the element index (int64, 0 <= i < 2**32: its high word is 0)
        # (callers check the bound; the high word's xor is left out so the loops vectorise in 32-bit lanes)
        x = mix(uint32(uint32(i) ^ k0))
        x = mix(uint32(x ^ k1))
        return mix(uint32(x + k2))

    @njit(inline="always")
    def value(h, rule, table):
        """The exact integer of hash h as float64 (< 2**53: exact), before the one multiplication."""
        if rule == 0:  # kaiming_uniform: 2h + 1 - 2**32 = 2 (h - 2**31) + 1, h - 2**31 as int32
            return float64(int32(h ^ sign_bit)) * 2.0 + 1.0
        if rule == 2:  # signed constant: bit 31 set -> +1, else -1
            return 1.0 if (h >> s31) else -1.0
        # kaiming_normal: +-Z of rng.normal_fixed; t = 2 (h mod 2**31) + 1 is odd, clz32 picks the octave
        t = uint32((h << np.uint32(1)) | np.uint32(1))
        k = int64(leading_zeros(t))
        x = int64(uint32(t << uint32(k)))
        seg = k * 8 + ((x >> 28) & 7)
        y = x & ((1 << 28) - 1)
        acc = table[6, seg]
        for col in range(5, -1, -1):
            acc = ((acc * y + half) >> 28) + table[col, seg]
        return float64(-acc if (h >> s31) else acc)

    # One kernel per rule and output (numba specialises each on `rule`'s literal value, so the
    # loops have no branch on it): values_range_u / _n / _s.
    def make(rule):
        @njit(nogil=True, cache=True)
        def values_range(out, start, stop, k0, k1, k2, factor, table):
            for j in range(start, stop):
                out[j] = value(hash32(int64(j), k0, k1, k2), rule, table) * factor  # ONE rounding, then out's dtype

        @njit(nogil=True, cache=True)
        def values_at(out, positions, start, stop, k0, k1, k2, factor, table):
            for j in range(start, stop):
                out[j] = value(hash32(positions[j], k0, k1, k2), rule, table) * factor
        return values_range, values_at

    kernels = {"table": table}
    for name, rule in RULES.items():
        kernels[name] = make(rule)

    @njit(nogil=True, cache=True)
    def hashes_histogram(out, start, stop, k0, k1, k2, hist):
        # the layer's "freeze" hashes, and how many fall in each of 65536 bins of their top 16 bits
        for j in range(start, stop):
            h = hash32(int64(j), k0, k1, k2)
            out[j] = h
            hist[h >> s16] += 1

    @njit(nogil=True, cache=True)
    def low_histogram(h, start, stop, top, hist):
        for j in range(start, stop):
            if (h[j] >> s16) == top:
                hist[h[j] & np.uint32(0xFFFF)] += 1

    @njit(nogil=True, cache=True)
    def tie_limit(h, value, need):  # the index of the need-th (1-based) element whose hash is value
        seen = 0
        for j in range(h.shape[0]):
            if h[j] == value:
                seen += 1
                if seen == need:
                    return j
        return h.shape[0]

    @njit(nogil=True, cache=True)
    def write_code(code, h, start, stop, v1, lim1, v2, lim2):
        # -1 pruned: (hash, index) before rank 1; +1 locked: before rank 2; 0 free (pattern.frozen_code)
        for j in range(start, stop):  # branch-free: the codes are random, branches would mispredict
            x = int64(h[j])
            pruned = int64(x < v1) | (int64(x == v1) & int64(j <= lim1))
            frozen = int64(x < v2) | (int64(x == v2) & int64(j <= lim2))  # (pruned implies frozen)
            code[j] = frozen - 2 * pruned

    @njit(nogil=True, cache=True)
    def hashes(out, start, stop, k0, k1, k2):
        for j in range(start, stop):
            out[j] = hash32(int64(j), k0, k1, k2)

    @njit(nogil=True, cache=True)
    def scan(h, start, stop, b0, b1, b2, b3, cap):
        """Over h[start:stop]: how many hashes are below b0 and below b2, and the hashes in [b0, b1] and
        in [b2, b3] (at most cap of each; the counts returned last may exceed cap: the bracket held more)."""
        below0 = below2 = 0
        w1, w2 = uint32(b1 - b0), uint32(b3 - b2)  # x in [b0, b1] iff (x - b0) mod 2**32 <= b1 - b0
        c1 = np.empty(cap, dtype=np.uint32)
        c2 = np.empty(cap, dtype=np.uint32)
        m1 = m2 = 0
        for j in range(start, stop):
            x = h[j]
            below0 += int64(x < b0)  # (no branch: about half the hashes are below, at random)
            below2 += int64(x < b2)
            if uint32(x - b0) <= w1:  # rare (a bracket holds ~16 sqrt(n) hashes): a predictable branch
                if m1 < cap:
                    c1[m1] = x
                m1 += 1
            if uint32(x - b2) <= w2:
                if m2 < cap:
                    c2[m2] = x
                m2 += 1
        return below0, below2, c1[:min(m1, cap)], c2[:min(m2, cap)], m1, m2

    kernels.update(hashes=hashes, scan=scan, hashes_histogram=hashes_histogram, low_histogram=low_histogram, tie_limit=tie_limit,
                   write_code=write_code)
    return kernels


def kernels() -> Optional[dict]:
    """The compiled kernels, or None when they are switched off or numba is missing."""
    if os.environ.get(ENV, "native") == "torch":
        return None
    found = _state.get("kernels", False)
    if found is False:
        with _lock:
            found = _state.get("kernels", False)
            if found is False:
                try:
                    found = _compile()
                except ImportError:
                    found = None
                _state["kernels"] = found
    return found


def usable(device, dtype: Optional[torch.dtype] = None, numel: int = 0) -> Optional[dict]:
    """The kernels if they can produce this draw: CPU tensors (of a float dtype, when given) of
    fewer than 2**32 elements (the kernels leave out the element index's high word)."""
    if numel > 1 << 32:
        return None
    if torch.device(device if device is not None else "cpu").type != "cpu":
        return None
    if dtype is not None and dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        return None
    return kernels()


def _pool(threads: int) -> Optional[ThreadPoolExecutor]:
    if threads < 2:
        return None
    with _lock:
        pool = _state.get("pool")
        if pool is None or _state.get("pool_pid") != os.getpid() or _state.get("pool_size") != threads:
            # (a forked child has the parent's pool object but not its threads: a new one)
            pool = _state["pool"] = ThreadPoolExecutor(threads, thread_name_prefix="timm_fslt_regen")
            _state["pool_size"], _state["pool_pid"] = threads, os.getpid()
    return pool


def _parallel(n: int, body) -> None:
    """``body(start, stop)`` over ``[0, n)`` in as many slices as torch has threads."""
    threads = max(1, min(torch.get_num_threads(), n // _MIN_PARALLEL))
    pool = _pool(threads)
    if pool is None:
        body(0, n)
        return
    bounds = [n * t // threads for t in range(threads + 1)]
    for future in [pool.submit(body, a, b) for a, b in zip(bounds[:-1], bounds[1:])]:
        future.result()


def values(key: tuple, numel: int, rule: str, factor: float, dtype: torch.dtype,
           positions: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``integer(h) * factor`` rounded to ``dtype`` for elements ``0 .. numel - 1`` (or at ``positions``):
    what ``init.random_weight`` and ``init.regenerated_table`` draw with generator version 2."""
    k = kernels()
    if (numel if positions is None or not positions.numel() else int(positions.max()) + 1) > 1 << 32:
        raise ValueError(f"native.values draws element indices below 2**32, got {numel} elements")
    wide = dtype in (torch.float32, torch.float64)
    out = torch.empty(numel if positions is None else positions.numel(), dtype=dtype if wide else torch.float32)
    arr = out.numpy()
    k0, k1, k2 = (np.uint32(w) for w in key)
    table, factor = k["table"], float(factor)
    in_range, at = k[rule]
    if positions is None:
        _parallel(arr.shape[0], lambda a, b: in_range(arr, a, b, k0, k1, k2, factor, table))
    else:
        pos = positions.to(torch.int64).contiguous().numpy()
        _parallel(arr.shape[0], lambda a, b: at(arr, pos, a, b, k0, k1, k2, factor, table))
    return out if wide else out.to(dtype)  # float32 -> bfloat16/float16 once, as the torch path


def _rank_value(h: np.ndarray, hist: np.ndarray, rank: int, k: dict) -> tuple[int, int]:
    """For ``0 < rank < n``: the hash ``v`` of the element at 0-based position ``rank`` in (hash, index)
    order, and the index up to which elements hashed ``v`` come before that rank (``tie_limit``)."""
    cumulative = np.cumsum(hist)
    top = int(np.searchsorted(cumulative, rank, side="right"))  # the bin holding position `rank`
    before = int(cumulative[top - 1]) if top else 0
    low = np.zeros(1 << 16, dtype=np.int64)
    fn = k["low_histogram"]
    _parallel_hist(h, low, lambda a, b, out: fn(h, a, b, np.uint32(top), out))
    low_cumulative = np.cumsum(low) + before
    low_bin = int(np.searchsorted(low_cumulative, rank, side="right"))
    value = (top << 16) | low_bin
    below = int(low_cumulative[low_bin - 1]) if low_bin else before  # elements with a smaller hash
    return _tie(h, value, rank - below, int(low[low_bin]), k)


def _parallel_hist(h: np.ndarray, hist: np.ndarray, body) -> None:
    """``body(start, stop, partial)`` per slice, each into its own histogram, summed into ``hist``."""
    parts = []

    def run(a, b):
        part = np.zeros_like(hist)
        body(a, b, part)
        parts.append(part)
    _parallel(h.shape[0], run)
    for part in parts:
        hist += part


def _bracket(rank: int, numel: int) -> tuple[int, int]:
    """Hash values that bracket the one at ``rank`` with overwhelming probability: the hashes are
    uniform on [0, 2**32), so the count below ``x`` is Binomial(n, x / 2**32); 8 standard
    deviations (plus 8 elements) either side.  A miss is detected and costs a slower exact path."""
    p = rank / numel
    delta = 8.0 * (p * (1.0 - p) / numel) ** 0.5 + 8.0 / numel
    return max(0, int((p - delta) * 2 ** 32)), min(2 ** 32 - 1, int((p + delta) * 2 ** 32) + 1)


def frozen_code(key: tuple, numel: int, n_pruned: int, n_locked: int) -> torch.Tensor:
    """``pattern.frozen_code``'s int8 code (flat) for one layer's "freeze" stream ``key``."""
    k = kernels()
    k0, k1, k2 = (np.uint32(w) for w in key)
    h = np.empty(numel, dtype=np.uint32)
    fn = k["hashes"]
    _parallel(numel, lambda a, b: fn(h, a, b, k0, k1, k2))
    return code_of_hashes(h, n_pruned, n_locked, uniform=True)


def code_of_hashes(h: np.ndarray, n_pruned: int, n_locked: int, uniform: bool = False) -> torch.Tensor:
    """The int8 code of 32-bit hashes ``h`` (uint32): ranked by (hash, index) ascending, the first
    ``n_pruned`` positions pruned (-1), the next ``n_locked`` locked (+1), the rest free (0).

    ``uniform`` (hashes of the generator): each rank's hash is found among the few hashes inside
    a bracket around it (``_bracket``), collected in one pass; if a bracket misses (or for other
    hashes) a radix select over two 65536-bin histograms finds it."""
    k = kernels()
    numel = h.shape[0]
    ranks = (n_pruned, n_pruned + n_locked)
    found = {}
    if uniform and numel:
        bounds = [b for r in ranks for b in _bracket(min(max(r, 1), numel), numel)]
        cap = 64 * int(numel ** 0.5) + 256
        parts = []
        fn = k["scan"]
        _parallel(numel, lambda a, b: parts.append(fn(h, a, b, *(np.uint32(x) for x in bounds), cap)))
        for r in range(2):
            below = sum(int(p[r]) for p in parts)
            inside = sum(int(p[4 + r]) for p in parts)
            at = ranks[r] - below  # 0-based position of the rank's element among the bracket's hashes
            if 0 <= at < inside and all(int(p[4 + r]) <= cap for p in parts):
                cand = np.concatenate([p[2 + r] for p in parts])
                value = int(np.partition(cand, at)[at])
                found[r] = _tie(h, value, ranks[r] - below - int(np.count_nonzero(cand < value)),
                                int(np.count_nonzero(cand == value)), k)
    hist = None

    def threshold(r: int) -> tuple[int, int]:  # (v, lim): before the rank iff hash < v or (== v and index <= lim)
        nonlocal hist
        rank = ranks[r]
        if rank <= 0:
            return 0, -1
        if rank >= numel:
            return 1 << 32, numel  # above every 32-bit hash
        if r in found:
            return found[r]
        if hist is None:
            hist = np.bincount(h >> np.uint32(16), minlength=1 << 16).astype(np.int64)
        return _rank_value(h, hist, rank, k)

    v1, lim1 = threshold(0)
    v2, lim2 = threshold(1)
    code = torch.empty(numel, dtype=torch.int8)
    arr = code.numpy()
    fn = k["write_code"]
    # (thresholds as int64: 2**32 stands for "every hash" and does not fit a uint32)
    _parallel(numel, lambda a, b: fn(arr, h, a, b, np.int64(v1), lim1, np.int64(v2), lim2))
    return code


def _tie(h: np.ndarray, value: int, need: int, equal: int, k: dict) -> tuple[int, int]:
    """(value, lim): of the ``equal`` elements hashed ``value``, the ``need`` with the lowest indices
    come before the rank, i.e. those with index <= lim."""
    if need == 0:
        return value, -1
    if need >= equal:
        return value, h.shape[0]
    return value, int(k["tie_limit"](h, np.uint32(value), need))
