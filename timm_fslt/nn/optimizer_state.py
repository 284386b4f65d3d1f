"""Optimizer state written when scores were 1-D (timm_fslt 0.2), viewed in the scores' row shape.

Registered process-wide at import (``timm_fslt.nn.supermask`` imports this module): before an
optimizer's first step and after each later ``load_state_dict``, its old-shaped state is viewed
as rows.  One dict lookup per step otherwise.
"""
from __future__ import annotations

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook


def upgrade_optimizer_state(optimizer) -> int:
    """View optimizer state written when scores were 1-D (timm_fslt 0.2) in the scores' row shape.

    A momentum buffer or moment estimate of shape ``(n,)`` for a parameter of shape ``(1, n)``
    (elementwise the same values) becomes a ``(1, n)`` view of itself; nothing else changes.
    Without it the optimizer's first step would fail broadcasting ``(n,)`` against ``(1, n)``.
    Runs by itself before an optimizer's first step and after every later ``load_state_dict``
    (process-wide hooks, below); returns how many state tensors it reshaped.
    """
    changed = 0
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param)
            if not state or param.dim() != 2 or param.shape[0] != 1:
                continue
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.dim() == 1 and value.shape[0] == param.shape[1]:
                    state[key] = value.view(param.shape)
                    changed += 1
    return changed


def _first_step_of_optimizer(optimizer, args, kwargs) -> None:
    # One dict lookup per step; on an optimizer's first step, its state (possibly just loaded from
    # an old checkpoint) is upgraded, and so is every state it loads later.
    if "_timm_fslt_state_hook" not in optimizer.__dict__:
        try:
            handle = optimizer.register_load_state_dict_post_hook(upgrade_optimizer_state)
        except AttributeError:  # (a subclass that skipped Optimizer.__init__: upgraded at its first step only)
            handle = None
        optimizer._timm_fslt_state_hook = handle
        upgrade_optimizer_state(optimizer)


register_optimizer_step_pre_hook(_first_step_of_optimizer)
