"""The supermask file in either coding: raw bits, or entropy-coded layer records (``timm_fslt.entropy``).

``supermask.safetensors`` always holds one 1-D uint8 tensor ``"supermask"``. With ``coding: "raw"``
(formats 1-4) it is the packed bits of every free weight (``ticket.format.BIT_ORDER``); with
``coding: "entropy"`` (format 5) it is one record per masked layer, in the order of config.json's
``layers``, each decoding to exactly that layer's free-position bits (``timm_fslt.entropy``). The
config's ``mask`` record says which, and lists the entropy records' methods and sizes (for a raw
ticket too: what entropy coding would have cost), which the loader checks against the file.

Format 6 (a search method's ticket: multicoated, IteRand, or a sparsity schedule; ``ticket.method_record``)
stores one *symbol* per free weight instead of a bit (``nn.method_symbols``), of the ``alphabet`` the
mask record names: raw, ``b = ceil(log2(alphabet))``-bit fields packed across all layers (symbol i in
bits ``[i*b, i*b + b)`` of the little-endian bit stream; ``b = 1`` is the raw mask's layout), or one
entropy record per layer of that alphabet.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
import torch

from timm_fslt import entropy
from timm_fslt.errors import TicketChecksumError, TicketError, TicketMismatchError

CODED_SINCE = 5  # the first format version that may store an entropy-coded mask
RAW_VERSION = 4  # a raw-mask ticket is still written as format 4: every 0.4 reader reads it
CODINGS = ("raw", "entropy")
MASK_ALPHABET = 2  # a mask bit per free weight
ENTROPY_ORDER = ("layers in config order, one record each (method byte: 0 raw bits, 1 constant, 2 rANS; README "
                 "'Entropy-coded supermask'); the free positions of each layer in row-major order")
METADATA = {"raw": "timm_fslt.supermask", "entropy": "timm_fslt.supermask.entropy"}


_BIT_WEIGHTS = torch.tensor([1 << i for i in range(8)], dtype=torch.int32)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Bool vector -> uint8 bytes, bit i at bit (i % 8) of byte i // 8, zero padding."""
    bits = bits.reshape(-1).to(torch.int32).cpu()
    pad = (-bits.numel()) % 8
    if pad:
        bits = torch.cat([bits, bits.new_zeros(pad)])
    return (bits.view(-1, 8) * _BIT_WEIGHTS).sum(1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: the first ``n`` bits as a bool vector."""
    if packed.device.type == "cpu" and packed.dtype == torch.uint8:  # (NumPy's unpackbits: one pass)
        bits = torch.from_numpy(np.unpackbits(packed.reshape(-1).contiguous().numpy(), bitorder="little"))
    else:
        values = packed.reshape(-1).to(torch.int32)
        bits = ((values.unsqueeze(1) >> torch.arange(8, dtype=torch.int32, device=values.device)) & 1).reshape(-1)
    if bool(bits[n:].any()):
        raise TicketChecksumError("the supermask's padding bits are not zero: the mask file is corrupted")
    return bits[:n].bool()


def check_mask_coding(value) -> str:
    try:
        return entropy.check_mask_coding(value)
    except ValueError as err:
        raise TicketError(str(err)) from None


def encode_mask(layer_bits: Sequence[torch.Tensor], mask_coding: str,
                alphabet: int = MASK_ALPHABET) -> tuple[str, bytes, dict]:
    """(coding, payload bytes, the config's coding fields) of the layers' free-position bits (or,
    ``alphabet`` > 2, symbols)."""
    if alphabet == MASK_ALPHABET:
        streams = [bits.reshape(-1).to(torch.uint8).cpu().numpy() for bits in layer_bits]
    else:
        streams = [s.reshape(-1).to(torch.int64).cpu().numpy().astype(np.uint32) for s in layer_bits]
    coded, records = entropy.encode_streams(streams, alphabet)
    n_free = sum(s.size for s in streams)
    if alphabet == MASK_ALPHABET:
        raw = pack_bits(torch.cat([b.reshape(-1).cpu().bool() for b in layer_bits]) if layer_bits
                        else torch.zeros(0, dtype=torch.bool)).numpy().tobytes()
    else:
        raw = entropy.pack(np.concatenate(streams) if streams else np.zeros(0, np.uint32), alphabet)
    coding = entropy.choose(mask_coding, len(raw), len(coded))
    fields = {"coding": coding, "entropy_bytes": len(coded),
              "entropy_layers": [[r.method, r.bytes] for r in records]}
    if coding == "entropy":
        fields["order"] = ENTROPY_ORDER
    assert len(raw) == entropy.raw_bytes(n_free, alphabet)
    return coding, (coded if coding == "entropy" else raw), fields


def coding_of(mask: Mapping) -> str:
    return mask.get("coding", "raw")


def alphabet_of(mask: Mapping) -> int:
    """The mask record's alphabet (format 6 records it; 2 before: a bit per free weight)."""
    alphabet = mask.get("alphabet", MASK_ALPHABET)
    ok = isinstance(alphabet, int) and not isinstance(alphabet, bool) and 2 <= alphabet <= entropy.MAX_ALPHABET
    return alphabet if ok else MASK_ALPHABET


def check_mask_record(mask: Mapping, version: int, layers: Sequence[Mapping]) -> Optional[str]:
    """What is wrong with config.json's ``mask`` record, or None (run before any file is read)."""
    coding = coding_of(mask)
    if coding not in CODINGS:
        return f"its coding {coding!r} is not one of {list(CODINGS)}"
    if coding == "entropy" and version < CODED_SINCE:
        return f"an entropy-coded mask needs format_version {CODED_SINCE}, the ticket has {version}"
    if version >= CODED_SINCE and "coding" not in mask:
        return f"format {version} records the mask's coding"
    listed = mask.get("entropy_layers")
    if listed is None:
        return "an entropy-coded mask lists its layer records ('entropy_layers')" if coding == "entropy" else None
    n = [row["free"] for row in layers]
    if not (isinstance(listed, list) and len(listed) == len(n) and all(
            isinstance(r, list) and len(r) == 2 and r[0] in entropy.METHODS.values()
            and isinstance(r[1], int) and not isinstance(r[1], bool)
            and 1 <= r[1] <= entropy.max_record_bytes(k, alphabet_of(mask)) for r, k in zip(listed, n))):
        return "its 'entropy_layers' must be one [method, bytes] per layer, none larger than the raw record"
    if mask.get("entropy_bytes") != sum(r[1] for r in listed):
        return "its 'entropy_bytes' is not the sum of its 'entropy_layers' bytes"
    if coding == "entropy" and mask.get("bytes") != mask["entropy_bytes"]:
        return "an entropy-coded mask's 'bytes' must be its 'entropy_bytes'"
    return None


def mask_payload_limit(config: Mapping) -> int:
    """The most payload bytes the mask file can hold for the layers config.json declares."""
    sizes, alphabet = [row["free"] for row in config["layers"]], alphabet_of(config["mask"])
    if coding_of(config["mask"]) == "entropy":
        return sum(entropy.max_record_bytes(n, alphabet) for n in sizes)
    return entropy.raw_bytes(sum(sizes), alphabet)


def is_symbol_record(mask: Mapping) -> bool:
    """A format-6 mask record (one symbol per free weight, ``ticket.method_record``)."""
    return "alphabet" in mask


def decode_mask(config: Mapping, payload: torch.Tensor, name: str) -> torch.Tensor:
    """The raw packed bits (``pack_bits`` layout) of a verified mask file's tensor; for a format-6
    record, every free weight's symbol instead (int32, the layers' free positions back to back)."""
    layers, mask = config["layers"], config["mask"]
    n_free = sum(row["free"] for row in layers)
    coding, alphabet, symbols = coding_of(mask), alphabet_of(mask), is_symbol_record(mask)
    expected = entropy.raw_bytes(n_free, alphabet) if coding == "raw" else mask["bytes"]
    if mask.get("bits") != n_free * entropy.symbol_bits(alphabet) or payload.numel() != expected:
        raise TicketMismatchError(
            f"{name} holds {payload.numel()} bytes ({mask.get('bits')} bits recorded) but the layers in "
            f"config.json have {n_free} free weights, i.e. {expected} bytes {coding}-coded")
    if coding == "raw" and not symbols:
        return payload
    sizes = [row["free"] for row in layers]
    try:
        if coding == "raw":
            flat = entropy.unpack(payload.numpy().tobytes(), n_free, alphabet)
            streams = np.split(flat, np.cumsum(sizes)[:-1]) if sizes else []
        else:
            streams, records = entropy.decode_streams(payload.numpy().tobytes(), sizes, alphabet)
    except entropy.CodingError as err:
        raise TicketChecksumError(f"{name}'s {coding}-coded mask does not decode: {err}") from None
    if coding == "entropy":
        listed = [[r.method, r.bytes] for r in records]
        if listed != mask["entropy_layers"]:
            first = next(i for i, (a, b) in enumerate(zip(listed, mask["entropy_layers"])) if a != b)
            raise TicketChecksumError(f"{name}: layer {first}'s record is {listed[first]}, config.json records "
                                      f"{mask['entropy_layers'][first]} (method, bytes)")
    for row, part in zip(layers, streams):
        kept = int((part >= 1).sum())
        if kept != row["kept"] - row["locked"]:
            raise TicketMismatchError(
                f"{name}: layer {row['name']!r} decodes to {kept} kept free weights, config.json "
                f"records {row['kept'] - row['locked']} (kept {row['kept']} - locked {row['locked']})")
        if symbols:
            counts = np.bincount(part.astype(np.int64), minlength=alphabet)
            found = [[int(v), int(counts[v])] for v in np.flatnonzero(counts)]
            if found != row.get("symbol_counts"):
                raise TicketMismatchError(f"{name}: layer {row['name']!r} decodes to the symbol counts {found[:8]}, "
                                          f"config.json records {str(row.get('symbol_counts'))[:200]}")
    if symbols:
        flat = np.concatenate(streams) if streams else np.zeros(0, np.uint32)
        return torch.from_numpy(flat.astype(np.int32))
    bits = np.concatenate(streams).astype(np.uint8) if streams else np.zeros(0, np.uint8)
    return torch.from_numpy(np.packbits(bits, bitorder="little"))
