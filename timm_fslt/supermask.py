"""The ``FrozenSupermask`` parametrization and the group that keeps masks current.

A ``FrozenSupermask`` is attached with ``torch.nn.utils.parametrize`` to the
weight of a conv or linear layer, so the layer keeps its class and its own
forward (timm's ``Conv2dSame``/``StdConv2d`` padding and standardisation still
apply): reading ``layer.weight`` yields ``W * mask * scale``.  ``W`` is the random
weight, a buffer that never trains; ``scores`` is the only parameter.

The masks of all layers of one model belong to a ``SupermaskGroup``.  The group
notices that scores changed (their autograd version counters move whenever an
optimizer or ``load_state_dict`` writes them) at the next forward and recomputes
every mask at once: one selection for the whole model in ``global`` scope, one
per layer in ``layerwise`` scope.  No extra call is needed in a training loop.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import freezing
from .threshold import topk_mask

SCOPES = ("global", "layerwise")

# Fused optimizers (e.g. Adam(fused=True)) update parameters without moving their
# version counters, so every optimizer step also bumps this counter; a group
# whose last refresh predates a step recomputes its masks at the next forward.
_optimizer_steps = 0


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_post_hook(_count_optimizer_step)
SCALES = (None, "static", "dynamic")


class _MaskedWeight(torch.autograd.Function):
    """``W * mask * scale`` forward, straight-through estimator backward.

    The mask is chosen by ``|s|``, and the estimator treats the mask as the identity
    of ``|s|``: ``dL/d|s| = dL/dW_eff * W * scale``, so by the chain rule
    ``dL/ds = dL/dW_eff * W * scale * sign(s)`` (as Edge-Popup's reference does by
    selecting on ``scores.abs()`` inside autograd).
    """

    @staticmethod
    def forward(ctx, weight, scores, mask, scale):
        ctx.save_for_backward(weight, scores, scale)
        out = torch.where(mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))
        return out.mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        weight, scores, scale = ctx.saved_tensors
        grad_scores = (grad * weight).mul_(scale).mul_(torch.sign(scores))
        return None, grad_scores.to(scores.dtype), None, None


class FrozenSupermask(nn.Module):
    """Parametrization of one layer's weight: frozen code, scores and the current mask.

    Attributes:
        scores: learnable real-valued scores, same shape as the weight.
        frozen: int8 ternary code, -1 pruned, +1 locked, 0 free (searched).
        mask: bool, the current supermask (locked | selected free weights).
        layer_name: qualified name of the layer inside the frozen model (the RNG key).
    """

    def __init__(self, layer_name: str, scores: torch.Tensor, frozen: torch.Tensor):
        super().__init__()
        self.layer_name = layer_name
        self.scores = nn.Parameter(scores)
        self.register_buffer("frozen", frozen.to(torch.int8))
        self.register_buffer("mask", frozen == freezing.LOCKED, persistent=False)
        self.register_buffer("scale", torch.ones((), dtype=torch.float32, device=scores.device),
                             persistent=False)
        self.group: Optional[SupermaskGroup] = None
        self._seen_version = -1
        # Weights cut out by structural compaction (timm_fslt.compact) stay in the
        # sparsity budget (the kept ones like locked weights), so other masks do not move.
        self.removed_numel = 0
        self.removed_kept = 0

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        group = self.group
        if group is not None and not torch.compiler.is_compiling() and (
                self.scores._version != self._seen_version or group._seen_steps != _optimizer_steps):
            # Reached when this layer is called outside the root model's forward
            # (e.g. model.forward_features) right after an optimizer step.
            group.refresh()
        return _MaskedWeight.apply(weight, self.scores, self.mask, self.scale.to(weight.dtype))

    # -- counts -------------------------------------------------------------------
    @property
    def numel(self) -> int:
        return self.frozen.numel()

    def counts(self) -> dict:
        frozen = self.frozen
        pruned = int((frozen == freezing.PRUNED).sum())
        locked = int((frozen == freezing.LOCKED).sum())
        kept = int(self.mask.sum())
        return {"numel": frozen.numel(), "pruned": pruned, "locked": locked,
                "free": frozen.numel() - pruned - locked, "kept": kept}

    def extra_repr(self) -> str:
        return f"layer={self.layer_name!r}, shape={tuple(self.frozen.shape)}"


class SupermaskGroup:
    """All ``FrozenSupermask``s of one model and the rule that turns scores into masks."""

    def __init__(self, layers: list[FrozenSupermask], sparsity: float, scope: str,
                 scale: Optional[str]):
        self.layers = layers
        self._seen_steps = -1
        self.sparsity = sparsity
        self.scope = scope
        self.scale_mode = scale
        for layer in layers:
            layer.group = self
        self.refresh(force=True)

    def is_stale(self) -> bool:
        return self._seen_steps != _optimizer_steps or any(
            layer.scores._version != layer._seen_version for layer in self.layers)

    def kept_target(self) -> int:
        total = sum(layer.numel + layer.removed_numel for layer in self.layers)
        return freezing.round_half_up((1.0 - self.sparsity) * total)

    @torch.no_grad()
    def refresh(self, force: bool = False) -> None:
        """Recompute every mask from the current scores (no-op when nothing changed)."""
        if not force and not self.is_stale():
            return
        frees = [layer.frozen == freezing.FREE for layer in self.layers]
        values = [layer.scores.detach().abs()[free] for layer, free in zip(self.layers, frees)]
        if self.scope == "global":
            locked = sum(int((layer.frozen == freezing.LOCKED).sum()) + layer.removed_kept
                         for layer in self.layers)
            n_free = sum(v.numel() for v in values)
            k = min(max(self.kept_target() - locked, 0), n_free)
            flat = torch.cat([v.float() for v in values]) if values else torch.empty(0)
            selected = topk_mask(flat, k).split([v.numel() for v in values])
        else:
            selected = []
            for layer, v in zip(self.layers, values):
                locked = int((layer.frozen == freezing.LOCKED).sum()) + layer.removed_kept
                kept = freezing.round_half_up((1.0 - self.sparsity) * (layer.numel + layer.removed_numel))
                selected.append(topk_mask(v.float(), min(max(kept - locked, 0), v.numel())))
        for layer, free, sel in zip(self.layers, frees, selected):
            mask = layer.mask
            torch.eq(layer.frozen, freezing.LOCKED, out=mask)
            mask.masked_scatter_(free, sel)
            if self.scale_mode == "static":
                layer.scale.fill_(1.0 / math.sqrt(max(1.0 - self.sparsity, 1e-12)))
            elif self.scale_mode == "dynamic":
                density = (int(mask.sum()) + layer.removed_kept) / max(layer.numel + layer.removed_numel, 1)
                layer.scale.fill_(1.0 / math.sqrt(max(density, 1e-12)))
            else:
                layer.scale.fill_(1.0)
            layer._seen_version = layer.scores._version
        self._seen_steps = _optimizer_steps
