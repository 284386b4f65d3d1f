"""Generates the integer tables of generator version 2's normal distribution.

Run once; paste the printed block into timm_fslt/reference_decoder.py (timm_fslt/rng.py
imports the table from there, so there is one copy):

    .venv/bin/python benchmarks/make_normal_tables.py > /tmp/tables.txt

The method (README "Seed regeneration", and ``rng.normal_fixed``): a 32-bit hash ``h``
gives the sign (bit 31) and an odd integer ``t = 2 * (h mod 2**31) + 1`` in [1, 2**32), the
upper-tail probability ``p = t / 2**33`` in (0, 1/2).  The value is ``+-Q(p)`` with
``Q(p) = Phi^{-1}(1 - p)``, the exact normal quantile, approximated by a polynomial per
segment.  Segments: ``k = clz32(t)`` (the octave ``p in [2**-(k+2), 2**-(k+1))``, so
segments get geometrically finer toward the tail: 32 octaves down to p = 2**-33) and the
3 bits after the leading one of ``t`` (8 equal parts of the octave): 256 segments.  In a
segment ``eta = y / 2**Y`` in [0, 1), ``y`` the remaining 28 bits of the normalised ``t``.

Each segment's degree-6 polynomial in ``eta`` interpolates Q at the 7 Chebyshev nodes of
[0, 1], computed with mpmath at 50 significant digits (no platform libm), then every
coefficient is rounded to an integer at scale 2**FRAC.  The evaluation is fixed-point
Horner, ``acc = C[i] + ((acc * y + 2**(Y-1)) >> Y)`` (arithmetic shift of the sum: round
to nearest, ties toward +inf), so the table is
checked here for |acc * y| < 2**63 at every step (|acc| bounded by the sum of the
coefficient magnitudes still to come, plus one unit per floor) and |Z| < 2**53 (so the
final int -> float64 conversion is exact).  The printed accuracy is measured by
evaluating that exact integer procedure at many integer inputs ``t`` per segment (all of
them in the short deep-tail segments) against mpmath's quantile.
"""
from __future__ import annotations

import mpmath as mp

mp.mp.dps = 50

SEG_BITS = 3  # 8 segments per octave
DEGREE = 6
Y = 31 - SEG_BITS  # bits of the in-segment coordinate y
HALF = 1 << (Y - 1)  # added before each shift: the shift rounds to nearest (ties up), not down
FRAC = 38  # fractional bits of the fixed-point coefficients and of the result
OCTAVES = 32


def quantile(p):
    """Q(p) = Phi^{-1}(1 - p) for p in (0, 1/2], to 50 digits."""
    return -mp.sqrt(2) * mp.erfinv(2 * mp.mpf(p) - 1)


def segment_p(k: int, j: int, eta):
    """The probability at in-segment position eta of segment (octave k, part j)."""
    return mp.mpf(2) ** -(k + 2) * (1 + (j + eta) / mp.mpf(1 << SEG_BITS))


def fit(k: int, j: int) -> list[int]:
    n = DEGREE + 1
    nodes = [(1 - mp.cos(mp.pi * (2 * i + 1) / (2 * n))) / 2 for i in range(n)]
    vander = mp.matrix([[e ** m for m in range(n)] for e in nodes])
    coeffs = mp.lu_solve(vander, mp.matrix([quantile(segment_p(k, j, e)) for e in nodes]))
    return [int(mp.nint(coeffs[m] * mp.mpf(2) ** FRAC)) for m in range(n)]


def evaluate(row: list[int], y: int) -> int:
    """The fixed-point Horner evaluation exactly as rng.py does it (Python ints)."""
    acc = row[DEGREE]
    for c in reversed(row[:DEGREE]):
        acc = c + ((acc * y + HALF) >> Y)
    return acc


def sample_t(k: int, j: int, count: int = 400) -> list[int]:
    """Odd integers t of segment (k, j): all of them if few, else `count` spread over it."""
    lo = (1 << (31 - k)) + (j << (31 - k - SEG_BITS)) if 31 - k - SEG_BITS >= 0 else None
    if lo is None:  # segments shorter than one step of t: only j = 0 holds values (t = 2**(31-k)..)
        lo_t, hi_t = (1 << (31 - k)), (1 << (32 - k))
        if j != 0:
            return []
        return [t for t in range(lo_t, hi_t) if t & 1 and t >> (31 - k) == 1 and
                ((t << k) >> (31 - SEG_BITS)) & ((1 << SEG_BITS) - 1) == j]
    hi = lo + (1 << (31 - k - SEG_BITS))
    odd = [t for t in range(lo | 1, hi, 2)] if hi - lo <= 2 * count else \
        sorted({(lo + (hi - lo) * i // count) | 1 for i in range(count)} | {lo | 1, (hi - 1) | 1})
    return [t for t in odd if lo <= t < hi]


def main() -> None:
    table, worst_abs, worst_rel, worst_at = [], mp.mpf(0), mp.mpf(0), None
    for k in range(OCTAVES):
        for j in range(1 << SEG_BITS):
            row = fit(k, j)
            # overflow bounds of the Horner steps (acc is multiplied by y < 2**Y)
            for i in range(1, DEGREE + 1):
                bound = sum(abs(c) for c in row[i:]) + (DEGREE - i + 1)
                assert bound * (1 << Y) + HALF < 1 << 63, (k, j, i, bound)
            assert sum(abs(c) for c in row) + DEGREE < 1 << 53, (k, j)
            for t in sample_t(k, j):
                x = t << k  # normalised: leading one at bit 31
                assert x >> 31 == 1 and (x >> Y) & ((1 << SEG_BITS) - 1) == j
                z = evaluate(row, x & ((1 << Y) - 1))
                exact = quantile(mp.mpf(t) / mp.mpf(2) ** 33)
                err = abs(mp.mpf(z) / mp.mpf(2) ** FRAC - exact)
                if err > worst_abs:
                    worst_abs, worst_at = err, t
                if exact >= 0.01:
                    worst_rel = max(worst_rel, err / exact)
            table.append(row)
    # monotone across segment boundaries: Q decreases as t grows
    for k in range(OCTAVES):
        for j in range(1 << SEG_BITS):
            seg = k * (1 << SEG_BITS) + j
            end = evaluate(table[seg], (1 << Y) - 1)
            if j == (1 << SEG_BITS) - 1 and k == 0:
                continue  # t = 2**32 - 1 ends the range
            nxt = (k - 1) * (1 << SEG_BITS) if j == (1 << SEG_BITS) - 1 else seg + 1  # next larger t
            assert evaluate(table[nxt], 0) <= end + 1, (k, j)
    print(f"# generated by benchmarks/make_normal_tables.py: {OCTAVES} octaves x {1 << SEG_BITS} segments,")
    print(f"# degree {DEGREE}, coefficients at scale 2**{FRAC}; measured max |z - Q(p)| = "
          f"{mp.nstr(worst_abs, 3)} (at t = {worst_at}), max relative (Q >= 0.01) {mp.nstr(worst_rel, 3)}")
    print("NORMAL_TABLE = (  # row k * 8 + j: C0 .. C6 of octave k, part j")
    for row in table:
        print("    (" + ", ".join(str(c) for c in row) + "),")
    print(")")


if __name__ == "__main__":
    main()
