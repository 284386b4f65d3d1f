"""Counter-based random numbers that regenerate bit-identically anywhere.

Every random value of a frozen network (weights, freezing pattern, initial scores)
is a pure function of ``(seed, layer name, stream, element index)``.  Nothing
depends on torch's global generator, the device, the thread count, the default
dtype or the torch release, so a ticket can be rebuilt from its seed on another
machine, on a GPU, or on an accelerator that regenerates weights on chip.

The generator (version ``GENERATOR_VERSION``), written so it can be reimplemented
in a few lines of C or RTL:

1. Key: ``sha256(f"{seed}/{name}/{stream}".encode())``; its first three
   little-endian 32-bit words are ``k0, k1, k2``.
2. Element ``i`` (0-based, row-major over the tensor) has ``lo = i mod 2**32`` and
   ``hi = i // 2**32``.  Its 32-bit hash is
   ``h = mix(mix(mix(lo ^ k0) ^ hi ^ k1) + k2 mod 2**32)`` where ``mix`` is the
   "lowbias32" integer finaliser::

       x ^= x >> 16; x = x * 0x7FEB352D mod 2**32
       x ^= x >> 15; x = x * 0x846CA68B mod 2**32
       x ^= x >> 16

3. Uniform in (0, 1): ``u = (h + 0.5) / 2**32`` (exact in float64).
4. Normal (Box-Muller, first output only): ``sqrt(-2 ln u1) * cos(2 pi u2)`` with
   ``u1`` from stream ``"<stream>/0"`` and ``u2`` from ``"<stream>/1"``. ``ln``
   and ``cos`` are fixed polynomials evaluated with float64 ``+ - * /`` and
   ``sqrt`` only (all correctly rounded by IEEE 754), one torch op at a time, so
   no device-specific libm or fused multiply-add can change a bit.
5. Every value is computed in float64 and rounded once to the target dtype.

All integer work stays below 2**63 so it is exact in int64 tensors on every
backend (32x32-bit products are split into 16-bit halves).
"""
from __future__ import annotations

import hashlib
import math
import struct

import torch

GENERATOR_VERSION = 1
_M32 = 0xFFFFFFFF
_CHUNK = 1 << 22  # elements per chunk: bounds the int64 temporaries to ~32 MB each


def stream_key(seed: int, name: str, stream: str) -> tuple[int, int, int]:
    """The three 32-bit key words for one (seed, layer, stream)."""
    digest = hashlib.sha256(f"{int(seed)}/{name}/{stream}".encode("utf-8")).digest()
    return struct.unpack("<3I", digest[:12])


def _mulmod32(x: torch.Tensor, c: int) -> torch.Tensor:
    # x < 2**32 and c < 2**32: split c so no int64 product can overflow.
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _mix(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mulmod32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mulmod32(x, 0x846CA68B)
    return x ^ (x >> 16)


def hash32(key: tuple[int, int, int], index: torch.Tensor) -> torch.Tensor:
    """32-bit hash (as int64 in [0, 2**32)) of each element index under ``key``."""
    k0, k1, k2 = key
    lo = index & _M32
    hi = index >> 32
    x = _mix(lo ^ k0)
    x = _mix(x ^ hi ^ k1)
    return _mix((x + k2) & _M32)


def _chunked(numel: int, device, fn) -> torch.Tensor:
    parts = []
    for start in range(0, numel, _CHUNK):
        idx = torch.arange(start, min(numel, start + _CHUNK), dtype=torch.int64, device=device)
        parts.append(fn(idx))
    if not parts:
        return fn(torch.arange(0, dtype=torch.int64, device=device))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def bits(seed: int, name: str, stream: str, numel: int, device=None) -> torch.Tensor:
    """``numel`` 32-bit hashes (int64 tensor) for one stream of one layer."""
    key = stream_key(seed, name, stream)
    return _chunked(numel, device, lambda idx: hash32(key, idx))


def _unit(h: torch.Tensor) -> torch.Tensor:
    return (h.to(torch.float64) + 0.5) * (1.0 / 4294967296.0)


def uniform(seed: int, name: str, stream: str, numel: int, device=None) -> torch.Tensor:
    """Float64 values in (0, 1), exactly representable, one per element."""
    return _unit(bits(seed, name, stream, numel, device))


# Polynomial pieces for ln and cos/sin, evaluated with plain float64 arithmetic.
_LN2 = 0.6931471805599453
_SQRT_HALF = 0.7071067811865476
_HALF_PI = 1.5707963267948966


def _horner(z: torch.Tensor, coeffs: list[float]) -> torch.Tensor:
    # Separate mul and add ops: never fused into an FMA, so every backend rounds alike.
    acc = torch.full_like(z, coeffs[-1])
    for c in reversed(coeffs[:-1]):
        acc = torch.add(torch.mul(acc, z), c)
    return acc


_ATANH_COEFFS = [1.0 / (2 * k + 1) for k in range(12)]  # z + z^3/3 + ... + z^23/23
_COS_COEFFS = [(-1.0) ** k / math.factorial(2 * k) for k in range(13)]
_SIN_COEFFS = [(-1.0) ** k / math.factorial(2 * k + 1) for k in range(13)]


def _ln(u: torch.Tensor) -> torch.Tensor:
    """Natural log of float64 values in (0, 1] using only exact-rounding ops."""
    m, e = torch.frexp(u)  # u = m * 2**e, m in [0.5, 1)
    small = m < _SQRT_HALF
    m = torch.where(small, m * 2.0, m)  # exact
    e = torch.where(small, e - 1, e).to(torch.float64)
    z = torch.div(torch.sub(m, 1.0), torch.add(m, 1.0))  # |z| <= 0.172
    series = torch.mul(_horner(torch.mul(z, z), _ATANH_COEFFS), z)
    return torch.add(torch.mul(e, _LN2), torch.mul(series, 2.0))


def _cos_turn(h: torch.Tensor) -> torch.Tensor:
    """cos(2*pi*u) for u = (h + 0.5) / 2**32, with the quadrant taken exactly from h's top bits."""
    quadrant = h >> 30
    frac = ((h & 0x3FFFFFFF).to(torch.float64) + 0.5) * (1.0 / 1073741824.0)
    a = torch.mul(frac, _HALF_PI)  # in (0, pi/2)
    a2 = torch.mul(a, a)
    cos_a = _horner(a2, _COS_COEFFS)
    sin_a = torch.mul(_horner(a2, _SIN_COEFFS), a)
    return torch.where(quadrant == 0, cos_a,
           torch.where(quadrant == 1, -sin_a,
           torch.where(quadrant == 2, -cos_a, sin_a)))


def normal(seed: int, name: str, stream: str, numel: int, device=None) -> torch.Tensor:
    """Standard-normal float64 values (Box-Muller), one per element."""
    k_r = stream_key(seed, name, stream + "/0")
    k_t = stream_key(seed, name, stream + "/1")

    def draw(idx):
        u1 = _unit(hash32(k_r, idx))
        radius = torch.sqrt(torch.mul(_ln(u1), -2.0))
        return torch.mul(radius, _cos_turn(hash32(k_t, idx)))

    return _chunked(numel, device, draw)
