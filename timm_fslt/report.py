"""``size_report``: what a frozen ticket costs to store, counted honestly in bits."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
from torch import nn

from timm_fslt import entropy
from timm_fslt.frozen import get_config, get_group
from torch.nn.utils.parametrize import ParametrizationList

from timm_fslt.nn import method_symbols
from timm_fslt.nn.modules import dtype_name
from timm_fslt.nn.placement import fate_of
from timm_fslt.nn.supermask import FrozenSupermask, free_entries


@dataclass
class LayerSize:
    name: str
    shape: tuple
    numel: int
    pruned: int
    locked: int
    free: int
    kept: int
    # the layer's entropy-coded record (``timm_fslt.entropy``): "raw", "constant" or "rans", and its
    # bits with its header; None for a ticket saved before the coder (format 4 and older)
    coded_method: Optional[str] = None
    coded_bits: Optional[int] = None
    # a search method's ticket (format 6): ``[[symbol, count], ...]`` of its free weights' symbols
    symbol_counts: Optional[list] = None

    @property
    def sparsity(self) -> float:
        return 1.0 - self.kept / self.numel if self.numel else 0.0

    @property
    def entropy_bits(self) -> float:
        """The empirical (order-0) entropy of the layer's free bits, ``free * H(kept free / free)``
        (of its symbols, for a search method's ticket)."""
        if self.symbol_counts is not None:
            return entropy.entropy_bits([count for _, count in self.symbol_counts])
        kept_free = self.kept - self.locked
        return entropy.entropy_bits([self.free - kept_free, kept_free])


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
    # how the ticket stores (or, for a model, ``save_ticket(mask_coding=...)`` would store) the mask
    mask_coding: str = "raw"
    # symbols per free weight (2: a mask bit) and the search method (None: Edge-Popup, no schedule)
    mask_alphabet: int = 2
    method: Optional[str] = None

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
    def symbol_bits(self) -> int:
        """Raw bits per free weight: 1 (a mask bit), or ``ceil(log2(mask_alphabet))``."""
        return entropy.symbol_bits(self.mask_alphabet)

    @property
    def mask_bits(self) -> int:
        return self.free * self.symbol_bits

    @property
    def mask_raw_bits(self) -> int:
        """The raw mask payload: the free bits (symbols) packed in whole bytes."""
        return 8 * entropy.raw_bytes(self.free, self.mask_alphabet)

    @property
    def mask_entropy_coded_bits(self) -> Optional[int]:
        """The entropy-coded payload, every layer's record header included (None if not recorded)."""
        coded = [layer.coded_bits for layer in self.layers]
        return None if None in coded else sum(coded)

    @property
    def mask_stored_bits(self) -> Optional[int]:
        """The mask payload as stored: raw or entropy-coded (``mask_coding``)."""
        return self.mask_entropy_coded_bits if self.mask_coding == "entropy" else self.mask_raw_bits

    @property
    def mask_entropy_bits(self) -> float:
        """The sum of the layers' empirical entropies: what no per-layer order-0 coder can beat."""
        return sum(layer.entropy_bits for layer in self.layers)

    def per_free_weight(self, bits) -> Optional[float]:
        return None if bits is None else bits / self.free if self.free else 0.0

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
        totals["mask_coding"] = self.mask_coding
        if self.method is not None:  # (an Edge-Popup report's dict is as before)
            totals.update(method=self.method, mask_alphabet=self.mask_alphabet, symbol_bits=self.symbol_bits)
        for key in ("mask_stored_bits", "mask_raw_bits", "mask_entropy_coded_bits", "mask_entropy_bits"):
            totals[key] = getattr(self, key)
            totals[key + "_per_free_weight"] = self.per_free_weight(getattr(self, key))
        rows = [dict(asdict(layer), sparsity=layer.sparsity, entropy_bits=layer.entropy_bits)
                for layer in self.layers]
        for row in rows:
            if row["symbol_counts"] is None:
                del row["symbol_counts"]
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

    def _mask_line(self, what: str, bits, note: str = "") -> str:
        if bits is None:
            return f"  {what:<24}not recorded (a ticket saved before the entropy coder)"
        return f"  {what:<24}{round(bits):,} bits = {self.per_free_weight(bits):.4f} per free weight{note}"

    def __str__(self) -> str:
        head = (f"{'layer':<32} {'shape':<18} {'params':>10} {'pruned':>9} {'locked':>9} {'free':>9} {'kept':>9} "
                f"{'sparsity':>8} {'coded b/w':>9} {'H b/w':>7}")
        lines = [head, "-" * len(head)]

        def rate(bits, free):
            return f"{bits / free:.4f}" if bits is not None and free else "-"

        for layer in self.layers:
            lines.append(f"{layer.name[-32:]:<32} {str(tuple(layer.shape)):<18} {layer.numel:>10} "
                         f"{layer.pruned:>9} {layer.locked:>9} {layer.free:>9} {layer.kept:>9} "
                         f"{layer.sparsity:>8.4f} {rate(layer.coded_bits, layer.free):>9} "
                         f"{rate(layer.entropy_bits, layer.free):>7}")
        lines.append("-" * len(head))
        lines.append(f"{'total':<32} {'':<18} {self.params:>10} {self.pruned:>9} {self.locked:>9} "
                     f"{self.free:>9} {self.kept:>9} {self.sparsity:>8.4f} "
                     f"{rate(self.mask_entropy_coded_bits, self.free):>9} {rate(self.mask_entropy_bits, self.free):>7}")
        lines += [
            "",
            f"freezing ratio            {self.freezing_ratio:.4f}",
            f"supermask bits            {self.mask_bits:,} (1 bit per free weight)" if self.method is None else
            f"supermask symbols         {self.mask_bits:,} bits ({self.symbol_bits} per free weight: "
            f"{self.mask_alphabet} symbols, method {self.method})",
            f"supermask as stored       {self.mask_coding}" + ("" if self.mask_stored_bits is None else
                                                               f": {self.mask_stored_bits:,} bits"),
            self._mask_line("raw", self.mask_raw_bits),
            self._mask_line("entropy-coded", self.mask_entropy_coded_bits, " (record headers counted)"),
            self._mask_line("empirical entropy", self.mask_entropy_bits, " (order 0, per layer)"),
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


def size_report(model: nn.Module, print_report: bool = False, mask_coding: str = "auto") -> SizeReport:
    """Counts, sparsity and ticket bits of a frozen model (``print(report)`` for a table).

    The mask's stored size is what ``save_ticket(model, ..., mask_coding=mask_coding)`` writes
    (the entropy coder runs on the current masks: milliseconds for millions of free weights)."""
    mask_coding = entropy.check_mask_coding(mask_coding)
    group = get_group(model)
    group.refresh()
    method = method_symbols.stores_symbols(group)  # (what ticket_files stores: nn/method_symbols.py)
    if method:
        symbols = method_symbols.layer_symbols(group)
        alphabet = method_symbols.alphabet_of(group, symbols)
        streams = [s.to(torch.int64).numpy().astype("uint32") for s in symbols]
    else:
        alphabet = 2
        streams = [free_entries(layer.mask, layer.frozen).reshape(-1).to(torch.uint8).cpu().numpy()
                   for layer in group.layers]
    _, records = entropy.encode_streams(streams, alphabet)
    rows = [LayerSize(name=layer.layer_name, shape=tuple(layer.frozen.shape), **layer.counts(),
                      coded_method=record.method, coded_bits=8 * record.bytes,
                      symbol_counts=method_symbols.symbol_counts(symbols[i]) if method else None)
            for i, (layer, record) in enumerate(zip(group.layers, records))]
    state, reasons = non_regenerable_state(model), state_reasons(model)
    bits = sum(t.numel() * t.element_size() * 8 for t in state.values())
    coded = sum(record.bytes for record in records)
    report = SizeReport(layers=rows, state_bits=bits,
                        state_tensors={k: [list(v.shape), dtype_name(v.dtype)] for k, v in state.items()},
                        state_reasons=reasons,
                        mask_coding=entropy.choose(mask_coding, entropy.raw_bytes(sum(s.size for s in streams), alphabet),
                                                   coded),
                        mask_alphabet=alphabet, method=method_symbols.method_name(group) if method else None)
    if print_report:
        print(report)
        print()
        print(report.state_summary())
    return report
