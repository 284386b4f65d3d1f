"""IteRand in a frozen network: re-drawn free weights, regenerable from their round.

Every ``rerand_period`` optimizer steps (round ``r = step // period``), each free weight that the
current mask leaves out is re-drawn with probability ``rerand_rate``.  Both draws come from the
counter-based generator, keyed by the round:

* the pick: the weight's 32-bit hash on the stream ``"iterand/pick/<r>"`` is below
  ``floor(rate * 2**32)`` (an integer comparison, exact everywhere);
* the new value: ``weight_init``'s value of that element on the stream ``"iterand/<r>"``
  (``regen.init.random_weight``, the bits of the first draw's rule).

A layer keeps, per free weight in free order, the round it was last re-drawn in (``rerand_round``,
a persistent int32 buffer; 0 = the first draw).  The random weight buffer itself never changes: the
forward uses it with the re-drawn entries written over a copy (``Rerandomizer.weight``, kept between
steps and rebuilt when the rounds change), so the state dict's weight stays the seed's, the rounds
say everything else, and a run resumed from a checkpoint (rounds, scores, step count) continues bit
for bit.  A ticket needs the round only where the mask keeps a free weight.
"""
from __future__ import annotations

import torch

from timm_fslt.nn.method_options import MAX_ROUNDS
from timm_fslt.regen import rng
from timm_fslt.regen.init import random_weight


def add_buffer(layer) -> None:
    n_free = layer.free_index().n_free
    layer.register_buffer("rerand_round", torch.zeros(n_free, dtype=torch.int32, device=layer.frozen.device))


def pick_threshold(rate: float) -> int:
    """A hash below this picks the weight: ``floor(rate * 2**32)`` (2**32 for rate 1: every weight)."""
    return int(rate * 4294967296.0)


class Rerandomizer:
    def __init__(self, config):
        self.period, self.threshold = config.rerand_period, pick_threshold(config.rerand_rate)
        self.seed, self.init, self.version = config.seed, config.weight_init, config.generator_version

    def picks(self, layer_key: str, round_: int, positions: torch.Tensor) -> torch.Tensor:
        """Which of the row-major ``positions`` round ``round_`` re-draws (bool)."""
        key = rng.stream_key(self.seed, layer_key, f"iterand/pick/{round_}")
        return rng.hash32(key, positions) < self.threshold

    def values(self, layer, round_: int, positions: torch.Tensor, dtype) -> torch.Tensor:
        """Round ``round_``'s new values of the layer's weights at ``positions``."""
        return random_weight(self.init, self.seed, layer.layer_name, tuple(layer.frozen.shape), positions.device,
                             dtype, stream=f"iterand/{round_}", positions=positions.to(torch.int64),
                             generator_version=self.version)

    @torch.no_grad()
    def maybe_round(self, group, frees: list) -> None:
        """Run round ``step // period`` if the step count is a multiple of the period and the round
        has not run at this count (it is idempotent anyway: the same picks, rounds and values)."""
        step = group.search_step
        if step == 0 or step % self.period or group.__dict__.get("_rerand_at") == step:
            return
        round_ = step // self.period
        if round_ > MAX_ROUNDS:
            raise RuntimeError(f"IteRand round {round_} exceeds the {MAX_ROUNDS} rounds a ticket can record; "
                               f"use a larger rerand_period")
        for layer, free in zip(group.layers, frees):
            rounds = layer.rerand_round
            if free.index is None:
                positions = torch.arange(free.n_free, device=rounds.device)
            else:
                positions = free.index.to(rounds.device, torch.int64)
            left_out = ~layer.mask.reshape(-1)[positions.to(layer.mask.device)].to(rounds.device)
            candidates = left_out.nonzero().squeeze(1)  # free order
            chosen = candidates[self.picks(layer.layer_name, round_, positions[candidates])]
            rounds.index_fill_(0, chosen, round_)
        group.__dict__["_rerand_at"] = step

    @torch.compiler.disable  # (run eagerly under torch.compile: a cache lookup, data-dependent sizes)
    def weight(self, layer, weight: torch.Tensor, index) -> torch.Tensor:
        """``weight`` with every re-drawn free entry set to its round's value (``weight`` itself when
        nothing was re-drawn); kept on the layer until the weight or the rounds change."""
        rounds = layer.rerand_round
        made = layer.__dict__.get("_redrawn")
        if made is not None and made[0] is weight and made[1] == weight._version and made[2] is rounds \
                and made[3] == rounds._version:
            return made[4]
        out = weight
        drawn = rounds.nonzero().squeeze(1)
        if drawn.numel():
            out = weight.detach().clone(memory_format=torch.contiguous_format)
            positions = drawn if index is None else index.to(rounds.device, torch.int64)[drawn]
            of_round = rounds[drawn]
            flat = out.view(-1)
            for round_ in torch.unique(of_round).tolist():
                where = positions[of_round == round_]
                flat.index_copy_(0, where.to(out.device), self.values(layer, round_, where, out.dtype).to(out.device))
        layer.__dict__["_redrawn"] = (weight, weight._version, rounds, rounds._version, out)
        return out
