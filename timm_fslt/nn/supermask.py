"""The ``FrozenSupermask`` parametrization and the group that keeps masks current.

A ``FrozenSupermask`` is attached with ``torch.nn.utils.parametrize`` to the
weight of a conv or linear layer, so the layer keeps its class and its own
forward (timm's ``Conv2dSame``/``StdConv2d`` padding and standardisation still
apply): reading ``layer.weight`` yields ``W * mask * scale``.  ``W`` is the random
weight, a buffer that never trains; ``scores`` is the only parameter, and it holds
one score per FREE weight only (in row-major order of the free positions: the
order of a ticket's mask bits).  Pruned and locked weights never need a score, so
a 70%-frozen layer's scores, their gradient and the optimizer's state are 30% of
the weight's size.

The scores Parameter is one row, shape ``(1, n_free)`` (``free_scores`` is its 1-D
view; every computation reads that view, so the row changes no value).  A row
because optimizer factories decide weight decay by a parameter's shape: timm's
``create_optimizer_v2`` (``param_groups_weight_decay`` / ``_layer_decay``) puts every
parameter with ``ndim <= 1`` in the no-decay group as if it were a bias or a norm
gain, and offers no hook to opt one in; a score is a weight's stand-in and gets the
weights' decay (as in Edge-Popup, whose scores have the weight's shape).  A row,
not a column: it is what a 1-D tensor broadcasts to, so ``scores op free_values``
with a 1-D tensor of the free weights keeps its values and its size.  State dicts and
optimizer state from when scores were 1-D (timm_fslt 0.2) load into the row.

The masks of all layers of one model belong to a ``SupermaskGroup``.  The group
notices that scores changed (their autograd version counters move whenever an
optimizer or ``load_state_dict`` writes them) at the next forward and recomputes
every mask at once: one selection for the whole model in ``global`` scope, one
per layer in ``layerwise`` scope.  No extra call is needed in a training loop.

Per optimizer step: a linear-time selection over the free scores, writing the free positions only
(CPU: two compiled passes, ``nn/cpu_refresh.py``; GPUs: nothing read back, ``nn/sync_free.py``;
else ``regen/topk.py``), one product per layer in the forward, the backward at the free weights
only (``nn/functional.py``, ``nn/recompute.py``).  torch.export / torch.jit.trace record the plain
product with the current mask (refusing stale masks); torch.jit.script is refused.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from timm_fslt.nn import cpu_refresh, recompute
from timm_fslt.nn.free_index import _free_index_of, _free_shapes, _FreeIndex, free_entries, legacy_scores
from timm_fslt.nn.free_index import STEP_CACHES, cached_free_values, frozen_positions_written, long_index
from timm_fslt.nn.free_index import moved_caches, weight_shaped, write_magnitudes
from timm_fslt.nn.optimizer_state import upgrade_optimizer_state  # noqa: F401  (registers its hooks)
from timm_fslt.nn.functional import masked_weight, script_refusal, stale_refusal, traced_masked_weight
from timm_fslt.nn.sync_free import SyncFreeState, dynamic_scale, nonfinite_error
from timm_fslt.regen import pattern as freezing
from timm_fslt.regen.topk import keys_topk_mask, magnitude_keys, segment_sums, segments_topk_mask

SCOPES = ("global", "layerwise")
SCALES = (None, "static", "dynamic")

# Fused optimizers (e.g. Adam(fused=True)) update parameters without moving their
# version counters, so every optimizer step also bumps this counter; a group
# whose last refresh predates a step recomputes its masks at the next forward.
#
# The hook is process-wide (torch's global optimizer step hook, registered once at
# import) because freeze() never sees the optimizer: the user builds it afterwards,
# possibly several or wrapped (e.g. by accelerate).  It costs an integer increment per step of
# any optimizer; a step that did not touch a group's scores costs it one needless (identical) refresh.
_optimizer_steps = 0


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_post_hook(_count_optimizer_step)


class FrozenSupermask(nn.Module):
    """Parametrization of one layer's weight: frozen code, scores and the current mask.

    Attributes:
        scores: learnable real-valued scores of the free weights: shape ``(1, n_free)``,
            one per free weight in row-major order of their positions (``free_scores``:
            the same tensor 1-D; ``scores_like_weight()`` puts them in the weight's shape).
        frozen: int8 ternary code, -1 pruned, +1 locked, 0 free (searched).
        mask: bool, the current supermask (locked | selected free weights).
        layer_name: qualified name of the layer inside the frozen model (the RNG key).
    """

    def __init__(self, layer_name: str, scores: torch.Tensor, frozen: torch.Tensor,
                 free_positions: Optional[torch.Tensor] = None, n_locked: Optional[int] = None):
        """``scores``: weight-shaped (only the free positions are kept) or already free-only,
        ``(n_free,)`` or ``(1, n_free)``.  ``free_positions``: the row-major positions of ``frozen``'s
        free entries if the caller has them (``freeze`` does), so they are not searched again;
        ``n_locked`` with them: its count of locked entries, if known (it is not checked)."""
        super().__init__()
        self.layer_name = layer_name
        frozen = frozen.to(torch.int8)
        cached = None
        if free_positions is not None:
            cached = _free_index_of(frozen, free_positions, n_locked)
            n_free = cached.n_free
        else:
            n_free = int((frozen == freezing.FREE).sum())
        if tuple(scores.shape) == tuple(frozen.shape) and tuple(scores.shape) not in _free_shapes(n_free):
            scores = free_entries(scores, frozen)
        if tuple(scores.shape) not in _free_shapes(n_free):
            raise ValueError(f"scores of layer {layer_name!r} must have the weight's shape {tuple(frozen.shape)} "
                             f"or one entry per free weight ({n_free},), got {tuple(scores.shape)}")
        self.scores = nn.Parameter(scores.detach().reshape(1, n_free).contiguous())
        self.register_buffer("frozen", frozen)
        self.register_buffer("mask", frozen == freezing.LOCKED, persistent=False)
        self.register_buffer("scale", torch.ones((), dtype=torch.float32, device=scores.device),
                             persistent=False)
        self.group: Optional[SupermaskGroup] = None
        self._seen_version = -1
        # Weights cut out by structural compaction (timm_fslt.compact) stay in the
        # sparsity budget (the kept ones like locked weights), so other masks do not move.
        self.removed_numel = 0
        self.removed_kept = 0
        # Refresh caches (plain attributes, not buffers: they never reach a state_dict
        # or a pruner; they are rebuilt whenever `frozen` or `mask` is replaced or written).
        self._free: Optional[_FreeIndex] = cached
        # (mask, its version, _FreeIndex) last written: the mask holds the locked weights now
        self._mask_ready: Optional[tuple] = None if cached is None else (self.mask, self.mask._version, cached)
        self._scale_value: Optional[float] = None

    @property
    def free_scores(self) -> torch.Tensor:
        """The scores as a 1-D view (one per free weight, row-major): the same storage and version
        counter as ``scores``, so writing it writes the scores (and the masks follow)."""
        return self.scores.view(-1)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        group = self.group
        compiling = torch.compiler.is_compiling()  # (also True under torch.export)
        if torch.compiler.is_exporting() if compiling else torch._C._is_tracing():
            return self._traced_weight(weight)
        if group is not None and not compiling and (
                self.scores._version != self._seen_version or group._seen_steps != _optimizer_steps):
            group.refresh()  # (a layer called outside the root's forward, e.g. forward_features, after a step)
        scale = None if group is not None and group.scale_mode is None else self.scale.to(weight.dtype)
        # (compiled code reads the index the last refresh cached: refreshes run eagerly)
        index = (self._free if compiling else self.free_index()).index
        if group is not None and group.method is not None:  # IteRand's weights, multicoated (nn/methods.py)
            weight, coated = group.method.weight(self, weight, scale, index)
            if coated is not None:
                return coated
        plain = not compiling and group is not None and not recompute.is_recording()
        free_weight = cached_free_values(self, weight, index) if plain and index is not None \
            and group.caches_free_weights(weight) else None
        owner = self if plain and group.keeps_products(weight) else None  # (the product in kept memory)
        out = masked_weight(weight, self.scores, self.mask, scale, index, free_weight, owner)
        if not compiling and recompute.is_recording():  # inside recompute_masked_weights
            recompute.record(group, out, weight, self.scores, self.mask, scale, index, self.layer_name)
        return out

    def _traced_weight(self, weight: torch.Tensor) -> torch.Tensor:
        # torch.export / jit.trace: the plain product with the current mask (refused if out of date;
        # checked here too for a part of a model, e.g. model.features, exported by itself)
        if self.group is not None:
            self.group.check_traceable()
        scale = None if self.group is not None and self.group.scale_mode is None else self.scale.to(weight.dtype)
        if self.group is not None and self.group.method is not None:
            return self.group.method.traced_weight(self, weight, scale)
        return traced_masked_weight(weight, self.mask, scale)

    def _masks_current(self) -> bool:
        """Whether the mask is from the scores as they are, judged by the last refresh's scores tensor
        (under torch.export the module's are fake copies), and no optimizer stepped since."""
        seen = self.__dict__.get("_seen_scores")
        return (self.group is None or self.group._seen_steps == _optimizer_steps) and seen is not None \
            and seen._version == self._seen_version

    # Version counters restart in a copy (deepcopy, pickle): it carries over "current" (or -1), not a number.
    def __getstate__(self):  # (without the step caches: they are remade from the tensors)
        state = {k: v for k, v in super().__getstate__().items() if k not in STEP_CACHES}
        if "_seen_version" in state:
            current = self.__dict__.get("_seen_scores") is self.scores and self._masks_current()
            state["_seen_version"] = "current" if current else -1
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        if self.__dict__.get("_seen_version") == "current":
            self._seen_version = self.scores._version

    def _apply(self, fn, recurse=True):
        # .to(), .cuda(), .half(), clones: the code, mask and index keep their values, so the caches
        # move with them instead of being rebuilt (and compiled code, which reads them, sees the
        # moved ones); a refresh that was current stays current.
        before = (self.frozen, self.mask, self._free, self._mask_ready, self._masks_current())
        out = super()._apply(fn, recurse)
        moved_caches(self, fn, *before)
        return out

    def __prepare_scriptable__(self):  # torch.jit.script calls this first: refuse at once
        raise RuntimeError(script_refusal(self.layer_name))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        legacy_scores(state_dict, prefix + "scores", state_dict.get(prefix + "frozen", self.frozen), self.scores.shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if "search_step" in self._buffers and self.group is not None:  # (a resumed schedule or IteRand)
            self.group.search_step = int(self.search_step)
            self.group.__dict__.pop("_rerand_at", None)
        self.invalidate()  # (assign=True replaces the scores unseen: an export before a forward refuses)

    # -- refresh helpers (called by SupermaskGroup.refresh, under no_grad) ---------
    def free_index(self) -> _FreeIndex:
        """Positions and counts of the free weights, recomputed only if ``frozen`` changed."""
        frozen, cached = self.frozen, self._free
        if cached is None or cached.frozen is not frozen or cached.version != frozen._version:
            free = frozen.reshape(-1) == freezing.FREE
            cached = self._free = _free_index_of(frozen, free.nonzero().squeeze(1))
        return cached

    def _write_magnitudes(self, out: torch.Tensor, free: _FreeIndex) -> None:  # (the free scores' |s|)
        write_magnitudes(self, out, free)

    def invalidate(self) -> None:
        """Make the next forward re-select the masks (after ``scores`` or ``frozen`` were cut or replaced)."""
        self._seen_version = -1
        self.__dict__.pop("_seen_scores", None)  # (do not keep replaced scores alive)

    def scores_like_weight(self, fill: float = 0.0) -> torch.Tensor:
        """The scores in the weight's shape (a new tensor): ``fill`` at pruned and locked positions."""
        return weight_shaped(self.scores.detach(), self.frozen, self.free_index().index, fill)

    def _write_mask(self, selected: torch.Tensor, free: _FreeIndex) -> None:
        """Set the mask: locked weights, plus the free weights flagged in ``selected``."""
        mask = self.mask
        if free.index is None:
            mask.copy_(selected.view(mask.shape))
        else:
            frozen_positions_written(self, free)
            index = long_index(self, free.index, mask.device)  # index_copy_ wants int64
            if mask.is_contiguous():
                mask.view(-1).index_copy_(0, index, selected.to(mask.device))
            else:  # e.g. channels_last: the index is row-major
                mask.copy_(mask.reshape(-1).index_copy_(0, index, selected.to(mask.device)).view(mask.shape))
        self._mask_ready = (mask, mask._version, free)

    def _set_scale(self, value: float) -> None:
        if value != self._scale_value:  # a fill per layer per step costs more than this check
            self.scale.fill_(value)
            self._scale_value = value

    # -- counts -------------------------------------------------------------------
    @property
    def numel(self) -> int:
        return self.frozen.numel()

    def frozen_counts(self) -> dict:
        """``numel``, ``pruned``, ``locked``, ``free`` (from the cached free index: no pass over the code)."""
        free = self.free_index()
        numel = self.frozen.numel()
        return {"numel": numel, "pruned": numel - free.n_free - free.n_locked, "locked": free.n_locked,
                "free": free.n_free}

    def counts(self) -> dict:
        """``frozen_counts`` and ``kept``, the weights the current mask keeps."""
        return {**self.frozen_counts(), "kept": int(self.mask.sum())}

    def extra_repr(self) -> str:
        return f"layer={self.layer_name!r}, shape={tuple(self.frozen.shape)}"


class SupermaskGroup(SyncFreeState):
    """All ``FrozenSupermask``s of one model and the rule that turns scores into masks."""

    def __init__(self, layers: list[FrozenSupermask], sparsity: float, scope: str,
                 scale: Optional[str], refresh: bool = True, method=None):
        """``refresh=False``: leave the masks as they are (the caller sets them with ``set_selected``,
        as ``load_ticket`` does with a ticket's stored bits).  ``method``: a ``nn.methods.SearchMethod``
        (None: Edge-Popup at a fixed sparsity)."""
        self.layers = layers
        self._seen_steps = -1
        self.sparsity = sparsity
        self.scope = scope
        self.scale_mode = scale
        self.method, self.search_step = method, 0  # (optimizer steps: counted if the method needs them)
        for layer in layers:
            layer.group = self
        if method is not None:
            method.attach(self)
        if refresh:
            self.refresh(force=True)

    def is_stale(self) -> bool:
        return self._seen_steps != _optimizer_steps or any(
            layer.scores._version != layer._seen_version for layer in self.layers)

    # (under torch.export(strict=True) Dynamo runs this eagerly on the real tensors; elsewhere a no-op mark)
    @torch.compiler.assume_constant_result
    def check_traceable(self) -> bool:
        """Refuse (RuntimeError) to export or trace masks that may be out of date: they cannot be
        chosen while tracing, and the exported model would differ from the next forward's."""
        stale = [layer.layer_name for layer in self.layers if not layer._masks_current()]
        if stale:
            raise RuntimeError(stale_refusal(stale))
        return True

    def kept_target(self, sparsity: Optional[float] = None) -> int:
        total = sum(layer.numel + layer.removed_numel for layer in self.layers)
        return freezing.round_half_up((1.0 - (self.sparsity if sparsity is None else sparsity)) * total)

    check_finite = True  # refuse NaN/Inf scores (one max() over the free scores per step; sync-free: late)
    # Device options (None: the device decides).  sync_free: select without reading anything back
    # (nn/sync_free.py; not on the CPU, where reading costs nothing and the sampled bracket is faster).
    # cache_free_weights: keep W at the free positions for the backward (scores-sized; not on the CPU).
    # keep_products: write W * mask into last step's memory when nothing holds it (nn/functional.py;
    # on the CPU only: a GPU's caching allocator hands back the same memory anyway).
    # compiled_refresh: False turns off the CPU's compiled selection and mask write (nn/cpu_refresh.py).
    sync_free: Optional[bool] = None
    compiled_refresh: Optional[bool] = None
    cache_free_weights: Optional[bool] = None
    keep_products: Optional[bool] = None

    def caches_free_weights(self, weight: torch.Tensor) -> bool:
        return self.cache_free_weights if self.cache_free_weights is not None else weight.device.type != "cpu"

    def keeps_products(self, weight: torch.Tensor) -> bool:
        return self.keep_products if self.keep_products is not None else weight.device.type == "cpu"

    @torch.no_grad()
    def refresh(self, force: bool = False) -> None:
        """Recompute every mask from the current scores (no-op when nothing changed)."""
        if not force and not self.is_stale():
            return
        if self.method is not None:
            self.method.before_refresh(self)  # (a scheduled sparsity)
        layers, frees = self.layers, [layer.free_index() for layer in self.layers]
        counts = self.selected_counts(frees)
        kept = cpu_refresh.refresh(self, layers, frees, counts)  # (the CPU's compiled path, if it applies)
        if kept is not None:
            return self._apply_selected(frees, [None] * len(layers), written=True, kept=kept)
        sizes, device = [free.n_free for free in frees], (layers[0].scores.device if layers else None)
        flat = torch.empty(sum(sizes), dtype=torch.float32, device=device)  # |s| of every free weight
        for layer, free, part in zip(layers, frees, flat.split(sizes)):
            layer._write_magnitudes(part, free)
        sync_free = self.sync_free if self.sync_free is not None else flat.device.type != "cpu"
        watch = self.nonfinite_watch
        # |s| as int32 bits: NaN and Inf are exactly the patterns >= 0x7F800000 (one max() checks them)
        if self.check_finite and (watch.seen() if sync_free else
                                  flat.numel() and int(flat.view(torch.int32).max()) >= 0x7F800000):
            watch.reset()
            raise nonfinite_error(layers)
        keys = magnitude_keys(flat)
        kept = counts if self.scope == "layerwise" else None  # (global scope: counted per layer if needed)
        if sync_free:
            mask, nonfinite = segments_topk_mask(keys, sizes if self.scope == "layerwise" else [keys.numel()],
                                                 counts)
            if self.check_finite:
                watch.add(nonfinite)  # read at a later refresh, once it has reached the host
            selected = mask.split(sizes)
            if kept is None and self.scale_mode == "dynamic":
                kept = segment_sums(mask, sizes)
        elif self.scope == "global":
            selected = keys_topk_mask(keys, counts[0]).split(sizes)
        else:
            selected = [keys_topk_mask(part, k) for part, k in zip(keys.split(sizes), counts)]
        self._apply_selected(frees, selected, kept=kept)

    def selected_counts(self, frees: Optional[list] = None, sparsity: Optional[float] = None) -> list[int]:
        """How many free weights the selection keeps (at the group's sparsity, or ``sparsity``):
        ``[k]`` for the whole model in global scope, one count per layer in layerwise scope."""
        layers, sparsity = self.layers, self.sparsity if sparsity is None else sparsity
        frees = frees if frees is not None else [layer.free_index() for layer in layers]
        if self.scope == "global":
            locked = sum(free.n_locked + layer.removed_kept for layer, free in zip(layers, frees))
            return [min(max(self.kept_target(sparsity) - locked, 0), sum(free.n_free for free in frees))]
        counts = []
        for layer, free in zip(layers, frees):
            locked = free.n_locked + layer.removed_kept
            kept = freezing.round_half_up((1.0 - sparsity) * (layer.numel + layer.removed_numel))
            counts.append(min(max(kept - locked, 0), free.n_free))
        return counts

    @torch.no_grad()
    def set_selected(self, selected: list, written: bool = False) -> None:
        """Set every mask from per-layer bool vectors of the selected free weights (row-major), as a
        refresh that selected them would; the scores must be ones this group's selection maps to
        exactly these bits (``load_ticket`` writes such scores), which the caller guarantees.
        ``written``: the masks already hold these bits (only scales and bookkeeping follow)."""
        frees = [layer.free_index() for layer in self.layers]
        if written:
            for layer, free in zip(self.layers, frees):
                layer._mask_ready = (layer.mask, layer.mask._version, free)
        self._apply_selected(frees, selected, written)

    def _apply_selected(self, frees: list, selected, written: bool = False, kept=None) -> None:
        """``kept``: each layer's number of selected free weights, if known (a list, or a device
        tensor: the dynamic scales are then looked up on the device, ``nn/sync_free.py``)."""
        layers = self.layers
        if self.scale_mode == "dynamic" and isinstance(kept, torch.Tensor):
            scales = self.scale_table.lookup(layers, frees, kept)
            torch._foreach_copy_([layer.scale for layer in layers], list(scales.to(layers[0].scale.dtype).unbind()))
        for i, (layer, free, sel) in enumerate(zip(layers, frees, selected)):
            if not written:
                layer._write_mask(sel, free)
            if self.scale_mode == "static":
                layer._set_scale(1.0 / math.sqrt(max(1.0 - self.sparsity, 1e-12)))
            elif self.scale_mode == "dynamic":
                if isinstance(kept, torch.Tensor):
                    layer._scale_value = None  # (written above, on the device)
                else:
                    n = kept[i] if kept is not None else int(torch.count_nonzero(sel))
                    layer._set_scale(dynamic_scale(free.n_locked + n + layer.removed_kept,
                                                   layer.numel + layer.removed_numel))
            else:
                layer._set_scale(1.0)
            # (into __dict__: Module.__setattr__ costs more; the tensor for _masks_current: torch.export has fakes)
            scores = layer.scores
            layer.__dict__.update(_seen_version=scores._version, _seen_scores=scores)
        self._seen_steps = _optimizer_steps
        if self.method is not None:
            self.method.after_masks(self, frees)  # (multicoated levels, an IteRand round)
