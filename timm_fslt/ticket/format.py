"""The ticket file format: constants, bit packing, and reading and validating a ticket directory.

A frozen ticket is tiny because everything random comes back from the seed: the
architecture and the ``FreezeConfig`` regenerate the weights and the freezing
pattern bit-exactly, so a ticket stores one bit per FREE weight plus the state
that no seed can rebuild (BatchNorm running statistics, trained biases, ...).

A ticket is a directory of three files, and optionally timm's ``model.safetensors``
(``save_ticket(timm_weights=True)``; a Hub repo holds the same files plus a model card, README.md):

``config.json``
    (format 4) timm's Hub keys at the top -- ``architecture``, ``num_classes``, ``model_args``,
    ``pretrained_cfg`` with the data config (``ticket.timm_config``) -- and under ``"timm_fslt"``:
    format and generator versions, the architecture record (a timm model name or a registered
    builder, with kwargs), every ``freeze`` argument (``FreezeConfig.to_dict()``), each masked
    layer's name, shape and counts, the optional compacted structure, metrics, the byte size and
    sha256 of the tensor files, and the seal. Formats 1-3 hold that record at the top.
``supermask.safetensors``
    (format 6, a search method's ticket: one symbol per free weight instead of a bit, raw or
    entropy-coded: ``ticket.method_record``)
    one 1-D uint8 tensor ``"supermask"`` of ``ceil(free / 8)`` bytes: the
    supermask of the free weights only.  Bit order: the masked layers in the
    order of ``config.json["layers"]``; within a layer its free positions in
    row-major (C) order; bit ``i`` of that stream is bit ``i % 8`` (least
    significant first) of byte ``i // 8``; the unused high bits of the last byte
    are 0.  1 = the weight is kept.  Format 5 (``save_ticket(mask_coding="entropy")``, or "auto"
    when smaller): the tensor holds one entropy-coded record per layer instead (``ticket.mask_coding``,
    ``timm_fslt.entropy``), which loading decodes to exactly those bits.
``state.safetensors``
    ``timm_fslt.report.non_regenerable_state(model)``: one flat 1-D tensor per stored dtype,
    the tensors in the sorted order of their keys, whose names, shapes and dtypes are in
    config.json's ``"state"`` record (``ticket.state_codec``; formats 1 and 2: one tensor per
    key). Floating state is at its own dtype, or rounded to ``state_dtype`` (bfloat16, float16).

Loading reads only JSON and safetensors (never pickle).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import stat
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import safetensors.torch
import torch

from timm_fslt.errors import ArchitectureError, TicketChecksumError, TicketError, TicketVersionError
from timm_fslt.regen.rng import GENERATOR_VERSION, GENERATOR_VERSIONS
from timm_fslt.report import LayerSize, SizeReport
from timm_fslt.ticket.architecture import normalize_architecture
from timm_fslt.ticket.integrity import OWN_KEY, is_nested, verify_integrity
from timm_fslt.ticket.mask_coding import alphabet_of, check_mask_record, coding_of, decode_mask, mask_payload_limit
from timm_fslt.ticket.method_record import check_method_record
from timm_fslt.ticket.state_codec import (check_record, decode_state, group_sizes, is_flat, is_int, payload_bytes,
                                          stored_dtype)
from timm_fslt.ticket.timm_config import check_timm_keys
from timm_fslt.version import __version__

FORMAT = "timm_fslt.ticket"
# 2: config.json carries an "integrity" record; 3: the state is stored flat, one tensor per dtype
# (ticket.state_codec), optionally at a lower precision; 4: config.json follows timm's Hub schema
# (architecture string, model_args, pretrained_cfg, ...: ticket.timm_config) and everything of
# timm_fslt's is under "timm_fslt"; 5: the supermask may be entropy-coded (ticket.mask_coding; a
# raw-mask ticket is still written as format 4); 6: a search method's ticket, a symbol per free weight
# (ticket.method_record; Edge-Popup tickets without a schedule are still written as format 4 or 5).
# Formats 1-5 are still read.
FORMAT_VERSION = 6
NESTED_SINCE = 4
CONFIG_NAME = "config.json"
MASK_NAME = "supermask.safetensors"
STATE_NAME = "state.safetensors"
MASK_TENSOR = "supermask"
CARD_NAME = "README.md"
MAX_CONFIG_BYTES = 4 * 2**20  # a ResNet-50 ticket's config.json is ~40 KB; 4 MiB fits ~10,000 layers
# Parameter and buffer elements a load may build. Loading peaks at 15-22 bytes per element
# (ResNet-50 / CIFAR ResNet-18, benchmarks/load_memory.py), so 500M elements stay within ~11 GB:
# under half of this project's 24 GiB machines. Larger models pass max_params explicitly.
DEFAULT_MAX_PARAMS = 500_000_000
DEFAULT_MAX_BUILD_SECONDS = 120.0
# A safetensors header: 8 length bytes + JSON for the tensors the config declares.
_HEADER_BYTES_PER_TENSOR = 256
_HEADER_BYTES_BASE = 1024
TICKET_FILES = (CONFIG_NAME, MASK_NAME, STATE_NAME)
TIMM_WEIGHTS_NAME = "model.safetensors"  # optional (save_ticket(timm_weights=True)); load_ticket never reads it
BIT_ORDER = ("layers in config order; free positions of each layer in row-major order; "
             "bit i is bit (i % 8), least significant first, of byte i // 8; padding bits are 0")


PathLike = Union[str, os.PathLike]


# -- small checks shared by saving, reading and the Hub ---------------------------------

def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_metrics(metrics: Optional[Mapping]) -> dict:
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise TicketError(f"metrics must be a dict of name -> number, got {type(metrics).__name__}")
    out = {}
    for key, value in metrics.items():
        if not isinstance(key, str) or not key:
            raise TicketError(f"metrics keys must be non-empty strings, got {key!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise TicketError(f"metrics[{key!r}] must be a finite number, got {value!r}")
        out[key] = value
    return out


def check_datasets(datasets: Union[None, str, Sequence[str]]) -> list:
    if datasets is None:
        return []
    if isinstance(datasets, str):
        datasets = [datasets]
    datasets = list(datasets)
    if not all(isinstance(d, str) and d for d in datasets):
        raise TicketError(f"datasets must be Hub dataset ids (non-empty strings), got {datasets!r}")
    return datasets


def check_bool(value, what: str) -> bool:
    if not isinstance(value, bool):
        raise TicketError(f"{what} must be True or False, got {value!r}")
    return value


def check_listed_file(path: Path, record: Mapping) -> bytes:
    """A file the ticket lists but the loader never reads (timm's ``model.safetensors``): its bytes,
    or a ``TicketChecksumError`` when it is missing or its size or sha256 differs from ``record``."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise TicketChecksumError(f"the ticket lists {Path(path).name} but it cannot be read: {err}") from err
    if len(data) != record.get("bytes") or sha256_hex(data) != record.get("sha256"):
        raise TicketChecksumError(f"{str(path)!r} does not match the size and sha256 its config.json records: "
                                  "it was altered or cut short; save the ticket again")
    return data


def is_ticket_dir(directory: Path) -> bool:
    """A directory holding only ticket files, whose config.json says it is a ticket."""
    names = {p.name for p in directory.iterdir()}
    if CONFIG_NAME not in names or not names <= set(TICKET_FILES) | {CARD_NAME, TIMM_WEIGHTS_NAME}:
        return False
    try:  # the loader's own bounded, link-refusing read: a huge or linked file is not a ticket
        config = parse_json(_read_regular_file(directory / CONFIG_NAME, MAX_CONFIG_BYTES), directory / CONFIG_NAME)
    except (OSError, TicketError, _TooLarge):
        return False
    if is_nested(config):
        config = config[OWN_KEY]
    return isinstance(config, dict) and config.get("format") == FORMAT


# -- reading ----------------------------------------------------------------------------


class _TooLarge(Exception):
    def __init__(self, size: int):
        self.size = size


def _read_regular_file(path: Path, limit: int, root: Optional[Path] = None) -> bytes:
    """At most ``limit`` bytes of a regular file, never following a symlink out of ``root``.

    ``root`` is None for a local ticket: no symlink at all. A Hub snapshot's files are
    symlinks into the repo's own blob store, so there ``root`` is that repo folder.
    """
    if path.is_symlink():
        target = Path(os.path.realpath(path))
        if root is None or not target.is_relative_to(Path(os.path.realpath(root))):
            raise TicketError(f"{str(path)!r} is a symbolic link (to {str(target)!r}); a ticket's files must be "
                              "regular files inside the ticket")
        path = target
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as err:
        raise TicketError(f"cannot read {str(path)!r}: {err}") from err
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise TicketError(f"{str(path)!r} is not a regular file")
        if info.st_size > limit:
            raise _TooLarge(info.st_size)
        data = f.read(limit + 1)
    if len(data) > limit:
        raise _TooLarge(len(data))
    return data


def _no_duplicate_keys(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _no_constant(name):
    raise ValueError(f"{name} is not a JSON number (NaN and infinities are not allowed)")


def parse_json(data: bytes, path: Path):
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicate_keys,
                          parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise TicketError(f"{str(path)!r} is not valid JSON: {type(err).__name__}: {err}") from None


def read_config(directory: PathLike, *, root: Optional[PathLike] = None) -> dict:
    """Read and validate a ticket's config.json (format, versions, integrity, architecture, layers)."""
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not (path.is_file() or path.is_symlink()):
        raise TicketError(f"{str(directory)!r} is not a ticket: it has no {CONFIG_NAME}")
    try:
        data = _read_regular_file(path, MAX_CONFIG_BYTES, root)
    except _TooLarge as big:
        raise TicketError(f"{str(path)!r} has {big.size:,} bytes, more than the {MAX_CONFIG_BYTES:,} bytes a "
                          f"ticket's {CONFIG_NAME} may have; it was not read") from None
    document = parse_json(data, path)
    nested = is_nested(document)  # format 4: timm's keys at the top, ours under "timm_fslt"
    config = dict(document[OWN_KEY]) if nested else document
    version = config.get("format_version") if isinstance(config, dict) else None
    newer = is_int(version) and version > FORMAT_VERSION  # a newer format may seal differently
    if isinstance(config, dict) and "integrity" in config and not newer:
        verify_integrity(document, path)  # first, so that an edit of any field is named as an edit
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise TicketError(f"{str(path)!r} is not a timm_fslt ticket config (format {found!r}, "
                          f"expected {FORMAT!r})")
    version = config.get("format_version")
    if not is_int(version) or version < 1:
        raise TicketError(f"{str(path)!r} has an invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise TicketVersionError(
            f"the ticket at {str(directory)!r} uses ticket format version {version}, newer than "
            f"this timm_fslt {__version__} reads (up to {FORMAT_VERSION}); upgrade timm_fslt to load it")
    if nested != (version >= NESTED_SINCE):
        raise TicketError(f"{str(path)!r} has format_version {version} but "
                          + (f"keeps its record under {OWN_KEY!r}, which format {NESTED_SINCE} introduced"
                             if nested else f"its record is not under {OWN_KEY!r}, as format {version} has it"))
    if "integrity" not in config:
        verify_integrity(document, path)  # format 1 warns; a newer format without a seal is refused
    generator = config.get("generator_version")
    if isinstance(generator, bool) or generator not in GENERATOR_VERSIONS:
        raise TicketVersionError(
            f"the ticket was written with random generator version {generator!r}, but this timm_fslt "
            f"has generator version {GENERATOR_VERSION} (and regenerates versions {list(GENERATOR_VERSIONS)}): "
            f"its weights and freezing pattern cannot be "
            f"regenerated bit-exactly; load it with a timm_fslt release that has generator version {generator!r}")
    config["architecture"] = normalize_architecture(config.get("architecture"),
                                                    f"the ticket's architecture ({CONFIG_NAME})")
    for key, kind in (("freeze", dict), ("layers", list), ("files", dict), ("mask", dict), ("state", dict)):
        if not isinstance(config.get(key), kind):
            raise TicketError(f"{str(path)!r} lacks a valid {key!r} entry ({kind.__name__})")
    for i, row in enumerate(config["layers"]):
        if not (isinstance(row, dict) and isinstance(row.get("name"), str) and isinstance(row.get("shape"), list)
                and all(is_int(d) and d >= 0 for d in row["shape"])
                and all(is_int(row.get(k)) and row[k] >= 0 for k in ("numel", "pruned", "locked", "free", "kept"))
                and row["numel"] == math.prod(row["shape"])
                and row["pruned"] + row["locked"] + row["free"] == row["numel"]):
            raise TicketError(f"{str(path)!r} has a malformed layers[{i}] entry {row!r}: it needs a name, a shape "
                              "and counts with pruned + locked + free = numel = the shape's product")
    problem = check_record(config["state"], version)
    if problem is not None:
        raise TicketError(f"{str(path)!r} has a malformed 'state' entry: {problem}")
    problem = check_method_record(config, version) or check_mask_record(config["mask"], version, config["layers"])
    if problem is not None:
        raise TicketError(f"{str(path)!r} has a malformed 'mask' entry: {problem}")
    try:
        config["metrics"] = check_metrics(config.get("metrics"))
        config["datasets"] = check_datasets(config.get("datasets"))
    except TicketError as err:
        raise TicketError(f"{str(path)!r}: {err}") from None
    config["timm_config"], config["data_config"] = None, None
    if nested:  # timm reads these keys: they must describe the network our record rebuilds
        config["timm_config"], config["data_config"] = check_timm_keys(document, config["architecture"], path)
    return config


def _check_budget(config: dict, max_params: int, directory: Path) -> None:
    """The element counts config.json declares, against ``max_params``, before anything is read or built."""
    weights = sum(row["numel"] for row in config["layers"])
    state = sum(math.prod(t["shape"]) for t in config["state"].get("tensors", {}).values())
    if weights + state > max_params:
        raise ArchitectureError(
            f"the ticket at {str(directory)!r} declares {weights:,} masked weights and {state:,} state elements, "
            f"more than max_params={max_params:,}; pass a larger max_params to load it")


def _file_limit(config: dict, name: str) -> int:
    """The most bytes ``name`` can hold for the layers and state that config.json declares."""
    if name == MASK_NAME:
        n_tensors, payload = 1, mask_payload_limit(config)
    elif is_flat(config["state"]):  # one tensor per stored dtype: exact sizes
        n_tensors, payload = len(group_sizes(config["state"])), payload_bytes(config["state"])
    else:
        tensors = config["state"].get("tensors", {})
        n_tensors = len(tensors)
        payload = sum(math.prod(t["shape"]) * 8 for t in tensors.values())  # 8 bytes: the widest dtype
    return 8 + _HEADER_BYTES_BASE + _HEADER_BYTES_PER_TENSOR * n_tensors + payload


def _read_tensor_file(directory: Path, config: dict, name: str,
                      root: Optional[Path] = None) -> dict[str, torch.Tensor]:
    path = directory / name
    record = config["files"].get(name)
    if not isinstance(record, dict) or not is_int(record.get("bytes")) or not isinstance(record.get("sha256"), str):
        raise TicketError(f"{CONFIG_NAME} has no size and sha256 for {name}")
    limit = _file_limit(config, name)
    if record["bytes"] > limit:
        raise TicketChecksumError(
            f"{CONFIG_NAME} records {record['bytes']:,} bytes for {name}, but the layers and state it declares fit "
            f"in {limit:,}: the ticket was altered")
    try:
        data = _read_regular_file(path, record["bytes"], root)
    except FileNotFoundError:
        raise TicketChecksumError(f"the ticket at {str(directory)!r} is incomplete: {name} is missing") from None
    except _TooLarge as big:
        raise TicketChecksumError(
            f"{str(path)!r} is truncated or altered: it has {big.size:,} bytes, {CONFIG_NAME} records "
            f"{record['bytes']:,} (checksum mismatch); it was not read") from None
    if len(data) != record["bytes"]:
        raise TicketChecksumError(
            f"{str(path)!r} is truncated or altered: it has {len(data)} bytes, {CONFIG_NAME} records "
            f"{record['bytes']} (checksum mismatch)")
    digest = sha256_hex(data)
    if digest != record["sha256"]:
        raise TicketChecksumError(
            f"{str(path)!r} is corrupted: its sha256 checksum {digest[:16]}... does not match "
            f"{record['sha256'][:16]}... recorded in {CONFIG_NAME}")
    try:
        return safetensors.torch.load(data)
    except Exception as err:  # the checksum matched, so the writer produced a bad file
        raise TicketChecksumError(f"{str(path)!r} is not a valid safetensors file: {err}") from err


def read_ticket(directory: PathLike, *, max_params: Optional[int] = None,
                root: Optional[PathLike] = None) -> tuple[dict, torch.Tensor, dict[str, torch.Tensor]]:
    """(config, packed supermask bytes, state tensors) of a ticket directory, all verified.

    Files are never read past the sizes their config declares; ``max_params`` bounds the
    element counts declared before any tensor file is read.
    """
    directory = Path(directory)
    config = read_config(directory, root=root)
    if max_params is not None:
        _check_budget(config, max_params, directory)
    mask_tensors = _read_tensor_file(directory, config, MASK_NAME, root)
    packed = mask_tensors.get(MASK_TENSOR)
    if packed is None or packed.dtype != torch.uint8 or packed.dim() != 1:
        raise TicketError(f"{MASK_NAME} must hold a 1-D uint8 tensor {MASK_TENSOR!r}")
    packed = decode_mask(config, packed, MASK_NAME)  # entropy-coded: decoded to the raw bits
    state = _read_tensor_file(directory, config, STATE_NAME, root)
    if is_flat(config["state"]):
        state = decode_state(config["state"], state, STATE_NAME)
    return config, packed, state


def size_report_from_config(config: Mapping) -> SizeReport:
    """The ``SizeReport`` of a saved ticket, from its config.json alone (no model needed)."""
    coded = config.get("mask", {}).get("entropy_layers") or [[None, None]] * len(config["layers"])
    rows = [LayerSize(name=r["name"], shape=tuple(r["shape"]), numel=r["numel"], pruned=r["pruned"],
                      locked=r["locked"], free=r["free"], kept=r["kept"], coded_method=method,
                      coded_bits=None if size is None else 8 * size, symbol_counts=r.get("symbol_counts"))
            for r, (method, size) in zip(config["layers"], coded)]
    state = config.get("state", {})
    tensors = {k: [v["shape"], stored_dtype(v["dtype"], state.get("state_dtype"))]  # as stored
               for k, v in state.get("tensors", {}).items()}
    mask = config.get("mask", {})
    return SizeReport(layers=rows, state_bits=int(state.get("bits", 0)), state_tensors=tensors,
                      mask_coding=coding_of(mask), mask_alphabet=alphabet_of(mask), method=mask.get("method"))
