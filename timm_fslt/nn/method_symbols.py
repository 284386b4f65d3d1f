"""What a ticket stores per free weight for each search method: one *symbol*, in free order.

* Edge-Popup (with or without a sparsity schedule): the mask bit (alphabet 2).
* multicoated: the weight's level, the number of coats holding it, 0..C (alphabet C + 1).
* IteRand: 0 if the mask leaves the free weight out, else 1 + the round it was last drawn in
  (0: the seed's draw), alphabet ``max symbol + 1`` (at least 2).  A left-out weight's round changes
  no output, so it is not stored; that is all a ticket cannot regenerate.

``layer_symbols`` reads them from a group whose masks are current; ``apply_symbols`` sets a
(freshly rebuilt, ``refresh=False``) group from them: scores that the group's own selections map
to exactly these symbols, then ``set_selected``, so masks, scales and levels come out of the normal
path, and for IteRand the rounds of the kept weights.  ``set_search_step`` restores a group's
optimizer-step count (and with it a scheduled sparsity) before that.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from timm_fslt.nn import search_steps
from timm_fslt.nn.free_index import free_entries
from timm_fslt.nn.method_options import MAX_ROUNDS

def method_name(group) -> str:
    return "edge_popup" if group.method is None else group.method.name


def coats(group) -> int:
    """The number of coats (1 unless multicoated)."""
    return 1 if group.method is None or group.method.coats is None else len(group.method.coats)


def is_iterand(group) -> bool:
    return group.method is not None and group.method.rerand is not None


def stores_symbols(group) -> bool:
    """Whether the group's ticket is a method ticket (symbols, the step count: a newer format)."""
    return group.method is not None


@torch.no_grad()
def layer_symbols(group) -> list[torch.Tensor]:
    """Every layer's symbols (int32, free order, on the CPU); the masks must be current."""
    out = []
    for layer in group.layers:
        kept = free_entries(layer.mask, layer.frozen).to(torch.int32).cpu()
        if coats(group) > 1:
            out.append(free_entries(layer.__dict__["level"], layer.frozen).to(torch.int32).cpu())
        elif is_iterand(group):
            rounds = layer.rerand_round.to(torch.int32).cpu()
            out.append(torch.where(kept.bool(), rounds + 1, torch.zeros_like(rounds)))
        else:
            out.append(kept)
    return out


def symbol_counts(symbols: torch.Tensor) -> list:
    """``[[symbol, count], ...]`` of the symbols present in one layer's stream, increasing."""
    counts = torch.bincount(symbols.reshape(-1).to(torch.int64).cpu()) if symbols.numel() else torch.zeros(0)
    return [[int(v), int(counts[v])] for v in counts.nonzero().reshape(-1).tolist()]


def alphabet_of(group, symbols: Sequence[torch.Tensor]) -> int:
    """The method's alphabet: C + 1 (multicoated), max symbol + 1 but at least 2 (IteRand), 2."""
    if coats(group) > 1:
        return coats(group) + 1
    if is_iterand(group):
        top = max((int(s.max()) for s in symbols if s.numel()), default=0)
        return max(2, top + 1)
    return 2


def expected_alphabet(freeze: dict, alphabet: int) -> Optional[str]:
    """What is wrong with ``alphabet`` for a ticket's freeze settings (a dict), or None."""
    method = freeze.get("method", "edge_popup")
    if method == "multicoated":
        coats_ = freeze.get("coat_sparsities")
        if not isinstance(coats_, (list, tuple)):
            return f"a multicoated ticket lists its coat_sparsities, not {coats_!r}"
        n = len(coats_)
        return None if alphabet == n + 1 else f"a {n}-coat multicoated ticket has {n + 1} symbols, not {alphabet}"
    if method == "iterand":
        return None if 2 <= alphabet <= MAX_ROUNDS + 2 else \
            f"an IteRand ticket has 2 to {MAX_ROUNDS + 2} symbols, not {alphabet}"
    return None if alphabet == 2 else f"an Edge-Popup ticket has 2 symbols (mask bits), not {alphabet}"


def set_search_step(group, step: int) -> None:
    """The group's optimizer-step count, and the sparsity its schedule gives at that count."""
    search_steps.set_step(group, step)
    if group.method is not None:
        group.method.before_refresh(group)


def check_counts(group, symbols: Sequence[torch.Tensor]) -> Optional[str]:
    """Whether each coat j (symbols >= j) keeps exactly as many free weights as the group's selection
    at that coat's sparsity does (per layer in layerwise scope); a description of the first
    difference, or None.  Then the scores ``apply_symbols`` writes select exactly these symbols."""
    sparsities = group.method.coat_sparsities(group) if coats(group) > 1 else (group.sparsity,)
    for j, sparsity in enumerate(sparsities, start=1):
        stored = [int((s >= j).sum()) for s in symbols]
        want = group.selected_counts(None, sparsity)
        got = stored if group.scope == "layerwise" else [sum(stored)]
        if got != want:
            what = "the supermask" if len(sparsities) == 1 else f"coat {j}"
            return (f"{what} keeps {sum(got)} free weights but sparsity {sparsity} with scope {group.scope!r} "
                    f"selects {sum(want)}")
    return None


@torch.no_grad()
def apply_symbols(group, symbols: Sequence[torch.Tensor]) -> None:
    """Set a rebuilt group's masks (and levels, rounds) from its ticket's symbols (``check_counts``
    must have passed).  Scores: 0.5 for symbol 0, else the coat count (1.0 .. C) for multicoated or
    1.0 (every kept weight) otherwise: strictly increasing in the level, so every coat's top-k keeps
    exactly the weights of that level or more; all positive, so a search can continue."""
    many = coats(group) > 1
    selected = []
    for layer, sym in zip(group.layers, symbols):
        sym = sym.to(torch.int64)
        kept = sym >= 1
        level = sym.to(torch.float32) if many else kept.to(torch.float32)
        scores = layer.scores
        scores.view(-1).copy_(torch.where(kept, level, torch.full_like(level, 0.5)).to(scores.device, scores.dtype))
        selected.append(kept.to(layer.mask.device))
    group.set_selected(selected)
    if is_iterand(group):
        for layer, sym in zip(group.layers, symbols):
            rounds = layer.rerand_round
            rounds.copy_((sym.to(torch.int64) - 1).clamp_(min=0).to(rounds.device, rounds.dtype))
    if many:
        for layer, sym in zip(group.layers, symbols):
            level = free_entries(layer.__dict__["level"], layer.frozen).to(torch.int64).cpu()
            if not torch.equal(level, sym.to(torch.int64).cpu()):  # (cannot happen once check_counts passed)
                raise ValueError(f"layer {layer.layer_name!r}: the coats' selection does not give the stored levels")
