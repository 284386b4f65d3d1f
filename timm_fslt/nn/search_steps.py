"""How many optimizer steps a group's search has taken, for sparsity schedules and IteRand rounds.

``freeze`` never sees the optimizer, so the count comes from torch's process-wide optimizer step
hook: every ``step()`` of an optimizer that holds one of the group's scores adds one (a step
skipped by a ``GradScaler`` after an overflow is not a step: it never calls ``step``).  Only groups
that need the count are watched (``watch``).  The count is kept in each layer's persistent buffer
``search_step`` (0-d int64), so a state dict, an Accelerate checkpoint or a ``torch.save`` of the
model carries it and a resumed run continues the schedule exactly; loading a state dict sets the
group's count from it (``FrozenSupermask._load_from_state_dict``).
"""
from __future__ import annotations

import weakref

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

_watched: "weakref.WeakSet" = weakref.WeakSet()
# optimizer -> (its parameter-list signature, ids of its parameters), rebuilt when the lists change
_held: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def watch(group) -> None:
    """Count ``group``'s optimizer steps from now on."""
    _watched.add(group)


def _parameter_ids(optimizer) -> set:
    groups = optimizer.param_groups
    signature = tuple((id(g["params"]), len(g["params"])) for g in groups)
    cached = _held.get(optimizer)
    if cached is None or cached[0] != signature:
        cached = (signature, {id(p) for g in groups for p in g["params"]})
        _held[optimizer] = cached
    return cached[1]


def _count(optimizer, args, kwargs) -> None:
    if not _watched:
        return
    ids = _parameter_ids(optimizer)
    for group in list(_watched):
        if any(id(layer.scores) in ids for layer in group.layers):
            set_step(group, group.search_step + 1)


register_optimizer_step_post_hook(_count)


@torch.no_grad()
def set_step(group, step: int) -> None:
    """Set the group's count and every layer's ``search_step`` buffer."""
    group.search_step = int(step)
    for layer in group.layers:
        buffer = layer._buffers.get("search_step")
        if buffer is not None:
            buffer.fill_(group.search_step)


def add_buffer(layer, step: int = 0) -> None:
    """Give a layer its persistent ``search_step`` buffer."""
    layer.register_buffer("search_step", torch.tensor(step, dtype=torch.int64, device=layer.frozen.device))
