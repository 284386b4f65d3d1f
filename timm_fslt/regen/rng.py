"""Counter-based random numbers that regenerate bit-identically anywhere.

Every random value of a frozen network (weights, freezing pattern, initial scores)
is a pure function of ``(seed, layer name, stream, element index)``.  Nothing
depends on torch's global generator, the device, the thread count, the default
dtype or the torch release, so a ticket can be rebuilt from its seed on another
machine, on a GPU, or on an accelerator that regenerates weights on chip.

Generator version 2 (``GENERATOR_VERSION``, the default) computes every value with
integer tensor ops only (add, multiply, xor, and, or, shifts, compares, table look-up
on int64: exact on every backend) up to ONE final conversion: an integer below 2**53
to float64 (exact), times a Python-computed float64 constant (one IEEE multiplication,
one rounding), then round-to-nearest-even to float32 and, for bfloat16/float16
layers, from float32 to that dtype.  No sqrt, log, exp, trig or fused op touches a
value, so the bits do not depend on a CPU's or GPU's libm.

1. Key: ``sha256(f"{seed}/{name}/{stream}".encode())``; its first three
   little-endian 32-bit words are ``k0, k1, k2``.
2. Element ``i`` (0-based, row-major over the tensor) has ``lo = i mod 2**32`` and
   ``hi = i // 2**32``.  Its 32-bit hash is
   ``h = mix(mix(mix(lo ^ k0) ^ hi ^ k1) + k2 mod 2**32)`` where ``mix`` is the
   "lowbias32" integer finaliser::

       x ^= x >> 16; x = x * 0x7FEB352D mod 2**32
       x ^= x >> 15; x = x * 0x846CA68B mod 2**32
       x ^= x >> 16

3. Uniform in (0, 1): ``u = (h + 0.5) / 2**32``, i.e. the odd integer ``2h + 1`` times
   2**-33 (exact in float64).
4. Normal (version 2, ``normal_fixed``): the sign is bit 31 of ``h`` (1: negative);
   ``t = 2 (h mod 2**31) + 1`` is odd in [1, 2**32) and ``p = t / 2**33`` in (0, 1/2)
   the upper-tail probability.  ``|z| = Q(p) = Phi^{-1}(1 - p)`` is a piecewise
   polynomial in fixed point: ``k = clz32(t)`` picks the octave, the 3 bits after
   the leading one of ``t`` one of 8 parts of it (256 segments, finer toward the
   tail), and a degree-6 integer Horner scheme over the remaining 28 bits gives
   ``Z ~ Q(p) * 2**38`` (max |error| 1.24e-11 measured, 2.6e-11 bound;
   tables and their construction in ``benchmarks/make_normal_tables.py``).  The value
   is ``+-Z * 2**-38``.
   Version 1 used Box-Muller with float64 ``sqrt`` (not correctly rounded by torch on
   every CPU); it is kept (``normal(..., version=1)``) so version-1 tickets load.
5. Weights (``timm_fslt.regen.init.random_weight``) are an integer times a constant:
   ``(2h + 1 - 2**32) * (bound * 2**-32)`` (uniform), ``(+-1) * std`` (signed constant,
   sign from bit 31), ``+-Z * (std * 2**-38)`` (normal), each ONE float64 multiplication.

All integer work stays below 2**63 so it is exact in int64 tensors on every
backend: a product ``x * c`` (``x < 2**32``) uses ``c`` itself when ``c < 2**31`` and
``c - 2**32`` otherwise, so its magnitude stays below 2**63, and the low 32 bits of
the two's-complement result are ``x * c mod 2**32``; the normal's Horner products are
bounded by the table generator (``|acc * y| < 2**63``).

Speed (same bits): the work runs in chunks small enough to stay in the CPU cache,
with in-place tensor ops, so a ResNet-50 regenerates in seconds.
"""
from __future__ import annotations

import hashlib
import math
import struct
from typing import Callable, Optional

import torch

from timm_fslt.reference_decoder import NORMAL_TABLE as _NORMAL_TABLE

GENERATOR_VERSION = 2
GENERATOR_VERSIONS = (1, 2)  # what this release regenerates (1: the version-1 normal is CPU-dependent)
_M32 = 0xFFFFFFFF
_CHUNK = 1 << 18  # elements per chunk on the CPU: int64/float64 temporaries of 2 MB stay in cache
_CHUNK_ACCELERATOR = 1 << 22  # on a GPU, fewer and larger kernels are what counts


def stream_key(seed: int, name: str, stream: str) -> tuple[int, int, int]:
    """The three 32-bit key words for one (seed, layer, stream)."""
    digest = hashlib.sha256(f"{int(seed)}/{name}/{stream}".encode("utf-8")).digest()
    return struct.unpack("<3I", digest[:12])


def _signed(c: int) -> int:
    """``c`` or ``c - 2**32``, whichever has magnitude below 2**31 (same value mod 2**32)."""
    return c if c < 1 << 31 else c - (1 << 32)


_MIX_C1, _MIX_C2 = _signed(0x7FEB352D), _signed(0x846CA68B)


def _mix_(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 values in [0, 2**32), in place."""
    x.bitwise_xor_(x >> 16)
    x.mul_(_MIX_C1).bitwise_and_(_M32)  # |x * c| < 2**63: exact, low 32 bits kept
    x.bitwise_xor_(x >> 15)
    x.mul_(_MIX_C2).bitwise_and_(_M32)
    return x.bitwise_xor_(x >> 16)


def _hash_(x: torch.Tensor, key: tuple[int, int, int], hi: Optional[torch.Tensor] = None) -> torch.Tensor:
    """In place: ``x`` holds ``lo ^ k0`` on entry and the 32-bit hash on return."""
    _mix_(x)
    if hi is not None:
        x.bitwise_xor_(hi)
    _mix_(x.bitwise_xor_(key[1]))
    return _mix_(x.add_(key[2]).bitwise_and_(_M32))


def hash32(key: tuple[int, int, int], index: torch.Tensor) -> torch.Tensor:
    """32-bit hash (as int64 in [0, 2**32)) of each element index under ``key``."""
    index = index.to(torch.int64)
    return _hash_((index & _M32).bitwise_xor_(key[0]), key, index >> 32)


def _hash_range(key: tuple[int, int, int], start: int, stop: int, device) -> torch.Tensor:
    """Hashes of the indices ``start .. stop - 1`` (a fresh int64 tensor)."""
    index = torch.arange(start, stop, dtype=torch.int64, device=device)
    if stop > 1 << 32:
        return hash32(key, index)
    return _hash_(index.bitwise_xor_(key[0]), key)  # hi = 0 for every index


def _hasher(device, positions: Optional[torch.Tensor]) -> Callable:
    """``hashes(key, a, b)``: hashes of the a-th to (b-1)-th element drawn -- element indices
    ``a .. b - 1``, or ``positions[a:b]`` when only those positions are drawn."""
    if positions is None:
        return lambda key, a, b: _hash_range(key, a, b, device)
    return lambda key, a, b: hash32(key, positions[a:b].to(device=device, dtype=torch.int64))


def _fill(numel: int, dtype: torch.dtype, device, draw: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
    """``numel`` values made chunk by chunk; each chunk is converted once to ``dtype``."""
    out = torch.empty(numel, dtype=dtype, device=device)
    chunk = _CHUNK if out.device.type == "cpu" else _CHUNK_ACCELERATOR
    for start in range(0, numel, chunk):
        stop = min(numel, start + chunk)
        out[start:stop] = draw(start, stop)
    return out


Transform = Optional[Callable[[torch.Tensor], torch.Tensor]]


def check_positions(positions: Optional[torch.Tensor], numel: int) -> int:
    """How many values a draw makes: ``numel``, or one per entry of ``positions`` (ValueError unless 1-D integer)."""
    if positions is None:
        return numel
    if positions.dim() != 1 or positions.is_floating_point() or positions.dtype == torch.bool:
        raise ValueError(f"positions must be a 1-D integer tensor of element indices, got {positions.dtype} "
                         f"of shape {tuple(positions.shape)}")
    return positions.numel()


def bits(seed: int, name: str, stream: str, numel: int, device=None, *,
         dtype: torch.dtype = torch.int64, transform: Transform = None,
         positions: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``numel`` 32-bit hashes (int64 tensor) for one stream of one layer.

    ``transform`` (optional) maps each int64 chunk to the values to store, and
    ``dtype`` is the stored dtype: a layer's values are made without a full-size
    intermediate tensor.  ``positions``: only these element indices' values.
    """
    key = stream_key(seed, name, stream)
    transform = transform or (lambda h: h)
    numel, hashes = check_positions(positions, numel), _hasher(device, positions)
    return _fill(numel, dtype, device, lambda a, b: transform(hashes(key, a, b)))


def _unit_(h: torch.Tensor) -> torch.Tensor:
    return h.to(torch.float64).add_(0.5).mul_(1.0 / 4294967296.0)


def uniform(seed: int, name: str, stream: str, numel: int, device=None, *,
            dtype: torch.dtype = torch.float64, transform: Transform = None,
            positions: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Float64 values in (0, 1), exactly representable, one per element.

    ``transform`` maps each float64 chunk (in place is fine) before the single
    rounding to ``dtype``.  ``positions``: draw only the values of these element
    indices (the same bits as indexing the full draw, at their cost only).
    """
    transform = transform or (lambda u: u)
    return bits(seed, name, stream, numel, device, dtype=dtype, positions=positions,
                transform=lambda h: transform(_unit_(h)))


# Polynomial pieces for ln and cos/sin, evaluated with plain float64 arithmetic.
_LN2 = 0.6931471805599453
_SQRT_HALF = 0.7071067811865476
_HALF_PI = 1.5707963267948966


def _horner(z: torch.Tensor, coeffs: list[float]) -> torch.Tensor:
    """``(..(c[-1] z + c[-2]) z + ..) z + c[0]`` in a new tensor.

    Separate in-place mul and add ops: never fused into an FMA, so every backend
    rounds alike.  (``c * z`` equals ``z * c`` bit for bit, so starting from
    ``z * c[-1]`` is the same as from a tensor filled with ``c[-1]``.)
    """
    acc = torch.mul(z, coeffs[-1]).add_(coeffs[-2])
    for c in reversed(coeffs[:-2]):
        acc.mul_(z).add_(c)
    return acc


_ATANH_COEFFS = [1.0 / (2 * k + 1) for k in range(12)]  # z + z^3/3 + ... + z^23/23
_COS_COEFFS = [(-1.0) ** k / math.factorial(2 * k) for k in range(13)]
_SIN_COEFFS = [(-1.0) ** k / math.factorial(2 * k + 1) for k in range(13)]


def _ln_(u: torch.Tensor) -> torch.Tensor:
    """Natural log of float64 values in (0, 1] using only exact-rounding ops (``u`` is consumed)."""
    m, e = torch.frexp(u)  # u = m * 2**e, m in [0.5, 1)
    small = m < _SQRT_HALF
    m.add_(m * small)  # m * 2 where small (exact: m + m), m + 0 elsewhere
    e = e.sub_(small.to(e.dtype)).to(torch.float64)
    z = torch.sub(m, 1.0).div_(m.add_(1.0))  # (m - 1) / (m + 1), |z| <= 0.172
    series = _horner(torch.mul(z, z), _ATANH_COEFFS).mul_(z)
    return e.mul_(_LN2).add_(series.mul_(2.0))


def _cos_turn(h: torch.Tensor) -> torch.Tensor:
    """cos(2*pi*u) for u = (h + 0.5) / 2**32, with the quadrant taken exactly from h's top bits."""
    quadrant = h >> 30
    a = (h & 0x3FFFFFFF).to(torch.float64).add_(0.5).mul_(1.0 / 1073741824.0).mul_(_HALF_PI)  # in (0, pi/2)
    a2 = torch.mul(a, a)
    cos_a = _horner(a2, _COS_COEFFS)
    sin_a = _horner(a2, _SIN_COEFFS).mul_(a)
    # quadrant 0: cos, 1: -sin, 2: -cos, 3: sin; negating is exact, so flip the sign last
    out = torch.where((quadrant & 1).bool(), sin_a, cos_a)
    negative = ((quadrant ^ (quadrant >> 1)) & 1).bool()  # quadrants 1 and 2
    return torch.where(negative, out.neg(), out)


def _normal_v1(seed: int, name: str, stream: str, numel: int, device=None, *,
               dtype: torch.dtype = torch.float64, transform: Transform = None,
               positions: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Version 1: standard-normal float64 values (Box-Muller), one per element.

    Its ``sqrt_`` is torch's float64 sqrt, which is not correctly rounded on every CPU
    (it differs from IEEE sqrt on ~1% of inputs on some Intel Xeons), so these bits
    can differ between machines; version 2 does not use it.

    ``transform`` maps each float64 chunk (in place is fine) before the single
    rounding to ``dtype``.  ``positions``: draw only the values of these element
    indices (the same bits as indexing the full draw, at their cost only).
    """
    k_r = stream_key(seed, name, stream + "/0")
    k_t = stream_key(seed, name, stream + "/1")
    transform = transform or (lambda z: z)
    numel, hashes = check_positions(positions, numel), _hasher(device, positions)

    def draw(a: int, b: int) -> torch.Tensor:
        radius = _ln_(_unit_(hashes(k_r, a, b))).mul_(-2.0).sqrt_()
        return transform(radius.mul_(_cos_turn(hashes(k_t, a, b))))

    return _fill(numel, dtype, device, draw)


# -- version 2: the normal without float functions ---------------------------------------
_SEG_BITS = 3  # 8 parts per octave
_Y = 31 - _SEG_BITS  # bits of the in-segment coordinate
_HALF = 1 << (_Y - 1)  # added before each shift: round to nearest (ties up)
NORMAL_FRAC = 38  # Z = |z| * 2**38

# The 256 x 7 coefficient table (_NORMAL_TABLE, imported above) is the specification's: it
# lives in the reference decoder (timm_fslt/reference_decoder.py, generated by
# benchmarks/make_normal_tables.py with its accuracy figures), so the generator and the
# decoder that an accelerator team ports read one copy.
_NORMAL_COLUMNS: dict = {}  # device -> the table's 7 columns as int64 tensors


def _columns(device) -> list:
    key = str(device)
    cols = _NORMAL_COLUMNS.get(key)
    if cols is None:
        table = torch.tensor(_NORMAL_TABLE, dtype=torch.int64, device=device)
        cols = _NORMAL_COLUMNS[key] = [table[:, i].contiguous() for i in range(table.shape[1])]
    return cols


def normal_fixed(h: torch.Tensor) -> torch.Tensor:
    """``+-Z`` (int64, ``|Z| < 2**53``) for 32-bit hashes ``h`` (int64), integer ops only."""
    negative = (h >> 31).bool()
    x = (h & 0x7FFFFFFF).mul_(2).add_(1)  # t: odd, in [1, 2**32)
    k = torch.zeros_like(x)
    for b in (16, 8, 4, 2, 1):  # count leading zeros of t and normalise it: x = t << clz32(t)
        shift = (x < (1 << (32 - b))).to(torch.int64).mul_(b)  # b if the top b bits are all zero
        x.bitwise_left_shift_(shift)
        k.add_(shift)
    seg = k.mul_(1 << _SEG_BITS).add_((x >> _Y) & ((1 << _SEG_BITS) - 1))
    y = x.bitwise_and_((1 << _Y) - 1)
    cols = _columns(h.device)
    acc = cols[-1].take(seg)
    for col in reversed(cols[:-1]):  # acc = C_i + round(acc * y / 2**Y)
        acc = acc.mul_(y).add_(_HALF).bitwise_right_shift_(_Y).add_(col.take(seg))
    return acc.mul_(negative.to(torch.int64).mul_(-2).add_(1))  # times -1 where negative


def _normal_v2(seed: int, name: str, stream: str, numel: int, device=None, *,
               dtype: torch.dtype = torch.float64, transform: Transform = None,
               positions: Optional[torch.Tensor] = None) -> torch.Tensor:
    transform = transform or (lambda z: z)
    scale = 2.0 ** -NORMAL_FRAC  # exact: Z * 2**-38 is the float64 value, no rounding
    return bits(seed, name, stream, numel, device, dtype=dtype, positions=positions,
                transform=lambda h: transform(normal_fixed(h).to(torch.float64).mul_(scale)))


def normal(seed: int, name: str, stream: str, numel: int, device=None, *,
           dtype: torch.dtype = torch.float64, transform: Transform = None,
           positions: Optional[torch.Tensor] = None, version: int = GENERATOR_VERSION) -> torch.Tensor:
    """Standard-normal float64 values, one per element (see the module docstring).

    ``transform`` maps each float64 chunk (in place is fine) before the rounding to
    ``dtype``.  ``positions``: draw only the values of these element indices (the
    same bits as indexing the full draw, at their cost only).  ``version``: the
    generator version (2: integer inverse CDF, exact everywhere; 1: Box-Muller).
    """
    check_version(version)
    impl = _normal_v2 if version == 2 else _normal_v1
    return impl(seed, name, stream, numel, device, dtype=dtype, transform=transform, positions=positions)


def check_version(version) -> int:
    if isinstance(version, bool) or version not in GENERATOR_VERSIONS:
        raise ValueError(f"generator_version must be one of {list(GENERATOR_VERSIONS)}, got {version!r}")
    return version
