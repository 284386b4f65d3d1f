"""Compiled CPU kernels for regeneration: the same bits as ``rng``'s torch ops, several times faster.

Generator version 2 is integer arithmetic (``timm_fslt.regen.rng``'s docstring is the
specification), so a compiled loop reproduces it exactly: every element's hash
``mix(mix(mix(lo ^ k0) ^ k1) + k2)`` in unsigned 32-bit arithmetic (which wraps mod 2**32, as
the spec's products do; the index's high word is 0 below 2**32 elements), the normal's
fixed-point Horner scheme in signed 64-bit (arithmetic right shifts, as torch's), and the one
float64 multiplication and float32 rounding of each value.  The torch path runs about 35
tensor ops per chunk; here one pass computes and stores each value.

What is compiled (``regen/_kernels.py``, numba ``nogil`` functions run on a thread pool of this
module with ``torch.get_num_threads()`` threads: no numba threading layer, so nothing here
competes with torch's OpenMP, breaks after ``fork`` or refuses concurrent callers):

* weights, initial scores and regenerated tables (``values``, for ``init.random_weight`` and
  ``init.regenerated_table``);
* freezing codes by rank (``frozen_code``: hashes, then each rank's hash found among the ~16 sqrt(n)
  hashes of a bracket, exact fallback a radix select; ties to the lowest index), and from a
  ticket's freeze keys in one elementwise pass (``codes_from_keys_many``);
* the free positions of a code, and a ticket's mask bits written into a layer (``load_ticket``).

Used on the CPU for generator version 2 when numba is installed (a dependency of timm_fslt)
unless ``TIMM_FSLT_KERNELS=torch``; the torch path stays for GPUs, version 1, layers of 2**32
elements or more and machines without numba.  ``tests/test_native.py`` checks both paths
against each other and against the NumPy reference decoder, across ATen CPU capabilities and
thread counts, ties included.

The first kernel call of a process costs about 0.7 s (numba's code generator starts, and loads
the machine code numba cached in ``__pycache__`` on first use; compiling them all takes about
10 s once per installation); importing this module imports nothing heavy.
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


def _load():
    from timm_fslt.regen import _kernels as k  # (ImportError if numba is missing: the torch path is used)
    return {
        "table": k.TABLE,
        "kaiming_uniform": (k.uniform_range, k.uniform_at, False),
        "kaiming_normal": (k.normal_range, k.normal_at, True),
        "signed_kaiming_constant": (k.signed_range, k.signed_at, False),
        **{name: getattr(k, name) for name in ("hashes", "scan", "low_histogram", "tie_limit", "write_code",
                                               "hash_write_code", "count_free", "write_free", "apply_bits",
                                               "free_gradient", "band_scan", "write_selected", "write_changes",
                                               "tie_position")},
    }


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
                    found = _load()
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


def _slices(n: int) -> list:
    threads = max(1, min(torch.get_num_threads(), n // _MIN_PARALLEL))
    bounds = [n * t // threads for t in range(threads + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _map(n: int, body) -> list:
    """``[body(start, stop) for each slice]`` of ``[0, n)``, the slices run on the pool."""
    slices = _slices(n)
    pool = _pool(len(slices))
    if pool is None:
        return [body(a, b) for a, b in slices]
    return [future.result() for future in [pool.submit(body, a, b) for a, b in slices]]


def _parallel(n: int, body) -> None:
    """``body(start, stop)`` over ``[0, n)`` in as many slices as torch has threads."""
    _map(n, body)


def values(key: tuple, numel: int, rule: str, factor: float, dtype: torch.dtype,
           positions: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``integer(h) * factor`` rounded to ``dtype`` for elements ``0 .. numel - 1`` (or at ``positions``):
    what ``init.random_weight`` and ``init.regenerated_table`` draw with generator version 2."""
    if positions is None:
        return values_many([(key, numel, rule, factor, dtype)])[0]
    k = kernels()
    _check_indices(int(positions.max()) + 1 if positions.numel() else 0)
    wide = dtype in (torch.float32, torch.float64)
    out = torch.empty(positions.numel(), dtype=dtype if wide else torch.float32)
    arr, pos = out.numpy(), positions.to(torch.int64).contiguous().numpy()
    k0, k1, k2 = (np.uint32(w) for w in key)
    _, at, tabled = k[rule]
    extra = (float(factor), k["table"]) if tabled else (float(factor),)
    _parallel(arr.shape[0], lambda a, b: at(arr, pos, a, b, k0, k1, k2, *extra))
    return out if wide else out.to(dtype)  # float32 -> bfloat16/float16 once, as the torch path


def _check_indices(stop: int) -> None:
    if stop > 1 << 32:  # (the kernels leave out the element index's high word)
        raise ValueError(f"native.values draws element indices below 2**32, got indices up to {stop - 1}")


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


def apply_bits(mask: torch.Tensor, index: torch.Tensor, selected: torch.Tensor, scores: torch.Tensor) -> None:
    """``mask.view(-1)[index] = selected`` and ``scores = where(selected, 1.0, 0.5)`` for contiguous CPU
    tensors (bool mask, int32 index, bool selected, float32 scores, one entry per free weight), in one
    pass on the pool; both tensors' version counters are bumped as an in-place torch write would."""
    k = kernels()
    m, i, sel, sc = mask.view(-1).numpy(), index.numpy(), selected.numpy(), scores.view(-1).numpy()
    fn = k["apply_bits"]
    _parallel(i.shape[0], lambda a, b: fn(m, i, sel, sc, a, b))
    torch.autograd.graph.increment_version(mask)
    torch.autograd.graph.increment_version(scores)


def free_gradient(grad: torch.Tensor, weight: torch.Tensor, index: torch.Tensor, scores: torch.Tensor,
                  scale: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``grad[index] * weight[index] * scale * sign(scores)`` (1-D, float32) in one pass, the bits of
    the torch path (``nn/functional.py``), or None where the kernel does not apply: it takes
    contiguous float32 CPU tensors, an int32 index, and a float32 scale of one element."""
    k = kernels()
    if (k is None or not all(
            t.dtype == torch.float32 and t.is_contiguous() and t.device.type == "cpu" for t in (grad, weight, scores))
            or index.dtype != torch.int32 or (scale is not None and (scale.numel() != 1 or scale.dtype != torch.float32))):
        return None
    out = torch.empty(index.numel(), dtype=torch.float32)
    g, w, i, s, o = (t.reshape(-1).numpy() for t in (grad.detach(), weight.detach(), index, scores.detach(), out))
    factor = np.float32(scale.detach().reshape(1).numpy()[0] if scale is not None else 1.0)  # (no .item(): no sync op)
    # In the calling thread: a hand-off to the pool per layer costs more than it saves, and its threads
    # would compete with torch's, which the backward's next operator wakes (benchmarks/README.md).
    k["free_gradient"](g, w, i, s, factor, scale is not None, o)
    return out


# -- many layers at once: one hand-off to the pool for a whole model ---------------------------
def run_pieces(jobs: list) -> list:
    """``jobs``: ``(numel, fn)`` with ``fn(start, stop)`` doing part of a job.  Each job is cut into
    pieces (about two per thread for the largest), the pieces are dealt to the threads by size
    (largest first, to the least loaded) and each thread runs its pieces in one go: one pool
    hand-off for all jobs instead of one per layer.  Returns ``[[fn's result per piece, in
    order] per job]``."""
    total = sum(n for n, _ in jobs)
    threads = max(1, min(torch.get_num_threads(), total // _MIN_PARALLEL))
    piece = max(_MIN_PARALLEL, -(-total // (2 * threads)))
    pieces = []  # (job, piece index, start, stop)
    for j, (n, _) in enumerate(jobs):
        cuts = max(1, -(-n // piece))
        bounds = [n * c // cuts for c in range(cuts + 1)]
        pieces += [(j, c, a, b) for c, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]
    loads, plan = [0] * threads, [[] for _ in range(threads)]
    for item in sorted(pieces, key=lambda p: p[3] - p[2], reverse=True):
        t = loads.index(min(loads))
        plan[t].append(item)
        loads[t] += item[3] - item[2]
    results = [[None] * max(1, -(-n // piece)) for n, _ in jobs]

    def work(items):
        for j, c, a, b in items:
            results[j][c] = jobs[j][1](a, b)
    pool = _pool(threads)
    if pool is None:
        work(plan[0])
    else:
        for future in [pool.submit(work, items) for items in plan if items]:
            future.result()
    return results


def values_many(draws: list) -> list:
    """``values`` for many layers at once: ``draws`` holds ``(key, numel, rule, factor, dtype)``."""
    k = kernels()
    outs, jobs = [], []
    for key, numel, rule, factor, dtype in draws:
        _check_indices(numel)
        wide = dtype in (torch.float32, torch.float64)
        out = torch.empty(numel, dtype=dtype if wide else torch.float32)
        arr, (k0, k1, k2) = out.numpy(), (np.uint32(w) for w in key)
        in_range, _, tabled = k[rule]
        extra = (float(factor), k["table"]) if tabled else (float(factor),)
        jobs.append((numel, lambda a, b, fn=in_range, arr=arr, k0=k0, k1=k1, k2=k2, extra=extra:
                     fn(arr, a, b, k0, k1, k2, *extra)))
        outs.append((out, wide, dtype))
    run_pieces(jobs)
    return [out if wide else out.to(dtype) for out, wide, dtype in outs]


def codes_from_keys_many(layers: list) -> list:
    """``(code, n_pruned, n_locked)`` for each ``(key, numel, t1, t2)`` of ``layers``: the int8 code (flat)
    of a layer whose freeze keys are ``(t1, t2)`` (``pattern.freeze_keys``: element i, with key
    ``h * 2**32 + i``, is pruned if key < t1, locked if t1 <= key < t2), in one pass that hashes,
    compares and writes; no selection."""
    k = kernels()
    fn = k["hash_write_code"]
    codes, jobs = [], []
    for key, numel, t1, t2 in layers:
        k0, k1, k2 = (np.uint32(w) for w in key)
        th1, th2, tl1, tl2 = (np.uint32(t1 >> 32), np.uint32(t2 >> 32), np.uint32(t1 & 0xFFFFFFFF),
                              np.uint32(t2 & 0xFFFFFFFF))
        code = torch.empty(numel, dtype=torch.int8)
        arr = code.numpy()
        jobs.append((numel, lambda a, b, arr=arr, k0=k0, k1=k1, k2=k2, th1=th1, tl1=tl1, th2=th2, tl2=tl2:
                     fn(arr, a, b, k0, k1, k2, th1, tl1, th2, tl2)))
        codes.append(code)
    counts = run_pieces(jobs)
    return [(code, sum(c[0] for c in parts), sum(c[1] for c in parts)) for code, parts in zip(codes, counts)]


def free_positions_many(codes: list) -> list:
    """The row-major positions of the free (0) entries of each contiguous CPU int8 code, in order --
    ``(code.reshape(-1) == 0).nonzero().squeeze(1)`` -- in two pool hand-offs in all, as int32: the
    dtype of a layer's cached free index, so the positions of all layers together cost no more memory
    than those indexes."""
    k = kernels()
    arrays = [code.reshape(-1).numpy() for code in codes]
    count, write = k["count_free"], k["write_free"]
    counts = run_pieces([(arr.shape[0], lambda a, b, arr=arr: (a, count(arr, a, b))) for arr in arrays])
    outs, jobs = [], []
    for arr, parts in zip(arrays, counts):
        offsets = dict(zip((a for a, _ in parts), np.cumsum([0] + [n for _, n in parts])[:-1].tolist()))
        out = torch.empty(sum(n for _, n in parts), dtype=torch.int32)  # (layers have < 2**31 weights)
        res = out.numpy()
        jobs.append((arr.shape[0], lambda a, b, arr=arr, res=res, offsets=offsets: write(arr, a, b, res, offsets[a])))
        outs.append(out)
    run_pieces(jobs)
    return outs
