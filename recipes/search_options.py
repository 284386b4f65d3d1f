"""The search method of a recipe's ticket and its options: the command line, the settings and the
``freeze`` arguments they become (``timm_fslt.frozen.FreezeConfig``'s method fields).

    --method edge_popup | multicoated | iterand     (``ticket`` = edge_popup; ``weights`` trains weights)
    --coat-sparsities K1 K2 ...                     multicoated: the coats, K1 < K2 < ... in [P, 1 - L]
    --rerand-period K --rerand-rate Q               iterand: every K optimizer steps, re-draw a share Q
    --sparsity-schedule SHAPE START UNTIL           any method: linear|cosine from START over UNTIL of the run
    --schedule-steps T                              the schedule's length (default: the run's optimizer steps)

In the settings ``method`` stays ``ticket`` or ``weights`` (what every recipe and the sweep test) and
``search_method`` is FreezeConfig's ``method``.  ``schedule_steps`` is computed, unless given, from
the epochs and the optimizer steps an epoch takes (``timm_fslt.training.steps``) once the train
set's size is known, and recorded with the other freeze settings in results.json and every
checkpoint's run_config.json.  A resumed run continues the schedule and the IteRand rounds: the
step count (``search_step``) and the rounds (``rerand_round``) are persistent buffers of the frozen
layers, so they are in the checkpoint's model file.
"""
from __future__ import annotations

import re
from typing import Optional

from accelerate import PartialState

from timm_fslt.nn.method_options import METHOD_OPTIONS, METHODS as SEARCH_METHODS
from timm_fslt.training import TrainConfig
from timm_fslt.training.steps import run_steps

# Recipe option (settings key) -> FreezeConfig field, for the method fields.
METHOD_KEYS = ("coat_sparsities", "rerand_period", "rerand_rate", "sparsity_schedule", "schedule_steps")
DEFAULTS = {**{k: None for k in METHOD_KEYS}, "search_method": "edge_popup"}
OPTION = {k: "--" + k.replace("_", "-") for k in METHOD_KEYS}


class OptionError(ValueError):
    """A method option that cannot be read (the recipe turns it into its RecipeError)."""


def add_options(g) -> None:
    g.add_argument("--coat-sparsities", dest="coat_sparsities", type=float, nargs="+", metavar="K",
                   help="--method multicoated: the coats' sparsities, strictly increasing in [P, 1 - L]; the "
                        "first is the ticket's sparsity (default: 3 coats from --sparsity towards 1 - L)")
    g.add_argument("--rerand-period", dest="rerand_period", type=int, metavar="K",
                   help="--method iterand: optimizer steps between re-randomization rounds (default 100)")
    g.add_argument("--rerand-rate", dest="rerand_rate", type=float, metavar="Q",
                   help="--method iterand: share of the left-out free weights re-drawn each round, in (0, 1] "
                        "(default 0.1)")
    g.add_argument("--sparsity-schedule", dest="sparsity_schedule", nargs=3, metavar=("SHAPE", "START", "UNTIL"),
                   help="linear|cosine: the ticket's sparsity rises from START (in [P, K]) to K over the first "
                        "UNTIL (in (0, 1]) of the run's optimizer steps")
    g.add_argument("--schedule-steps", dest="schedule_steps", type=int, metavar="T",
                   help="the sparsity schedule's length in optimizer steps (default: epochs x optimizer steps "
                        "per epoch of this run)")


def _schedule(value) -> Optional[tuple]:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 3:
        raise OptionError(f"--sparsity-schedule takes SHAPE START UNTIL (e.g. cosine 0.5 0.5), got {value!r}")
    shape, start, until = value
    try:
        return (str(shape), float(start), float(until))
    except (TypeError, ValueError):
        raise OptionError(f"--sparsity-schedule: START and UNTIL must be numbers, got {start!r} {until!r}") from None


def normalize(s: dict) -> None:
    """Split ``method`` into ``method`` (ticket | weights) and ``search_method``; the schedule as a
    tuple; a multicoated run's sparsity from its coats unless --sparsity is given."""
    method = s.get("method")
    if method in SEARCH_METHODS:
        s["method"], s["search_method"] = "ticket", method
    else:
        s["search_method"] = DEFAULTS["search_method"]
    s["sparsity_schedule"] = _schedule(s.get("sparsity_schedule"))
    if s.get("coat_sparsities") is not None:
        s["coat_sparsities"] = tuple(s["coat_sparsities"])
        if "sparsity" not in s.get("_explicit", ()):
            s["sparsity"] = None  # the preset's K gives way to the densest coat


def for_method(argv, method: str) -> list:
    """``argv`` without the options (and their values) of the other search methods: a sweep over
    methods passes e.g. ``--coat-sparsities`` to its multicoated runs only."""
    others = {OPTION[k] for k, owner in METHOD_OPTIONS.items() if owner != method}
    out, dropping = [], False
    for arg in argv:
        if arg.startswith("--"):
            dropping = arg.split("=", 1)[0] in others
        if not dropping:
            out.append(arg)
    return out


def given(s: dict) -> list:
    """The method options that are set (for refusing them under --method weights)."""
    return [OPTION[k] for k in METHOD_KEYS if s.get(k) is not None]


def freeze_kwargs(s: dict, base_keys, schedule_steps: Optional[int] = None) -> dict:
    """``freeze``'s keyword arguments: ``base_keys`` as they are, the method and its options.
    Without a known ``schedule_steps`` (checks before the data is read) a schedule gets 1 step."""
    out = {k: s[k] for k in base_keys}
    # (a settings dict that did not pass through ``normalize``: a search method may still be its method)
    out["method"] = s.get("search_method") or (s["method"] if s.get("method") in SEARCH_METHODS else "edge_popup")
    for k in METHOD_KEYS:
        out[k] = s.get(k)
    if out["sparsity_schedule"] is not None and out["schedule_steps"] is None:
        out["schedule_steps"] = schedule_steps or 1
    return out


def recorded(s: dict, base_keys, model) -> dict:
    """What results.json and run_config.json record of the freeze settings: ``base_keys`` as the
    recipe had them, and the method fields as the frozen model resolved them (the default coats,
    the computed schedule_steps), only where they are not Edge-Popup's defaults -- so an Edge-Popup
    run records what it did before methods existed, and its older checkpoints still resume."""
    resolved = model.fslt_config.to_dict()
    return {**{k: s[k] for k in base_keys},
            **{k: resolved[k] for k in ("method", *METHOD_KEYS) if k in resolved}}


def schedule_steps(s: dict, n_train: int, batched: bool = True) -> Optional[int]:
    """The run's optimizer steps (``epochs x steps per epoch``) when a schedule needs them and
    --schedule-steps is not given; else the given value (or None without a schedule)."""
    if s.get("sparsity_schedule") is None or s.get("schedule_steps") is not None:
        return s.get("schedule_steps")
    config = TrainConfig(epochs=s["epochs"], batch_size=s["batch_size"], grad_accum_steps=s["grad_accum"],
                         limit_train_batches=s["limit_train_batches"])
    return run_steps(n_train, config, batched=batched, num_processes=PartialState().num_processes)


_FIELDS = re.compile(r"\b(" + "|".join(METHOD_KEYS) + r")\b")
_METHOD_EQ = re.compile(r"method=('?)(\w+)\1")


def as_options(message: str) -> str:
    """A FreezeConfig message in the command line's words: ``coat_sparsities`` -> ``--coat-sparsities``,
    ``method='iterand'`` -> ``--method iterand``."""
    message = _METHOD_EQ.sub(lambda m: f"--method {m.group(2)}", message)
    message = _FIELDS.sub(lambda m: OPTION[m.group(1)], message)
    return message if message.startswith("--") else f"--{message}"


def output_tag(s: dict) -> str:
    """What a method adds to the default output folder's name ('' for Edge-Popup without a schedule)."""
    tag = "" if s["search_method"] == "edge_popup" else f"-{s['search_method']}"
    if s.get("sparsity_schedule") is not None:
        shape, start, until = s["sparsity_schedule"]
        tag += f"-{shape}{start:g}-{until:g}"
    return tag
