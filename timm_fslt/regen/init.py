"""The random values a layer gets: its frozen weight ``W`` and its initial scores.

Both are pure functions of ``(seed, layer name, stream, element index)`` drawn from
``timm_fslt.regen.rng``, so a ticket regenerates them from its seed alone.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from timm_fslt.regen import native, rng

WEIGHT_INITS = ("kaiming_uniform", "kaiming_normal", "signed_kaiming_constant")
SCORE_INITS = ("kaiming_normal", "kaiming_uniform")

_RELU_GAIN = math.sqrt(2.0)


def fan_in(shape: Sequence[int]) -> int:
    """torch's fan-in of a weight of this shape (conv: in/groups * kernel, linear: in)."""
    if len(shape) < 2:
        return max(int(shape[0]), 1) if shape else 1
    return int(shape[1]) * math.prod(shape[2:])


def random_weight(kind: str, seed: int, name: str, shape: Sequence[int], device=None,
                  dtype=torch.float32, stream: str = "weight",
                  positions: Optional[torch.Tensor] = None,
                  generator_version: int = rng.GENERATOR_VERSION) -> torch.Tensor:
    """Regenerable initial values for one layer (weights or scores).

    kaiming_uniform: U(-b, b), b = sqrt(2) * sqrt(3 / fan_in)
    kaiming_normal:  N(0, 2 / fan_in)
    signed_kaiming_constant: +-sqrt(2) / sqrt(fan_in), the sign a fair coin

    ``positions`` (row-major element indices, e.g. of the free weights): only those
    values, 1-D, bit-identical to ``random_weight(...).reshape(-1)[positions]``.

    Version 2 (``rng`` docstring): an exact integer per element times one float64
    constant -- ``(2h + 1 - 2**32) * (b * 2**-32)``, ``(+-1) * std``,
    ``(+-Z) * (std * 2**-38)`` -- rounded to float32 and then, for 16-bit dtypes, to
    ``dtype`` (torch's float64 -> bfloat16/float16 conversion also goes through
    float32; doing it explicitly keeps that a property of this code).  Version 1
    computed the uniform and signed values in float64 steps that are exact except
    for the same final multiplication, so they are bit-identical; only its normal
    differs (``rng.normal(..., version=1)``).
    """
    rng.check_version(generator_version)
    n = math.prod(shape)
    std = _RELU_GAIN / math.sqrt(fan_in(shape))  # Python floats: IEEE, correctly rounded everywhere
    if kind not in WEIGHT_INITS:
        raise ValueError(f"init must be one of {WEIGHT_INITS}, got {kind!r}")
    # Each generator chunk is scaled in float64 and rounded to `dtype` (the same bits
    # as scaling the whole float64 tensor, without holding it).
    if generator_version == 1:
        values = _draw_v1(kind, std, seed, name, stream, n, device, dtype, positions)
    else:
        integer, factor = _integer_rule(kind, std)
        if native.usable(device, dtype, n) is not None:  # the same bits, compiled (regen/native.py)
            rng.check_positions(positions, n)
            values = native.values(rng.stream_key(seed, name, stream), n, kind, factor, dtype, positions)
            return values if positions is not None else values.view(tuple(shape))
        wide = dtype in (torch.float64, torch.float32)

        def value(h):
            out = integer(h).to(torch.float64).mul_(factor)  # exact conversion, ONE rounding
            return out if wide else out.to(torch.float32)  # then float32 -> dtype when stored
        values = rng.bits(seed, name, stream, n, device, dtype=dtype, positions=positions, transform=value)
    return values if positions is not None else values.view(tuple(shape))


def random_weights_many(kind: str, seed: int, layers: Sequence[tuple], stream: str = "weight") -> list:
    """``random_weight(kind, seed, name, shape, "cpu", dtype, stream)`` (generator version 2) for every
    ``(name, shape, dtype)`` of ``layers`` at once, with the compiled kernels (``native.usable`` must
    hold for each): one hand-off to the thread pool for a whole model instead of one per layer."""
    if kind not in WEIGHT_INITS:
        raise ValueError(f"init must be one of {WEIGHT_INITS}, got {kind!r}")
    draws = []
    for name, shape, dtype in layers:
        _, factor = _integer_rule(kind, _RELU_GAIN / math.sqrt(fan_in(shape)))
        draws.append((rng.stream_key(seed, name, stream), math.prod(shape), kind, factor, dtype))
    return [values.view(tuple(shape)) for values, (_, shape, _) in zip(native.values_many(draws), layers)]


def _integer_rule(kind: str, std: float):
    """Version 2: ``(integer(h), factor)``, the value of hash ``h`` being ``integer(h) * factor``."""
    if kind == "kaiming_uniform":
        def integer(h):  # 2h + 1 - 2**32: odd, |.| < 2**32
            return h.mul_(2).add_(1 - (1 << 32))
        return integer, std * math.sqrt(3.0) * 2.0 ** -32  # the bound, times an exact power of two
    if kind == "kaiming_normal":
        return rng.normal_fixed, std * 2.0 ** -rng.NORMAL_FRAC

    def integer(h):  # bit 31: 1 -> +1, 0 -> -1
        return (h >> 31).mul_(2).sub_(1)
    return integer, std


def _draw_v1(kind: str, std: float, seed: int, name: str, stream: str, n: int, device, dtype,
             positions: Optional[torch.Tensor]) -> torch.Tensor:
    """Version 1's values, flat (kept so version-1 tickets load)."""
    if kind == "kaiming_uniform":
        bound = std * math.sqrt(3.0)
        return rng.uniform(seed, name, stream, n, device, dtype=dtype, positions=positions,
                           transform=lambda u: u.mul_(2.0).sub_(1.0).mul_(bound))
    if kind == "kaiming_normal":
        return rng.normal(seed, name, stream, n, device, dtype=dtype, positions=positions,
                          transform=lambda z: z.mul_(std), version=1)
    return rng.bits(seed, name, stream, n, device, dtype=dtype, positions=positions,
                    transform=lambda h: (h >> 31).to(torch.float64).mul_(2.0).sub_(1.0).mul_(std))


def regenerated_table(seed: int, name: str, shape: Sequence[int], std: float, device=None,
                      dtype=torch.float32, generator_version: int = rng.GENERATOR_VERSION) -> torch.Tensor:
    """A parameter that is regenerated rather than masked or stored (position and token tables,
    embeddings): N(0, std**2), keyed by its qualified name on the stream ``"table"``.

    Drawn exactly as ``kaiming_normal`` weights are (version 2: an exact integer per element
    times the float64 constant ``std * 2**-38``, rounded once to float32, then to ``dtype``).
    """
    rng.check_version(generator_version)
    if not (isinstance(std, float) and math.isfinite(std) and std > 0):
        raise ValueError(f"std must be a positive finite float, got {std!r}")
    n = math.prod(shape)
    if generator_version == 1:
        values = rng.normal(seed, name, "table", n, device, dtype=dtype,
                            transform=lambda z: z.mul_(std), version=1)
    else:
        factor = std * 2.0 ** -rng.NORMAL_FRAC
        if native.usable(device, dtype, n) is not None:
            return native.values(rng.stream_key(seed, name, "table"), n, "kaiming_normal", factor,
                                 dtype).view(tuple(shape))
        wide = dtype in (torch.float64, torch.float32)

        def value(h):
            out = rng.normal_fixed(h).to(torch.float64).mul_(factor)
            return out if wide else out.to(torch.float32)
        values = rng.bits(seed, name, "table", n, device, dtype=dtype, transform=value)
    return values.view(tuple(shape))
