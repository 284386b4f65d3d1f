"""``size_report``: what a frozen ticket costs to store, counted honestly in bits."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from timm_fslt.frozen import get_config, get_group
from torch.nn.utils.parametrize import ParametrizationList

from timm_fslt.nn.modules import dtype_name
from timm_fslt.nn.placement import fate_of
from timm_fslt.nn.supermask import FrozenSupermask


@dataclass
class LayerSize:
    name: str
    shape: tuple
    numel: int
    pruned: int
    locked: int
    free: int
    kept: int

    @property
    def sparsity(self) -> float:
        return 1.0 - self.kept / self.numel if self.numel else 0.0


def _layer_total(count: str) -> property:
    """A read-only total over the report's layers of one ``LayerSize`` count."""
    return property(lambda self: sum(getattr(layer, count) for layer in self.layers),
                    doc=f"sum of the layers' ``{count}``")


@dataclass
class SizeReport:
    """Counts and storage of a frozen model's ticket.

    ``mask_bits`` is one bit per free weight (the searched supermask); weights and
    the freezing pattern regenerate from the seed and cost nothing.
    ``state_bits`` is the real-valued state that cannot be regenerated
    (BatchNorm running statistics, trained or kept biases, any other tensor the
    architecture does not rebuild), at its stored precision.
    """

    layers: list = field(default_factory=list)
    state_bits: int = 0
    state_tensors: dict = field(default_factory=dict)
    # {key: why it is stored} (``state_reasons``); empty for a report read from a ticket's config
    state_reasons: dict = field(default_factory=dict, compare=False)

    # totals ------------------------------------------------------------------
    params = _layer_total("numel")
    pruned = _layer_total("pruned")
    locked = _layer_total("locked")
    free = _layer_total("free")
    kept = _layer_total("kept")

    @property
    def sparsity(self) -> float:
        return 1.0 - self.kept / self.params if self.params else 0.0

    @property
    def freezing_ratio(self) -> float:
        return (self.pruned + self.locked) / self.params if self.params else 0.0

    @property
    def mask_bits(self) -> int:
        return self.free

    @property
    def ticket_bits(self) -> int:
        return self.mask_bits + self.state_bits

    @property
    def dense_source_ticket_bits(self) -> int:
        """The same network's ticket found in a dense random source: 1 bit per weight."""
        return self.params + self.state_bits

    @property
    def fp32_dense_bits(self) -> int:
        """A weight-trained dense model: 32 bits per weight plus the same state."""
        return 32 * self.params + self.state_bits

    @property
    def compression_vs_dense_source(self) -> float:
        return self.dense_source_ticket_bits / max(self.ticket_bits, 1)

    @property
    def mask_compression_vs_dense_source(self) -> float:
        return self.params / max(self.mask_bits, 1)

    @property
    def compression_vs_fp32(self) -> float:
        return self.fp32_dense_bits / max(self.ticket_bits, 1)

    def to_dict(self) -> dict:
        totals = {key: getattr(self, key) for key in (
            "params", "pruned", "locked", "free", "kept", "sparsity", "freezing_ratio",
            "mask_bits", "state_bits", "ticket_bits", "dense_source_ticket_bits",
            "fp32_dense_bits", "compression_vs_dense_source",
            "mask_compression_vs_dense_source", "compression_vs_fp32")}
        totals["ticket_bytes"] = (self.ticket_bits + 7) // 8
        rows = [dict(asdict(layer), sparsity=layer.sparsity) for layer in self.layers]
        return {"totals": totals, "layers": rows, "state_tensors": dict(self.state_tensors)}

    def state_summary(self) -> str:
        """The stored state grouped by why it is stored (from ``state_reasons``; a report read
        from a ticket's config.json has none)."""
        groups: dict = {}
        for key, reason in self.state_reasons.items():
            shape, dtype = self.state_tensors[key][:2]
            n, bits = groups.get(reason, (0, 0))
            groups[reason] = (n + 1, bits + math.prod(shape) * torch.empty(0, dtype=getattr(torch, dtype)).element_size() * 8)
        lines = ["stored state, by reason:"] + [f"  {reason}: {n} tensors, {bits:,} bits"
                                               for reason, (n, bits) in groups.items()]
        return "\n".join(lines if groups else ["stored state: none"])

    def __str__(self) -> str:
        head = f"{'layer':<32} {'shape':<18} {'params':>10} {'pruned':>9} {'locked':>9} {'free':>9} {'kept':>9} {'sparsity':>8}"
        lines = [head, "-" * len(head)]
        for layer in self.layers:
            lines.append(f"{layer.name[-32:]:<32} {str(tuple(layer.shape)):<18} {layer.numel:>10} "
                         f"{layer.pruned:>9} {layer.locked:>9} {layer.free:>9} {layer.kept:>9} "
                         f"{layer.sparsity:>8.4f}")
        lines.append("-" * len(head))
        lines.append(f"{'total':<32} {'':<18} {self.params:>10} {self.pruned:>9} {self.locked:>9} "
                     f"{self.free:>9} {self.kept:>9} {self.sparsity:>8.4f}")
        lines += [
            "",
            f"freezing ratio            {self.freezing_ratio:.4f}",
            f"supermask bits            {self.mask_bits:,} (1 bit per free weight)",
            f"non-regenerable state     {self.state_bits:,} bits ({len(self.state_tensors)} tensors)",
            f"ticket size               {self.ticket_bits:,} bits = {(self.ticket_bits + 7) // 8:,} bytes",
            f"dense-source ticket       {self.dense_source_ticket_bits:,} bits  -> "
            f"{self.compression_vs_dense_source:.2f}x smaller "
            f"(masks alone: {self.mask_compression_vs_dense_source:.2f}x)",
            f"fp32 dense weights        {self.fp32_dense_bits:,} bits  -> {self.compression_vs_fp32:.1f}x smaller",
        ]
        return "\n".join(lines)


_REGENERABLE = ("masked", "constant", "regenerated")
# A persistent buffer that is not a norm's running statistics (e.g. a DCT basis, clamp bounds):
# the architecture usually builds it the same every time, so a ticket stores it only if it differs
# from a fresh build of the recorded architecture (the save-time rebuild check compares them).
ARCHITECTURE_BUFFER = "architecture buffer"


def _state_entries(model: nn.Module):
    """(state_dict key, tensor, reason it is stored or None if regenerable) of every state entry.

    Decided per module, so a module shared under several names (listed once by
    ``named_modules`` but under every name by ``state_dict``) is decided the same everywhere.
    """
    config = get_config(model)
    modules = dict(model.named_modules(remove_duplicate=False))
    for key, tensor in model.state_dict(keep_vars=True).items():
        path, _, local = key.rpartition(".")
        module = modules.get(path)
        if isinstance(module, FrozenSupermask):
            yield key, tensor, None  # scores (the ticket stores mask bits) and the frozen code
            continue
        if isinstance(module, ParametrizationList) and local == "original" and any(
                isinstance(p, FrozenSupermask) for p in module):
            yield key, tensor, None  # the random weight
            continue
        if local == "num_batches_tracked" and config.placement_version >= 2:
            yield key, tensor, None  # only counts training steps (momentum=None norms), never used in eval
            continue
        fate = fate_of(module, local)
        if fate is not None:
            kind, where, reason = fate.kind, fate.fate, fate.reason
            yield key, tensor, (None if where in _REGENERABLE else
                                reason if kind == "excluded" else f"{kind}: {reason or where}")
        elif local in ("running_mean", "running_var"):
            yield key, tensor, "norm running statistics (no seed rebuilds them)"
        elif not isinstance(tensor, nn.Parameter):
            yield key, tensor, f"{ARCHITECTURE_BUFFER} of {type(module).__name__}"
        else:
            yield key, tensor, "parameter added after timm_fslt.freeze"


def non_regenerable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Tensors a ticket must store: everything the seed and the architecture cannot rebuild.

    Excluded: masked tensors' random weights, freezing codes and scores (the ticket stores
    their mask bits instead), and every parameter ``freeze`` fixed to a constant or drew from
    the seed (``timm_fslt.nn.placement``); ``num_batches_tracked`` (placement version 2).
    ``state_reasons`` says why each stored tensor is stored.

    This is the ticket's state contract: ``timm_fslt.ticket`` saves and checks exactly
    these tensors, and structural pruning keeps them consistent; it lives here, below
    both, because the size report counts the same bits.
    """
    return {key: tensor.detach() for key, tensor, reason in _state_entries(model) if reason is not None}


def architecture_buffers(model: nn.Module) -> set[str]:
    """Keys of ``non_regenerable_state`` that are architecture buffers (``ARCHITECTURE_BUFFER``)."""
    return {key for key, reason in state_reasons(model).items() if reason.startswith(ARCHITECTURE_BUFFER)}


def state_reasons(model: nn.Module) -> dict[str, str]:
    """``{state_dict key: why a ticket stores it}`` for every tensor of ``non_regenerable_state``."""
    return {key: reason for key, _, reason in _state_entries(model) if reason is not None}


def size_report(model: nn.Module, print_report: bool = False) -> SizeReport:
    """Counts, sparsity and ticket bits of a frozen model (``print(report)`` for a table)."""
    group = get_group(model)
    group.refresh()
    rows = [LayerSize(name=layer.layer_name, shape=tuple(layer.frozen.shape),
                      **layer.counts()) for layer in group.layers]
    state, reasons = non_regenerable_state(model), state_reasons(model)
    bits = sum(t.numel() * t.element_size() * 8 for t in state.values())
    report = SizeReport(layers=rows, state_bits=bits,
                        state_tensors={k: [list(v.shape), dtype_name(v.dtype)] for k, v in state.items()},
                        state_reasons=reasons)
    if print_report:
        print(report)
        print()
        print(report.state_summary())
    return report
