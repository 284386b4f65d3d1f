"""Format 6: the ticket of a search method (multicoated, IteRand, or any method with a sparsity schedule).

What such a ticket adds to format 5 (an Edge-Popup ticket without a schedule is still written as
format 4 or 5, byte for byte as before):

* config.json's ``mask`` record: ``alphabet`` (symbols per free weight: C + 1 for C coats, 1 + the
  highest stored IteRand round + 1, 2 for Edge-Popup with a schedule), ``symbols`` (the free
  weights), ``bits`` = ``symbols * ceil(log2(alphabet))`` (the raw payload's bits), ``method``,
  ``symbol`` (what a symbol means) and ``search_step``: the group's optimizer-step count when it was
  saved.  The loader restores that count, so a scheduled sparsity (and a static scale) is exactly
  the saved model's -- the final one once ``until * schedule_steps`` steps have run, the scheduled
  one if the run was saved earlier -- and a resumed IteRand search continues its rounds;
* each layer row: ``symbol_counts``, ``[[symbol, count], ...]`` of its present symbols (the entropy
  of the stored symbols, and a check of the decoded file);
* ``masked_digest`` is taken over the effective weight with signed zeros made +0: an IteRand
  ticket rebuilds a left-out weight's seed draw, not the value the run last drew for it, and
  ``value * 0`` keeps that value's sign.  Every nonzero entry -- every kept weight, re-drawn or not,
  times its level and scale -- is covered bit for bit; ``regen_digest`` still covers the seed's
  weight (which IteRand never changes) and the freezing code.
"""
from __future__ import annotations

from typing import Mapping, Optional

from timm_fslt import entropy
from timm_fslt.nn import method_symbols
from timm_fslt.nn.method_options import MAX_ROUNDS
from timm_fslt.ticket.mask_coding import alphabet_of, is_symbol_record

METHOD_VERSION = 6  # the first format version with symbols per free weight
MEANING = {
    "edge_popup": "the mask bit: 1 kept, 0 left out",
    "multicoated": "the number of coats holding the free weight (its level: 0 .. the number of coats)",
    "iterand": "0: left out by the mask; 1 + r: kept, drawn last in IteRand round r (0: the seed's draw; "
               "round r's value is weight_init's on the stream 'iterand/<r>')",
}


def is_method_config(freeze: Mapping) -> bool:
    """Whether a ticket's ``freeze`` settings need format 6 (a method or a sparsity schedule)."""
    return freeze.get("method", "edge_popup") != "edge_popup" or freeze.get("sparsity_schedule") is not None


SYMBOL_ORDER = ("layers in config order; free positions of each layer in row-major order; symbol i is the "
                "b-bit field at bits [i*b, i*b + b) of the payload, b = ceil(log2(alphabet)), bit j being bit "
                "(j % 8), least significant first, of byte j // 8; padding bits are 0")


def mask_fields(group, alphabet: int, n_free: int, coding: str) -> dict:
    """The format-6 fields of config.json's ``mask`` record (``coding``: the payload's)."""
    name = method_symbols.method_name(group)
    return {"bits": n_free * entropy.symbol_bits(alphabet), **({"order": SYMBOL_ORDER} if coding == "raw" else {}),
            "alphabet": alphabet, "symbols": n_free, "method": name, "symbol": MEANING[name],
            "search_step": int(group.search_step)}


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_method_record(config: Mapping, version: int) -> Optional[str]:
    """What is wrong with a ticket's method fields (mask record, layer symbol counts), or None."""
    mask, freeze, layers = config["mask"], config["freeze"], config["layers"]
    symbols = is_symbol_record(mask)
    if is_method_config(freeze) and version < METHOD_VERSION:
        return (f"method {freeze.get('method', 'edge_popup')!r} (or a sparsity schedule) needs format_version "
                f"{METHOD_VERSION}, the ticket has {version}")
    if symbols != (version >= METHOD_VERSION):
        return (f"format {version} " + ("records no alphabet (it stores a symbol per free weight)" if not symbols
                                        else f"has no symbols (an 'alphabet' came with format {METHOD_VERSION})"))
    if not symbols:
        return None
    alphabet = mask["alphabet"]
    if alphabet_of(mask) != alphabet or alphabet_of({"alphabet": alphabet}) != alphabet or alphabet < 2:
        return f"its alphabet {alphabet!r} is not an int in [2, {entropy.MAX_ALPHABET}]"
    problem = method_symbols.expected_alphabet(dict(freeze), alphabet)
    if problem is not None:
        return problem
    n_free = sum(row["free"] for row in layers)
    step = mask.get("search_step")
    if mask.get("symbols") != n_free or not _is_count(step):
        return f"'symbols' must be the {n_free} free weights and 'search_step' a step count"
    if freeze.get("method") == "iterand":
        period = freeze.get("rerand_period")
        if not (_is_count(period) and period >= 1) or alphabet - 2 > min(step // period, MAX_ROUNDS):
            return (f"its alphabet {alphabet} holds rounds up to {alphabet - 2}, but {step} steps of period "
                    f"{period!r} ran {step // period if _is_count(period) and period else '?'} rounds")
    for row in layers:
        counts = row.get("symbol_counts")
        if not (isinstance(counts, list) and all(isinstance(c, list) and len(c) == 2 and _is_count(c[0])
                                                 and _is_count(c[1]) and c[1] >= 1 for c in counts)):
            return f"layer {row['name']!r} needs 'symbol_counts', [[symbol, count], ...] of its present symbols"
        present = [c[0] for c in counts]
        if present != sorted(set(present)) or (present and present[-1] >= alphabet) \
                or sum(c[1] for c in counts) != row["free"] \
                or sum(c[1] for c in counts if c[0] >= 1) != row["kept"] - row["locked"]:
            return (f"layer {row['name']!r}: its symbol_counts must list increasing symbols below {alphabet} "
                    "counting its free weights, those >= 1 its kept free weights")
    return None
