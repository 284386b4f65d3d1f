"""What a refresh needs so that it never reads a value back from the device (``SupermaskGroup.sync_free``).

On a GPU every read of a device value by the host (``int(t)``, ``bool(t)``, ``t.item()``, boolean
indexing, ``nonzero``) stops the host until the stream has caught up.  A sync-free refresh selects
with ``regen.topk.segments_topk_mask`` and takes the two things it used to read from here:

* **Dynamic scales** in global scope depend on how many free weights each layer keeps, which only
  the device knows.  ``ScaleTable`` holds, per layer, the scale of every possible count (one
  float32 per free weight plus one: scores-sized), computed on the host with IEEE float64
  division and square root -- the same correctly rounded operations as the Python float code of
  the synchronous path, so the same bits -- and looks the counts up on the device.  (torch's own
  float64 ``sqrt`` is not correctly rounded on every CPU, so it is not used for this.)
* **The non-finite check** (``NonfiniteWatch``) counts +inf/NaN magnitudes from the selection's
  first histogram (no extra pass), adds them to a device counter, and copies the counter to pinned
  host memory behind a CUDA event; the next refresh reads it once the event has completed (on the
  CPU at once), so a NaN is reported one refresh late instead of stalling every step.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from timm_fslt.regen.cpu_select import BandState


def scale_values(base: int, n_free: int, total: int) -> np.ndarray:
    """float32 ``1 / sqrt(max((base + c) / total, 1e-12))`` for every ``c`` in ``0..n_free``, as the
    synchronous path computes it for one count (Python floats, then rounded to float32 by ``fill_``)."""
    density = (np.arange(n_free + 1, dtype=np.float64) + float(base)) / float(max(total, 1))
    np.maximum(density, 1e-12, out=density)
    np.sqrt(density, out=density)  # IEEE square root (the hardware instruction): correctly rounded
    return np.divide(1.0, density, out=density).astype(np.float32)


def dynamic_scale(kept: int, total: int) -> float:
    """The dynamic scale of a layer keeping ``kept`` of its ``total`` weights (one entry of ``scale_values``)."""
    return float(scale_values(kept, 0, total)[0])


class ScaleTable:
    """Every layer's dynamic scale for every count of kept free weights, back to back on one device."""

    def __init__(self):
        self._key: Optional[tuple] = None
        self._table: Optional[torch.Tensor] = None
        self._offsets: Optional[torch.Tensor] = None

    def lookup(self, layers: list, frees: list, kept_free: torch.Tensor) -> torch.Tensor:
        """float32 scales of the layers for ``kept_free`` (int64, one count per layer, on the device)."""
        rows = tuple((free.n_locked + layer.removed_kept, free.n_free, layer.numel + layer.removed_numel)
                     for layer, free in zip(layers, frees))
        key = (rows, kept_free.device)
        if key != self._key:  # (once, and again only after pruning or a move)
            parts = [scale_values(*row) for row in rows]
            offsets = np.cumsum([0] + [part.size for part in parts[:-1]], dtype=np.int64)
            self._table = torch.from_numpy(np.concatenate(parts)).to(kept_free.device)
            self._offsets = torch.from_numpy(offsets).to(kept_free.device)
            self._key = key
        return self._table.index_select(0, self._offsets + kept_free)


class NonfiniteWatch:
    """A device count of non-finite score magnitudes, read by the host only when it is ready."""

    def __init__(self):
        self._total: Optional[torch.Tensor] = None  # on the device
        self._host: Optional[torch.Tensor] = None  # pinned copy (CUDA) or the counter itself (CPU)
        self._event = None

    def add(self, counts: torch.Tensor) -> None:
        """Add this refresh's per-segment counts (int64, on the device) and start their copy home."""
        device = counts.device
        if self._total is None or self._total.device != device:
            self._total = torch.zeros(1, dtype=torch.int64, device=device)
            self._host, self._event = None, None
        self._total.add_(counts.sum())
        if device.type == "cuda":
            if self._host is None:
                self._host = torch.zeros(1, dtype=torch.int64, pin_memory=True)
                self._event = torch.cuda.Event()
            self._host.copy_(self._total, non_blocking=True)
            self._event.record()
        else:
            self._host = self._total

    def seen(self) -> bool:
        """Whether a count that has reached the host is non-zero (never waits for the device)."""
        if self._host is None or (self._event is not None and not self._event.query()):
            return False
        return bool(self._host.numpy()[0])  # host memory: a plain read, not a device operation

    def reset(self) -> None:
        self._total = self._host = self._event = None


class SyncFreeState:
    """What refreshes keep on a ``SupermaskGroup`` for the next one (the sync-free refresh's device
    tensors and CUDA event, the CPU refresh's bands): made on first use, never copied or pickled with
    the group (CUDA events do not pickle; a copy starts afresh)."""

    _STATE = ("_nonfinite", "_scale_table", "_bands")

    def _made(self, name: str, make):
        found = self.__dict__.get(name)
        if found is None:
            found = self.__dict__[name] = make()
        return found

    @property
    def nonfinite_watch(self) -> NonfiniteWatch:
        return self._made("_nonfinite", NonfiniteWatch)

    @property
    def scale_table(self) -> ScaleTable:
        return self._made("_scale_table", ScaleTable)

    @property
    def band_state(self) -> BandState:
        return self._made("_bands", BandState)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in self._STATE}


def nonfinite_error(layers: list) -> FloatingPointError:
    """The error for non-finite scores, naming the layers that hold them now."""
    bad = [layer.layer_name for layer in layers if not bool(torch.isfinite(layer.scores).all())]
    return FloatingPointError(
        f"non-finite (NaN or Inf) scores in layer(s) {', '.join(bad) or '(seen at the previous refresh)'}"
        ": the mask cannot be chosen. Lower the learning rate or resume from a checkpoint; set "
        "timm_fslt.get_group(model).check_finite = False to skip this check")
