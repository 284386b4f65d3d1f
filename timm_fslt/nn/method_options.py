"""The search methods ``freeze(method=...)`` offers, their options, and the sparsity schedule.

* ``"edge_popup"`` (the default): one supermask, the top free scores by magnitude (Ramanujan et
  al. 2020), exactly what timm_fslt did before methods existed.
* ``"multicoated"`` (Okoshi et al., ICML 2022): ``coat_sparsities`` k_1 < k_2 < ... < k_C, each a
  supermask chosen from the same scores; a weight's effective value is ``W * level``, ``level``
  the number of coats it belongs to (0..C), times the group's scale.  Coats nest: a weight in a
  sparser coat is in every denser one.  The densest coat is the ticket's sparsity.
* ``"iterand"`` (Chijiwa et al., NeurIPS 2021): every ``rerand_period`` optimizer steps, each free
  weight the current mask leaves out is re-drawn with probability ``rerand_rate``, from the
  counter-based generator keyed by the round (``nn/iterand.py``).

In a frozen network every method searches the free weights only: pruned weights are out and
locked weights in for every coat and every round, and only free weights are ever re-drawn.

``sparsity_schedule=(shape, start, until)`` works with every method: the ticket's sparsity (for
multicoated, the densest coat's) is ``start`` before the first optimizer step and reaches the
configured sparsity after ``until * schedule_steps`` steps of the optimizer that holds the scores,
``linear`` or ``cosine`` in between; ``schedule_steps`` is the run's number of optimizer steps.
"""
from __future__ import annotations

import math
from typing import Optional

METHODS = ("edge_popup", "multicoated", "iterand")
SCHEDULE_SHAPES = ("linear", "cosine")
# Which option belongs to which method (every other method refuses it).
METHOD_OPTIONS = {"coat_sparsities": "multicoated", "rerand_period": "iterand", "rerand_rate": "iterand"}
DEFAULT_COATS = 2  # (3 coats with the demo net gave 78.6 against 92.8%: docs/methods_comparison.md)
DEFAULT_RERAND_PERIOD = 100
DEFAULT_RERAND_RATE = 0.1
MAX_COATS = 255  # a level is one byte
MAX_ROUNDS = (1 << 16) - 2  # an iterand ticket's symbol (0, or 1 + the round) fits the coder's 2**16 alphabet


def _real(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{what} must be a finite float, got {value!r}")
    return float(value)


def _positive_int(value, what: str, allowed: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int ({allowed}), got {value!r}")
    if value < 1:
        raise ValueError(f"{what} must be {allowed}, got {value}")
    return value


def default_coats(sparsity: float, lock: float, n: int = DEFAULT_COATS) -> tuple:
    """``n`` coat sparsities from ``sparsity`` towards ``1 - lock`` in equal steps (the last one
    below ``1 - lock``, so every coat keeps some free weights)."""
    hi = 1.0 - lock
    return tuple(sparsity + (hi - sparsity) * i / n for i in range(n))


def check_method_options(config) -> None:
    """Validate (and normalise to tuples) the method fields of a ``FreezeConfig``; raise
    ValueError/TypeError naming the option and what is allowed.  Runs before ``sparsity``'s
    default is filled in (``config.sparsity`` may be None)."""
    method = config.method
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    for option, owner in METHOD_OPTIONS.items():
        if getattr(config, option) is not None and method != owner:
            raise ValueError(f"{option} is an option of method={owner!r}, not of method={method!r}; "
                             f"drop it or pass method={owner!r}")
    lo, hi = config.prune, 1.0 - config.lock
    if config.coat_sparsities is not None:
        coats = config.coat_sparsities
        if isinstance(coats, (str, bytes)) or not hasattr(coats, "__len__"):
            raise TypeError(f"coat_sparsities must be a sequence of floats, got {coats!r}")
        coats = tuple(_real(c, "each coat sparsity") for c in coats)
        if not 1 <= len(coats) <= MAX_COATS:
            raise ValueError(f"coat_sparsities must hold 1 to {MAX_COATS} sparsities, got {len(coats)}")
        if any(not a < b for a, b in zip(coats, coats[1:])):
            raise ValueError(f"coat_sparsities must be strictly increasing (each coat sparser than the one "
                             f"before), got {list(coats)}")
        if not (lo - 1e-12 <= coats[0] and coats[-1] <= hi + 1e-12):
            raise ValueError(f"coat_sparsities must lie in [prune, 1 - lock] = [{lo:g}, {hi:g}], got {list(coats)}")
        if config.sparsity is not None and config.sparsity != coats[0]:
            raise ValueError(f"sparsity ({config.sparsity}) is the densest coat's sparsity under "
                             f"method='multicoated': leave it out or make it coat_sparsities[0] ({coats[0]})")
        config.coat_sparsities = coats
    if config.rerand_period is not None:
        _positive_int(config.rerand_period, "rerand_period", "a number of optimizer steps, at least 1")
    if config.rerand_rate is not None:
        rate = _real(config.rerand_rate, "rerand_rate")
        if not 0.0 < rate <= 1.0:
            raise ValueError(f"rerand_rate must lie in (0, 1] (the fraction of the pruned free weights "
                             f"re-drawn each round), got {rate}")
    _check_schedule(config, lo)


def _check_schedule(config, lo: float) -> None:
    schedule, steps = config.sparsity_schedule, config.schedule_steps
    if schedule is None:
        if steps is not None:
            raise ValueError("schedule_steps is the length of a sparsity_schedule; pass "
                             "sparsity_schedule=('linear' | 'cosine', start, until) with it, or drop it")
        return
    if isinstance(schedule, (str, bytes)) or not hasattr(schedule, "__len__") or len(schedule) != 3:
        raise ValueError(f"sparsity_schedule must be (shape, start, until) with shape one of "
                         f"{list(SCHEDULE_SHAPES)}, got {schedule!r}")
    shape, start, until = schedule
    if shape not in SCHEDULE_SHAPES:
        raise ValueError(f"sparsity_schedule's shape must be one of {list(SCHEDULE_SHAPES)}, got {shape!r}")
    start, until = _real(start, "sparsity_schedule's start"), _real(until, "sparsity_schedule's until")
    if not 0.0 < until <= 1.0:
        raise ValueError(f"sparsity_schedule's until is the fraction of schedule_steps by which the final sparsity "
                         f"is reached and must lie in (0, 1]; {until} ends outside the run")
    if steps is None:
        raise ValueError("sparsity_schedule needs schedule_steps, the run's number of optimizer steps "
                         "(e.g. epochs * batches per epoch)")
    _positive_int(steps, "schedule_steps", "the run's number of optimizer steps, at least 1")
    final = config.sparsity
    if final is None and config.coat_sparsities is not None:
        final = config.coat_sparsities[0]
    final = final if final is not None else (config.prune + 1.0 - config.lock) / 2.0
    if not lo - 1e-12 <= start <= final + 1e-12:
        raise ValueError(f"sparsity_schedule's start must lie in [prune, sparsity] = [{lo:g}, {final:g}] "
                         f"(the sparsity rises from start to the final one), got {start}")
    config.sparsity_schedule = (shape, start, until)


def fill_method_defaults(config) -> None:
    """After ``sparsity`` is known: the default coats and re-randomization options."""
    if config.method == "multicoated":
        if config.coat_sparsities is None:
            config.coat_sparsities = default_coats(config.sparsity, config.lock)
        config.sparsity = config.coat_sparsities[0]
    elif config.method == "iterand":
        if config.rerand_period is None:
            config.rerand_period = DEFAULT_RERAND_PERIOD
        if config.rerand_rate is None:
            config.rerand_rate = DEFAULT_RERAND_RATE


def scheduled_sparsity(schedule: Optional[tuple], final: float, steps: Optional[int], step: int) -> float:
    """The sparsity after ``step`` optimizer steps: ``final`` without a schedule or once ``until *
    steps`` steps are done; in between linear or cosine from ``start``.  Python float arithmetic
    (IEEE double, the same on every machine; ``math.cos`` is only used by the cosine shape)."""
    if schedule is None:
        return final
    shape, start, until = schedule
    end = until * steps
    if step >= end:
        return final
    t = step / end
    if shape == "cosine":
        t = 0.5 * (1.0 - math.cos(math.pi * t))
    return start + (final - start) * t


def needs_steps(config) -> bool:
    """Whether the group counts its optimizer steps (a schedule, or re-randomization rounds)."""
    return config.sparsity_schedule is not None or config.method == "iterand"
