"""The numba kernels behind ``timm_fslt.regen.native`` (imported only when a kernel is needed:
importing this module imports numba).  Top-level functions, so numba's on-disk cache finds each one
in later processes (``cache=True``: machine code in ``__pycache__`` next to this file).

Every function reproduces ``timm_fslt.regen.rng``'s generator version 2 bit for bit; see
``native``'s docstring for the arithmetic and ``tests/test_native.py`` for the checks.
"""
import numpy as np
from numba import float64, int32, int64, njit, uint32
from numba.cpython.unsafe.numbers import leading_zeros

from timm_fslt.reference_decoder import NORMAL_TABLE

TABLE = np.ascontiguousarray(np.array(NORMAL_TABLE, dtype=np.int64).T)  # (7, 256): one row per coefficient
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
def normal_value(h, table):
    """kaiming_normal: +-Z of rng.normal_fixed as float64 (exact: |Z| < 2**53); t = 2 (h mod 2**31) + 1
    is odd, clz32(t) picks the octave, the next 3 bits the segment, a degree-6 Horner scheme the value."""
    t = uint32((h << np.uint32(1)) | np.uint32(1))
    k = int64(leading_zeros(t))
    x = int64(uint32(t << uint32(k)))
    seg = k * 8 + ((x >> 28) & 7)
    y = x & ((1 << 28) - 1)
    acc = table[6, seg]
    for col in range(5, -1, -1):
        acc = ((acc * y + half) >> 28) + table[col, seg]
    return float64(-acc if (h >> s31) else acc)


# One kernel per rule (no branch on the rule inside the loops, so they vectorise), for a range of
# element indices and for given positions; the value is rounded ONCE (the float64 product) and then
# stored in the output's dtype (float64, or float32 by round-to-nearest-even).


@njit(inline="always")
def uniform_value(h):  # kaiming_uniform: 2h + 1 - 2**32 = 2 (h - 2**31) + 1, h - 2**31 as int32
    return float64(int32(h ^ sign_bit)) * 2.0 + 1.0


@njit(inline="always")
def signed_value(h):  # signed constant: bit 31 set -> +1, else -1
    return 1.0 if (h >> s31) else -1.0


@njit(nogil=True, cache=True)
def uniform_range(out, start, stop, k0, k1, k2, factor):
    for j in range(start, stop):
        out[j] = uniform_value(hash32(int64(j), k0, k1, k2)) * factor


@njit(nogil=True, cache=True)
def uniform_at(out, positions, start, stop, k0, k1, k2, factor):
    for j in range(start, stop):
        out[j] = uniform_value(hash32(positions[j], k0, k1, k2)) * factor


@njit(nogil=True, cache=True)
def normal_range(out, start, stop, k0, k1, k2, factor, table):
    for j in range(start, stop):
        out[j] = normal_value(hash32(int64(j), k0, k1, k2), table) * factor


@njit(nogil=True, cache=True)
def normal_at(out, positions, start, stop, k0, k1, k2, factor, table):
    for j in range(start, stop):
        out[j] = normal_value(hash32(positions[j], k0, k1, k2), table) * factor


@njit(nogil=True, cache=True)
def signed_range(out, start, stop, k0, k1, k2, factor):
    for j in range(start, stop):
        out[j] = signed_value(hash32(int64(j), k0, k1, k2)) * factor


@njit(nogil=True, cache=True)
def signed_at(out, positions, start, stop, k0, k1, k2, factor):
    for j in range(start, stop):
        out[j] = signed_value(hash32(positions[j], k0, k1, k2)) * factor


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


@njit(nogil=True, cache=True)
def hash_write_code(code, start, stop, k0, k1, k2, th1, tl1, th2, tl2):
    # The code from freeze keys t = th * 2**32 + tl (uint32 halves): key < t iff h < th, or h == th and
    # i < tl; hashed on the fly, all in 32-bit lanes.  Returns the slice's pruned and locked counts.
    n_pruned = n_frozen = int32(0)
    for j in range(start, stop):
        x = hash32(int64(j), k0, k1, k2)
        i = uint32(j)
        pruned = int32(x < th1) | (int32(x == th1) & int32(i < tl1))
        frozen = int32(x < th2) | (int32(x == th2) & int32(i < tl2))
        code[j] = frozen - 2 * pruned
        n_pruned += pruned
        n_frozen += frozen
    return n_pruned, n_frozen - n_pruned


@njit(nogil=True, cache=True)
def count_free(code, start, stop):
    n = 0
    for j in range(start, stop):
        n += int64(code[j] == 0)
    return n


@njit(nogil=True, cache=True)
def write_free(code, start, stop, out, offset):
    # Branch-free (about a third of the codes are free, at random): every index is written to a
    # small local buffer and the cursor moves only past free ones; the buffer is copied per block.
    block = 4096
    buf = np.empty(block + 1, dtype=np.int64)
    m = offset
    for a in range(start, stop, block):
        b = min(a + block, stop)
        f = 0
        for j in range(a, b):
            buf[f] = j
            f += int64(code[j] == 0)
        out[m:m + f] = buf[:f]
        m += f


@njit(nogil=True, cache=True)
def apply_bits(mask, index, selected, scores, start, stop):
    # a ticket's bits into one layer: mask[index[f]] = bit f; scores 1.0 where set, 0.5 elsewhere
    for f in range(start, stop):
        bit = selected[f]
        mask[index[f]] = bit
        scores[f] = 1.0 if bit else 0.5


@njit(nogil=True, cache=True)
def free_gradient(grad, weight, index, scores, scale, scaled, out):
    # the scores' gradient of the straight-through estimator at the free positions, in one pass:
    # ((grad[j] * weight[j]) * scale) * sign(score), j = index[f] -- float32 products in torch's order
    # (torch.sign: +1, -1, and 0 for zeros and NaN: (s > 0) - (s < 0), branch-free so the loop vectorises;
    # from 0 over whole arrays: LLVM then drops the negative-index handling)
    factor = scale if scaled else np.float32(1.0)
    zero = np.float32(0.0)
    for f in range(index.shape[0]):
        j = index[f]
        s = scores[f]
        sign = np.float32(s > zero) - np.float32(s < zero)
        v = grad[j] * weight[j]
        if scaled:
            v = v * factor
        out[f] = v * sign




# -- the CPU mask refresh (regen/cpu_select.py): integer logic on the scores' float32 bits ---------
# Each kernel loops over a slice from 0 (an index known to be non-negative lets LLVM drop numba's
# negative-index handling and vectorise), with int32 counts (a layer has fewer than 2**31 weights).
@njit(inline="always")
def score_key(b):  # the ordered key of |score|: its bits without the sign, every NaN 0x7F800001
    key = b & np.int32(0x7FFFFFFF)
    return key if key < np.int32(0x7F800001) else np.int32(0x7F800001)


@njit(nogil=True, cache=True)
def band_scan(bits, start, stop, lo, hi, out, o_start, o_stop):
    # (the largest key, how many keys are above hi, how many lie in [lo, hi]); those copied, in
    # order, into out[o_start:o_stop] while they fit (the count goes on).  Each block of 64 keys
    # is counted by a vectorised loop (block-local counts: LLVM vectorises those); only the few
    # blocks holding a key of the (narrow) band are read again, by a scalar loop that copies it.
    b = bits[start:stop]
    n = b.shape[0]
    top, above, inside = np.int32(0), np.int32(0), np.int32(0)
    width = np.uint32(hi - lo)  # (lo <= key <= hi  <=>  key - lo <= hi - lo, unsigned)
    cap = o_stop - o_start
    for b0 in range(0, n, 64):
        block = b[b0:min(b0 + 64, n)]
        block_top, block_above, here = np.int32(0), np.int32(0), np.int32(0)
        for f in range(block.shape[0]):
            key = score_key(block[f])
            block_top = block_top if block_top > key else key
            block_above += np.int32(key > hi)
            here += np.int32(np.uint32(key - lo) <= width)
        top = top if top > block_top else block_top
        above += block_above
        if here:
            for f in range(block.shape[0]):
                key = score_key(block[f])
                if np.uint32(key - lo) <= width:
                    if inside < cap:
                        out[o_start + inside] = key
                    inside += 1
    return top, above, inside


@njit(inline="always")
def selected_bit(b, f, kth, last_tie):  # key above kth, or equal to it at f <= last_tie (ties lowest first)
    key = score_key(b[f])
    return np.uint8(key > kth) | (np.uint8(key == kth) & np.uint8(f <= last_tie))


@njit(inline="always")
def put(j, bit, mask, weight, product, scale, scaled, with_product):
    # one free weight's bit into the mask, and into the kept product W * mask * scale with
    # masked_product's float32 operations, (float(bit) * w) * scale
    mask[j] = bit
    if with_product:
        value = np.float32(bit) * weight[j]
        product[j] = value * scale if scaled else value


@njit(nogil=True, cache=True)
def write_selected(bits, sel, mask, index, start, stop, kth, last_tie, weight, product, scale, scaled,
                   with_product):
    # every free weight's bit into sel (its copy in free order) and the mask (mask[index[f]]: the
    # bool mask's bytes), and into the product where the mask changes; returns how many are selected
    b, s, at = bits[start:stop], sel[start:stop], index[start:stop]
    n = np.int32(0)
    for f in range(b.shape[0]):
        bit = selected_bit(b, f, kth, last_tie)
        j = np.uint32(at[f])
        if with_product and mask[j] != bit:
            put(j, bit, mask, weight, product, scale, scaled, True)
        mask[j] = bit
        s[f] = bit
        n += np.int32(bit)
    return n


@njit(nogil=True, cache=True)
def write_changes(bits, sel, mask, index, start, stop, kth, last_tie, weight, product, scale, scaled,
                  with_product):
    # write_selected where sel already holds the mask's bits: each block of 64 free weights is
    # compared with sel by a vectorised loop, and only the few blocks where a bit changes are
    # written (sel, mask, product), by a scalar loop
    b, s, at = bits[start:stop], sel[start:stop], index[start:stop]
    n_all = b.shape[0]
    n = np.int32(0)
    for b0 in range(0, n_all, 64):
        b1 = min(b0 + 64, n_all)
        block, old, last = b[b0:b1], s[b0:b1], last_tie - b0
        count, changed = np.int32(0), np.int32(0)
        for f in range(block.shape[0]):
            bit = selected_bit(block, f, kth, last)
            count += np.int32(bit)
            changed += np.int32(bit ^ old[f])
        n += count
        if changed:
            for f in range(block.shape[0]):
                bit = selected_bit(block, f, kth, last)
                if bit != old[f]:
                    old[f] = bit
                    put(np.uint32(at[b0 + f]), bit, mask, weight, product, scale, scaled, with_product)
    return n


@njit(nogil=True, cache=True)
def tie_position(bits, value, need):  # (where the need-th key equal to value is, or -1; how many were seen)
    seen = 0
    for f in range(bits.shape[0]):
        if score_key(bits[f]) == value:
            seen += 1
            if seen == need:
                return f, seen
    return -1, seen
