"""The stored state of a ticket: the compact layout of ``state.safetensors`` and its lower precision.

Format 3 ("flat" layout). config.json's ``"state"`` record names the ``"state_dtype"`` and
lists every stored tensor under ``"tensors"``: key -> ``{"shape", "dtype"}`` (the model's
dtype; the stored dtype follows from it and ``state_dtype``, ``stored_dtype``).
``state.safetensors`` holds one 1-D tensor per stored dtype, named by it (``"float32"``, ``"bfloat16"``, ``"int64"``, ...): the tensors stored at that
dtype, flattened in row-major order and concatenated in the sorted order of their keys
(Unicode code points: the order of the sealed canonical JSON, so a reordered record cannot
load as other statistics). The file's header is a few entries whatever the number of tensors;
the names, shapes and dtypes are sealed in config.json. ``"bits"`` is the exact payload.

Formats 1 and 2 ("per-tensor" layout): one safetensors tensor per key, at its own dtype.

``state_dtype`` (``save_ticket(..., state_dtype=...)``): ``None`` stores every tensor at its
own dtype (a loaded ticket is bit-identical to the saved model). ``"bfloat16"`` or
``"float16"`` rounds every floating tensor wider than it (BatchNorm running statistics,
trained biases, tensors kept as built) to it, to nearest even (``Tensor.to``); loading casts
the values back to the recorded dtype, so a loaded model equals the saved model with its
stored state rounded the same way (``round_state``). Integer and narrower tensors are kept.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional

import safetensors.torch
import torch
from torch import nn

from timm_fslt.errors import TicketError, TicketMismatchError
from timm_fslt.report import non_regenerable_state

LAYOUT = "flat"
STATE_DTYPES = ("bfloat16", "float16")
# The dtypes a ticket may store (safetensors' own, without the 8-bit floats no state uses).
DTYPES = {name: getattr(torch, name) for name in (
    "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")}
ITEMSIZE = {name: torch.empty(0, dtype=dtype).element_size() for name, dtype in DTYPES.items()}
_FLOATING = {"float64", "float32", "float16", "bfloat16"}
_METADATA = {"format": "timm_fslt.state"}  # one key: several are written in a random order


def check_state_dtype(state_dtype) -> Optional[str]:
    """``None``, ``"bfloat16"`` or ``"float16"`` (``torch.bfloat16``/``torch.float16`` too)."""
    if isinstance(state_dtype, torch.dtype):
        state_dtype = str(state_dtype).replace("torch.", "")
    if state_dtype is None or (isinstance(state_dtype, str) and state_dtype in STATE_DTYPES):
        return state_dtype
    raise TicketError(f"state_dtype must be None (state at its own precision, bit-exact) or one of "
                      f"{list(STATE_DTYPES)} (floating state rounded to it), got {state_dtype!r}")


def stored_dtype(dtype: str, state_dtype: Optional[str]) -> str:
    """The dtype a tensor of ``dtype`` is stored at: ``state_dtype`` for wider floating tensors."""
    if state_dtype is not None and dtype in _FLOATING and ITEMSIZE[dtype] > ITEMSIZE[state_dtype]:
        return state_dtype
    return dtype


def _dtype_name(key: str, tensor: torch.Tensor) -> str:
    name = str(tensor.dtype).replace("torch.", "")
    if name not in DTYPES:
        raise TicketError(f"state tensor {key!r} has dtype {name}, which a ticket cannot store "
                          f"(it stores {', '.join(DTYPES)})")
    return name


def _rounded(key: str, tensor: torch.Tensor, stored: str) -> torch.Tensor:
    """``tensor`` at ``stored``; refused when the rounding turns a finite value into an infinity."""
    out = tensor.to(DTYPES[stored])
    if out.dtype != tensor.dtype and bool((torch.isfinite(tensor) & ~torch.isfinite(out)).any()):
        largest = float(tensor[torch.isfinite(tensor)].abs().max())
        raise TicketError(f"state_dtype={stored!r} cannot hold state tensor {key!r}: its largest magnitude "
                          f"{largest:.6g} overflows {stored} (largest {torch.finfo(out.dtype).max:.6g}); "
                          f"use state_dtype='bfloat16' or None")
    return out


def stored_bits(state: Mapping[str, torch.Tensor], state_dtype: Optional[str] = None) -> int:
    """The bits ``state`` takes in a ticket saved with ``state_dtype``."""
    state_dtype = check_state_dtype(state_dtype)
    return sum(t.numel() * ITEMSIZE[stored_dtype(_dtype_name(k, t), state_dtype)] * 8 for k, t in state.items())


def encode_state(state: Mapping[str, torch.Tensor], state_dtype: Optional[str] = None) -> tuple[dict, bytes]:
    """(config.json's ``"state"`` record, the bytes of state.safetensors) in the flat layout."""
    state_dtype = check_state_dtype(state_dtype)
    tensors, groups = {}, {}
    for key in sorted(state):
        tensor = state[key].detach().to("cpu").contiguous()
        dtype = _dtype_name(key, tensor)
        stored = stored_dtype(dtype, state_dtype)
        tensors[key] = {"shape": list(tensor.shape), "dtype": dtype}
        groups.setdefault(stored, []).append(_rounded(key, tensor, stored).reshape(-1))
    flat = {name: torch.cat(parts) for name, parts in groups.items()}
    bits = sum(t.numel() * t.element_size() * 8 for t in flat.values())
    record = {"layout": LAYOUT, "state_dtype": state_dtype, "bits": bits, "tensors": tensors}
    return record, safetensors.torch.save(flat, metadata=dict(_METADATA))


# -- reading -------------------------------------------------------------------------------

def is_int(value) -> bool:
    """An int and not a bool (JSON numbers read as Python values)."""
    return isinstance(value, int) and not isinstance(value, bool)


def group_sizes(record: Mapping) -> dict[str, int]:
    """Elements per stored dtype, as the (validated) record declares them."""
    sizes = {}
    for key in sorted(record["tensors"]):
        stored = stored_dtype(record["tensors"][key]["dtype"], record.get("state_dtype"))
        sizes[stored] = sizes.get(stored, 0) + math.prod(record["tensors"][key]["shape"])
    return sizes


def payload_bytes(record: Mapping) -> int:
    return sum(n * ITEMSIZE[name] for name, n in group_sizes(record).items())


def is_flat(record: Mapping) -> bool:
    """The record's state file is in the flat layout (format 3; formats 1 and 2: one tensor per key)."""
    return record.get("layout") == LAYOUT


def check_record(state: Mapping, version: int) -> Optional[str]:
    """What is wrong with config.json's ``"state"`` record (None: nothing)."""
    tensors = state.get("tensors", {})
    if not (is_int(state.get("bits", 0)) and isinstance(tensors, dict) and all(
            isinstance(t, dict) and isinstance(t.get("shape"), list) and all(is_int(d) and d >= 0 for d in t["shape"])
            and isinstance(t.get("dtype"), str) for t in tensors.values())):
        return "'bits' must be an int and 'tensors' map names to a shape and a dtype"
    layout, state_dtype = state.get("layout"), state.get("state_dtype")
    if layout != LAYOUT and (version >= 3 or layout is not None):
        return f"'layout' must be {LAYOUT!r}{'' if version >= 3 else ' or absent'} in format {version}, got {layout!r}"
    if state_dtype is not None and (not isinstance(state_dtype, str) or state_dtype not in STATE_DTYPES):
        return f"'state_dtype' must be null or one of {list(STATE_DTYPES)}, got {state_dtype!r}"
    if layout is None:  # formats 1 and 2: one tensor per key at its own dtype
        return None if state_dtype is None else f"'state_dtype' needs the {LAYOUT!r} layout"
    for key, entry in tensors.items():
        if entry["dtype"] not in DTYPES or set(entry) != {"shape", "dtype"}:
            return f"tensor {key!r} must have a shape and a dtype of {list(DTYPES)}, got {entry!r}"
    expected = payload_bytes(state) * 8
    if state.get("bits") != expected:
        return f"'bits' is {state.get('bits')!r} but the tensors it lists hold {expected:,} bits"
    return None


def decode_state(record: Mapping, entries: Mapping[str, torch.Tensor], file_name: str) -> dict[str, torch.Tensor]:
    """The state tensors of a flat state file, at their recorded dtypes (the record is validated)."""
    sizes = group_sizes(record)
    if set(entries) != set(sizes):
        raise TicketMismatchError(f"{file_name} holds the tensors {sorted(entries)} but config.json's state "
                                  f"record stores dtypes {sorted(sizes)}")
    for name, n in sizes.items():
        value = entries[name]
        if value.dtype != DTYPES[name] or value.dim() != 1 or value.numel() != n:
            raise TicketMismatchError(f"{file_name}: {name!r} is {tuple(value.shape)} {value.dtype}, but "
                                      f"config.json's state record needs {n:,} elements of {name}")
    offsets, out = dict.fromkeys(sizes, 0), {}
    for key in sorted(record["tensors"]):
        entry = record["tensors"][key]
        name, n = stored_dtype(entry["dtype"], record.get("state_dtype")), math.prod(entry["shape"])
        part = entries[name][offsets[name]:offsets[name] + n]
        offsets[name] += n
        out[key] = part.reshape(entry["shape"]).to(DTYPES[entry["dtype"]])
    return out


# -- the lower-precision promise ------------------------------------------------------------------

@torch.no_grad()
def round_state(model: nn.Module, state_dtype: Optional[str]) -> nn.Module:
    """Round ``model``'s stored state in place as a ticket saved with ``state_dtype`` stores it.

    ``load_ticket`` of such a ticket equals this model: compare against it, not the original.
    """
    state_dtype = check_state_dtype(state_dtype)
    for key, tensor in non_regenerable_state(model).items():
        stored = stored_dtype(_dtype_name(key, tensor), state_dtype)
        if stored != _dtype_name(key, tensor):
            tensor.copy_(_rounded(key, tensor, stored).to(tensor.dtype))
    return model
