"""``size_report``: what a frozen ticket costs to store, counted honestly in bits."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from timm_fslt.frozen import get_config, get_group
from timm_fslt.nn.modules import dtype_name, is_frozen_layer, is_norm


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


def non_regenerable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Tensors a ticket must store: everything the seed and the architecture cannot rebuild.

    Excluded: the random weights, freezing codes and scores of masked layers (the
    ticket stores their mask bits instead), biases zeroed by ``bias="zero"`` and
    norm affine parameters fixed by ``batchnorm="non_affine"`` (constants).

    This is the ticket's state contract: ``timm_fslt.ticket`` saves and checks exactly
    these tensors, and structural pruning keeps them consistent; it lives here, below
    both, because the size report counts the same bits.
    """
    config = get_config(model)
    skip = set()
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if is_frozen_layer(module):
            skip.add(prefix + "parametrizations.weight.original")
            skip.add(prefix + "parametrizations.weight.0.scores")
            skip.add(prefix + "parametrizations.weight.0.frozen")
            if config.bias == "zero":
                skip.add(prefix + "bias")
        elif is_norm(module) and config.batchnorm == "non_affine":
            skip.add(prefix + "weight")
            skip.add(prefix + "bias")
    return {k: v for k, v in model.state_dict().items() if k not in skip}


def size_report(model: nn.Module, print_report: bool = False) -> SizeReport:
    """Counts, sparsity and ticket bits of a frozen model (``print(report)`` for a table)."""
    group = get_group(model)
    group.refresh()
    rows = [LayerSize(name=layer.layer_name, shape=tuple(layer.frozen.shape),
                      **layer.counts()) for layer in group.layers]
    state = non_regenerable_state(model)
    bits = sum(t.numel() * t.element_size() * 8 for t in state.values())
    report = SizeReport(layers=rows, state_bits=bits,
                        state_tensors={k: [list(v.shape), dtype_name(v.dtype)]
                                       for k, v in state.items()})
    if print_report:
        print(report)
    return report
