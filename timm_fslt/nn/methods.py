"""What a search method other than plain Edge-Popup adds to a ``SupermaskGroup``'s refresh and to
its layers' forward (``nn/method_options.py`` says what each method is; this is how it runs).

``SearchMethod`` is the group's ``method``: None for Edge-Popup without a schedule, so the default
path runs exactly as before.  Its three hooks:

* ``before_refresh``: the scheduled sparsity for the group's step count (``nn/search_steps.py``);
* ``after_masks``: once the masks (the densest coat) are set -- by a refresh or by a ticket's bits
  -- the multicoated levels, and IteRand's re-randomization round when one is due;
* ``weight``: a layer's effective weight in the forward -- ``W * level * scale`` for multicoated
  (``_CoatedWeight``), ``W`` with its re-drawn entries for IteRand (``nn/iterand.py``).
"""
from __future__ import annotations

import torch

from timm_fslt.nn import iterand, search_steps
from timm_fslt.nn.functional import _free_values, masked_product
from timm_fslt.nn.method_options import needs_steps, scheduled_sparsity
from timm_fslt.regen import pattern as freezing
from timm_fslt.regen.topk import keys_topk_mask, magnitude_keys


class _CoatedWeight(torch.autograd.Function):
    """``W * level * scale`` forward (``level``: uint8, the number of coats holding each weight);
    backward: the straight-through estimator of every coat, summed.  Each coat's mask is treated as
    the identity of ``|s|`` (as for one Edge-Popup mask, ``functional._MaskedWeight``), so ``d level /
    d|s|`` is the number of coats ``C`` and ``dL/ds = C * dL/dW_eff * W * scale * sign(s)`` at the free
    positions ``index`` (as the multicoated supermasks' reference passes each coat's gradient through)."""

    @staticmethod
    def forward(ctx, weight, scores, level, scale, index, n_coats):
        ctx.save_for_backward(weight, scores, scale, index)
        ctx.n_coats = n_coats
        return masked_product(weight, level, scale)

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[1]:
            return None, None, None, None, None, None
        weight, scores, scale, index = ctx.saved_tensors
        if index is None:
            grad_scores = torch.mul(grad, weight).reshape(-1)
        else:
            grad_scores = _free_values(grad, index).mul_(_free_values(weight, index))
        if scale is not None:
            grad_scores.mul_(scale)
        grad_scores.mul_(float(ctx.n_coats)).mul_(torch.sign(scores.reshape(-1)))
        return None, grad_scores.to(scores.dtype).view(scores.shape), None, None, None, None


class SearchMethod:
    """A group's method state: plain Python values, copied and pickled with the group."""

    def __init__(self, config):
        self.name = config.method
        self.final_sparsity = config.sparsity
        self.schedule, self.schedule_steps = config.sparsity_schedule, config.schedule_steps
        self.coats = tuple(config.coat_sparsities) if config.method == "multicoated" else None
        self.counts_steps = needs_steps(config)
        if config.method == "iterand":
            self.rerand = iterand.Rerandomizer(config)
        else:
            self.rerand = None

    @staticmethod
    def applies(config) -> bool:
        return config.method != "edge_popup" or config.sparsity_schedule is not None

    def attach(self, group) -> None:
        """Called once the group exists: buffers for the step count and the rounds, the count watched."""
        if self.counts_steps:
            for layer in group.layers:
                search_steps.add_buffer(layer)
            search_steps.watch(group)
        if self.rerand is not None:
            for layer in group.layers:
                iterand.add_buffer(layer)
        group.sparsity = self.sparsity_at(getattr(group, "search_step", 0))

    def sparsity_at(self, step: int) -> float:
        return scheduled_sparsity(self.schedule, self.final_sparsity, self.schedule_steps, step)

    def coat_sparsities(self, group) -> tuple:
        """The coats' sparsities now: the densest one follows the schedule (``group.sparsity``)."""
        return (group.sparsity,) + self.coats[1:]

    def before_refresh(self, group) -> None:
        if self.schedule is not None:
            group.sparsity = self.sparsity_at(group.search_step)

    @torch.no_grad()
    def after_masks(self, group, frees: list) -> None:
        if self.coats is not None:
            self._write_levels(group, frees)
        if self.rerand is not None:
            self.rerand.maybe_round(group, frees)

    def _write_levels(self, group, frees: list) -> None:
        """Each layer's ``level`` (uint8, weight-shaped, not in the state dict): the locked weights
        are in every coat, the pruned in none, a free weight in coat 1 (its mask bit) and in each
        sparser coat whose selection over the same keys keeps it (ties: the lower position, as for the
        mask, so the coats nest)."""
        layers, n = group.layers, len(self.coats)
        sizes = [free.n_free for free in frees]
        levels = [layer.mask.reshape(-1)[free.index].to(torch.uint8) if free.index is not None
                  else layer.mask.reshape(-1).to(torch.uint8) for layer, free in zip(layers, frees)]
        if n > 1 and sum(sizes):
            flat = torch.cat([layer.scores.detach().reshape(-1).to(torch.float32) for layer in layers]).abs_()
            keys = magnitude_keys(flat)
            for sparsity in self.coat_sparsities(group)[1:]:
                counts = group.selected_counts(frees, sparsity)
                if group.scope == "global":
                    chosen = keys_topk_mask(keys, counts[0]).split(sizes)
                else:
                    chosen = [keys_topk_mask(part, k) for part, k in zip(keys.split(sizes), counts)]
                for level, sel in zip(levels, chosen):
                    level.add_(sel.to(level.device, torch.uint8))
        for layer, free, level in zip(layers, frees, levels):
            out = (layer.frozen == freezing.LOCKED).to(torch.uint8).contiguous().mul_(n)
            if free.index is None:
                out.copy_(level.view(out.shape))
            else:
                out.view(-1)[free.index.to(torch.int64)] = level
            layer.__dict__["level"] = out

    def weight(self, layer, weight: torch.Tensor, scale, index) -> tuple:
        """(the random weight the forward uses: IteRand's re-drawn entries written over a copy, the
        multicoated weight ``W * level * scale`` with its gradient, or None: the Edge-Popup product of
        that weight, which the layer computes itself, with its kept products and recomputation)."""
        if self.rerand is not None:
            weight = self.rerand.weight(layer, weight, index)
        if self.coats is None:
            return weight, None
        level = layer.__dict__.get("level")
        if level is None or level.shape != weight.shape or level.device != weight.device:
            layer.group.refresh(force=True)
            level = layer.__dict__["level"]
        return weight, _CoatedWeight.apply(weight, layer.scores, level, scale, index, len(self.coats))

    def traced_weight(self, layer, weight: torch.Tensor, scale) -> torch.Tensor:
        """The plain product for torch.jit.trace (real tensors): with the re-drawn entries and levels."""
        if self.rerand is not None:
            weight = self.rerand.weight(layer, weight, layer.free_index().index)
        factor = layer.__dict__["level"] if self.coats is not None else layer.mask
        out = weight * factor.to(weight.dtype)
        return out if scale is None else out * scale


def refuse_unsupported(group, what: str, iterand_too: bool = True) -> None:
    """Refuse (ValueError) ``what`` for a multicoated (or, if ``iterand_too``, an IteRand) group: it
    works on one mask bit per weight (and the seed's weights), and would lose the levels (the rounds)."""
    method = group.method
    if method is not None and (method.coats is not None or iterand_too and method.rerand is not None):
        raise ValueError(f"{what} supports method='edge_popup' only (with or without a sparsity_schedule); "
                         f"this model was frozen with method={method.name!r}")
