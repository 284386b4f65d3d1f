"""Recomputing ``W * mask`` in the backward instead of keeping it.

A conv or linear layer saves its weight argument for the input gradient, so eager
autograd keeps every layer's ``W * mask * scale`` (4 bytes per weight) from forward
to backward: the largest memory cost of a search over dense weight training.
Inside ``recompute_masked_weights`` (``recompute_context`` here) those products are
saved as a small token instead and rebuilt (one elementwise product, bit-identical)
when backward needs them.

The parametrization reports each masked weight it makes with ``record``; saved-tensor
hooks then swap a recorded tensor (or a view of it, e.g. a linear's ``W.t()``) for its
token.
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from typing import NamedTuple, Optional

import torch

from timm_fslt.nn.functional import masked_product, masked_weight
from timm_fslt.nn.methods import refuse_unsupported

_local = threading.local()  # saved-tensor hooks are per thread, so is the recorder stack
_recording = 0  # open recompute contexts in any thread (a cheap test for every forward)


def _recorders() -> list:
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


class _RecomputeToken(NamedTuple):
    """What rebuilds one saved ``W * mask * scale`` (all persistent tensors: no copy)."""

    weight: torch.Tensor
    weight_version: int
    scores: torch.Tensor
    mask: torch.Tensor
    mask_version: int
    scale: Optional[torch.Tensor]
    index: Optional[torch.Tensor]
    layer_name: str
    view: Optional[tuple] = None  # (size, stride, offset) when a view of it was saved (linear: W.t())

    def rebuild(self) -> torch.Tensor:
        if self.mask._version != self.mask_version or self.weight._version != self.weight_version:
            raise RuntimeError(
                f"timm_fslt.recompute_masked_weights: the mask or frozen weight of layer {self.layer_name!r} "
                "changed between the forward and its backward (the masks were refreshed by another "
                "forward after an optimizer step, or written in place), so the masked weight this "
                "backward needs cannot be rebuilt. Run backward before the next optimizer step, or "
                "leave this forward outside recompute_masked_weights")
        if torch.is_grad_enabled():  # backward(create_graph=True): rebuild with its graph
            out = masked_weight(self.weight, self.scores, self.mask, self.scale, self.index)
        else:
            out = masked_product(self.weight, self.mask, self.scale)
        return out if self.view is None else out.as_strided(*self.view)


class _Recorder:
    def __init__(self, group):
        self.group = group
        self.entries: dict = {}  # id(W_eff) -> (weak reference, token); dropped when W_eff dies

    def record(self, out, weight, scores, mask, scale, index, layer_name) -> None:
        key = id(out)
        entries = self.entries
        ref = weakref.ref(out, lambda _ref, key=key: entries.pop(key, None))
        entries[key] = (ref, _RecomputeToken(weight, weight._version, scores, mask, mask._version,
                                             scale, index, layer_name))


def is_recording() -> bool:
    """Whether any thread is inside a recompute context (a cheap test for every forward)."""
    return _recording > 0


def record(group, out: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor,
           scale: Optional[torch.Tensor], index: Optional[torch.Tensor], layer_name: str) -> None:
    """Note that ``out`` is this layer's masked weight, made of the other tensors, if this
    thread's innermost recompute context for ``group`` is open (otherwise nothing)."""
    for recorder in reversed(_recorders()):
        if recorder.group is group:
            recorder.record(out, weight, scores, mask, scale, index, layer_name)
            break


def _pack(tensor):
    base = tensor._base
    for recorder in reversed(_recorders()):
        entry = recorder.entries.get(id(tensor))
        if entry is not None and entry[0]() is tensor:
            return entry[1]
        entry = None if base is None else recorder.entries.get(id(base))
        if entry is not None and entry[0]() is base:
            return entry[1]._replace(view=(tensor.size(), tensor.stride(), tensor.storage_offset()))
    return tensor


def _unpack(saved):
    return saved.rebuild() if isinstance(saved, _RecomputeToken) else saved


@contextlib.contextmanager
def recompute_context(group):
    """Forwards of ``group``'s layers inside save tokens instead of masked weights
    (``group``: a ``SupermaskGroup``, compared by identity only)."""
    global _recording
    refuse_unsupported(group, "recompute_masked_weights", iterand_too=False)
    recorder = _Recorder(group)
    stack = _recorders()
    stack.append(recorder)
    _recording += 1
    try:
        with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
            yield
    finally:
        _recording -= 1
        stack.remove(recorder)
        recorder.entries.clear()  # tokens already saved live on in their graphs
