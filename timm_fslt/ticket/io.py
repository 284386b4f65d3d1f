"""Compact tickets on disk: ``save_ticket`` / ``load_ticket``.

A frozen ticket is tiny because everything random comes back from the seed: the
architecture and the ``FreezeConfig`` regenerate the weights and the freezing
pattern bit-exactly, so a ticket stores one bit per FREE weight plus the state
that no seed can rebuild (BatchNorm running statistics, trained biases, ...).

A ticket is a directory of three files (a Hub repo holds the same files plus a
model card, README.md):

``config.json``
    format and generator versions, the architecture (a timm model name or an
    importable builder ``"pkg.module:function"``, with kwargs), every ``freeze``
    argument (``FreezeConfig.to_dict()``), each masked layer's name, shape and
    counts, the optional compacted structure, metrics, and the byte size and
    sha256 of the two tensor files.
``supermask.safetensors``
    one 1-D uint8 tensor ``"supermask"`` of ``ceil(free / 8)`` bytes: the
    supermask of the free weights only.  Bit order: the masked layers in the
    order of ``config.json["layers"]``; within a layer its free positions in
    row-major (C) order; bit ``i`` of that stream is bit ``i % 8`` (least
    significant first) of byte ``i // 8``; the unused high bits of the last byte
    are 0.  1 = the weight is kept.
``state.safetensors``
    ``timm_fslt.report.non_regenerable_state(model)``, each tensor at its own dtype.

Loading reads only JSON and safetensors (never pickle).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import stat
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import safetensors.torch
import torch
from torch import nn

from timm_fslt import __version__
from timm_fslt import atomic
from timm_fslt.regen import pattern as freezing
from timm_fslt.frozen import ticket_freeze_config
from timm_fslt.nn import modules as L
from timm_fslt.ticket.architecture import (ARCH_HELP, build_architecture, build_for_check, count_elements,
                                           create_model, describe_architecture, normalize_architecture,
                                           register_builder, registered_builders, resolve_builder, _json_clean)
from timm_fslt.frozen import FreezeConfig, freeze, get_config, get_group, refresh_masks
from timm_fslt.errors import (ArchitectureError, TicketChecksumError, TicketError, TicketIntegrityWarning,
                              TicketMismatchError, TicketVersionError)
from timm_fslt.report import LayerSize, SizeReport, non_regenerable_state
from timm_fslt.regen.rng import GENERATOR_VERSION, GENERATOR_VERSIONS
from timm_fslt.nn.supermask import free_entries

FORMAT = "timm_fslt.ticket"
FORMAT_VERSION = 2  # 2: config.json carries an "integrity" record (format 1 is still read)
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
BIT_ORDER = ("layers in config order; free positions of each layer in row-major order; "
             "bit i is bit (i % 8), least significant first, of byte i // 8; padding bits are 0")

PathLike = Union[str, os.PathLike]


# -- architecture -------------------------------------------------------------------

def _layer_mismatch(model: nn.Module, arch: Mapping, config: FreezeConfig,
                    structured: bool) -> Optional[str]:
    """Why ``arch`` does not rebuild ``model`` (None when it does)."""
    candidate = build_for_check(arch)
    targets = L.find_maskable(candidate, config.include, config.exclude)
    group = get_group(model)
    if len(targets) != len(group.layers):
        return (f"it has {len(targets)} maskable layers, the model has {len(group.layers)}")
    for (name, module), layer in zip(targets, group.layers):
        if name != layer.layer_name:
            return f"its maskable layer {name!r} stands where the model has {layer.layer_name!r}"
        try:
            L.check_initialized(name, module)
        except ValueError as err:
            raise ArchitectureError(f"{describe_architecture(arch)} builds lazy layers: {err}. A ticket "
                                    "needs an architecture that builds initialised layers") from None
        shape = tuple(L.weight_shape(module))
        if not structured and shape != tuple(layer.frozen.shape):
            return f"its layer {name!r} has weight shape {shape}, the model's has {tuple(layer.frozen.shape)}"
    state = candidate.state_dict()
    for key, value in non_regenerable_state(model).items():
        if key not in state:
            return f"it has no tensor {key!r}"
        if not structured and tuple(state[key].shape) != tuple(value.shape):
            return f"its {key!r} has shape {tuple(state[key].shape)}, the model's {tuple(value.shape)}"
    return None


def _infer_architecture(model: nn.Module) -> dict:
    cfg = getattr(model, "pretrained_cfg", None)
    name = cfg.get("architecture") if isinstance(cfg, Mapping) else None
    if not name:
        raise ArchitectureError(f"cannot tell which architecture built this {type(model).__name__}: {ARCH_HELP}")
    kwargs: dict = {}
    if isinstance(getattr(model, "num_classes", None), int):
        kwargs["num_classes"] = model.num_classes
    first_conv = cfg.get("first_conv")
    if isinstance(first_conv, str):
        try:
            in_chans = getattr(model.get_submodule(first_conv), "in_channels", None)
        except AttributeError:
            in_chans = None
        if isinstance(in_chans, int):
            kwargs["in_chans"] = in_chans
    return {"timm": name, "kwargs": kwargs}


def resolve_architecture(model: nn.Module, architecture: Optional[Mapping] = None) -> dict:
    """The architecture record for ``model``: explicit, recorded by ``create_model``, or inferred.

    An inferred one (timm's ``pretrained_cfg["architecture"]`` with num_classes and
    in_chans) is accepted only if it rebuilds exactly the model's layers; explicit
    and recorded ones are checked the same way, so a ticket that could not be
    loaded again is never written.
    """
    config = get_config(model)
    structured = getattr(model, "fslt_structure", None) is not None
    if architecture is not None:
        arch, source = normalize_architecture(architecture), "architecture="
    elif getattr(model, "fslt_architecture", None) is not None:
        arch, source = normalize_architecture(model.fslt_architecture, "model.fslt_architecture"), \
            "model.fslt_architecture"
    else:
        arch, source = normalize_architecture(_infer_architecture(model)), None
    problem = _layer_mismatch(model, arch, config, structured)
    if problem is not None:
        if source is None:
            raise ArchitectureError(
                f"cannot infer the architecture unambiguously: timm's pretrained_cfg names "
                f"{describe_architecture(arch)}, but {problem}; {ARCH_HELP}")
        raise ArchitectureError(f"{source} {describe_architecture(arch)} does not rebuild this model: "
                                f"{problem}")
    return arch


# -- bits -----------------------------------------------------------------------------

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
    values = packed.reshape(-1).to(torch.int32)
    bits = ((values.unsqueeze(1) >> torch.arange(8, dtype=torch.int32)) & 1).reshape(-1)
    if bool(bits[n:].any()):
        raise TicketChecksumError("the supermask's padding bits are not zero: the mask file is corrupted")
    return bits[:n].bool()


# -- saving -----------------------------------------------------------------------------

def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_metrics(metrics: Optional[Mapping]) -> dict:
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


def _check_datasets(datasets: Union[None, str, Sequence[str]]) -> list:
    if datasets is None:
        return []
    if isinstance(datasets, str):
        datasets = [datasets]
    datasets = list(datasets)
    if not all(isinstance(d, str) and d for d in datasets):
        raise TicketError(f"datasets must be Hub dataset ids (non-empty strings), got {datasets!r}")
    return datasets


def _frozen_group(model: nn.Module):
    if not isinstance(model, nn.Module):
        raise TicketError(f"model must be a frozen torch.nn.Module, got {type(model).__name__}")
    if getattr(model, "_fslt_group", None) is None or getattr(model, "fslt_config", None) is None:
        raise TicketError("model is not frozen: call timm_fslt.freeze(model, prune=..., lock=...) "
                          "and search its supermask before saving a ticket")
    return get_group(model)


def _is_ticket_dir(directory: Path) -> bool:
    """A directory holding only ticket files, whose config.json says it is a ticket."""
    names = {p.name for p in directory.iterdir()}
    if CONFIG_NAME not in names or not names <= set(TICKET_FILES) | {CARD_NAME}:
        return False
    try:
        config = json.loads((directory / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("format") == FORMAT


def _digest(*tensors: torch.Tensor) -> str:
    """128 bits of sha256 over tensors' dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().to("cpu").contiguous()
        h.update(f"{str(t.dtype).replace('torch.', '')}{list(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:32]


@torch.no_grad()
def _layer_digests(model: nn.Module, masked: bool) -> dict[str, str]:
    """Per masked layer: the digest of its regenerated weight and freezing code (``regen_digest``),
    or of the weight its forward uses, ``W * mask * scale`` (``masked_digest``)."""
    out = {}
    for name, module in L.iter_frozen(model):
        supermask = next(p for p in module.parametrizations["weight"] if type(p).__name__ == "FrozenSupermask")
        tensors = (module.weight,) if masked else (module.parametrizations["weight"].original, supermask.frozen)
        out[supermask.layer_name] = _digest(*tensors)
    return out


# -- integrity of config.json ----------------------------------------------------------

def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def _field_digests(document: Mapping) -> dict[str, str]:
    """64-bit digests of each field (``freeze.seed``, ``layers[3]``, ...): they name what an edit changed."""
    out = {}
    for key, value in document.items():
        if key == "integrity":
            continue
        if isinstance(value, dict) and value:
            for sub, item in value.items():
                out[f"{key}.{sub}"] = hashlib.sha256(_canonical(item)).hexdigest()[:16]
        elif isinstance(value, list) and value:
            for i, item in enumerate(value):
                out[f"{key}[{i}]"] = hashlib.sha256(_canonical(item)).hexdigest()[:16]
        else:
            out[key] = hashlib.sha256(_canonical(value)).hexdigest()[:16]
    return out


def seal_config(document: Mapping) -> dict:
    """``document`` with its ``integrity`` record: the sha256 of the canonical JSON of every
    other field, and per-field digests that name an edited field on load.

    Integrity, not authenticity: whoever rewrites a ticket can reseal it. A ticket's
    identity is ``config["integrity"]["config_sha256"]``; pin it with
    ``load_ticket(..., expected_sha256=...)`` to accept exactly one ticket.
    """
    body = {k: v for k, v in document.items() if k != "integrity"}
    return {**body, "integrity": {"config_sha256": hashlib.sha256(_canonical(body)).hexdigest(),
                                  "fields": _field_digests(body)}}


def _verify_integrity(config: dict, path: Path) -> None:
    record = config.get("integrity")
    if config["format_version"] < 2 and record is None:
        warnings.warn(f"the ticket {str(path.parent)!r} was written by timm_fslt 0.1 (ticket format 1) and has "
                      f"no integrity record: an edit of its {CONFIG_NAME} cannot be detected; save it again "
                      "with this release to seal it", TicketIntegrityWarning, stacklevel=4)
        return
    if not (isinstance(record, dict) and isinstance(record.get("config_sha256"), str)
            and isinstance(record.get("fields"), dict)):
        raise TicketChecksumError(f"{str(path)!r} has no valid 'integrity' record (config_sha256 and fields): "
                                  "the config was altered or truncated")
    body = {k: v for k, v in config.items() if k != "integrity"}
    digest = hashlib.sha256(_canonical(body)).hexdigest()
    if digest == record["config_sha256"]:
        return
    stored, now = record["fields"], _field_digests(body)
    changed = sorted(k for k in set(stored) | set(now) if stored.get(k) != now.get(k))
    named = [f"{k} ({'added' if k not in stored else 'removed' if k not in now else 'changed'})" for k in changed]
    raise TicketChecksumError(
        f"{str(path)!r} was edited after it was saved: its checksum {digest[:16]}... does not match "
        f"{str(record['config_sha256'])[:16]}... recorded in it; edited field"
        f"{'s' if len(named) != 1 else ''}: {', '.join(named[:10]) or 'the integrity record itself'}"
        f"{', ...' if len(named) > 10 else ''}")


# -- saving -----------------------------------------------------------------------------

def ticket_files(model: nn.Module, *, architecture: Optional[Mapping] = None,
                 metrics: Optional[Mapping] = None,
                 datasets: Union[None, str, Sequence[str]] = None) -> dict[str, bytes]:
    """The bytes of the three ticket files of a frozen model (``save_ticket`` writes them)."""
    group = _frozen_group(model)
    config = get_config(model)
    metrics = _check_metrics(metrics)
    datasets = _check_datasets(datasets)
    structure = getattr(model, "fslt_structure", None)
    if structure is not None:
        structure = _json_clean(structure, "model.fslt_structure")
    arch = resolve_architecture(model, architecture)

    group.refresh()
    digests, masked = _layer_digests(model, masked=False), _layer_digests(model, masked=True)
    dtypes = L.frozen_weight_dtypes(model)
    layers, bits = [], []
    for layer in group.layers:
        counts = layer.counts()
        layers.append({"name": layer.layer_name, "shape": list(layer.frozen.shape), **counts,
                       "regen_digest": digests[layer.layer_name], "masked_digest": masked[layer.layer_name],
                       "dtype": L.dtype_name(dtypes[id(layer)])})
        if structure is None:  # (t1, t2) of the regenerated code; a compacted layer's code is not one
            layers[-1]["freeze_keys"] = list(freezing.freeze_keys_of_code(
                config.seed, layer.layer_name, layer.frozen, counts["pruned"], counts["locked"]))
        bits.append(free_entries(layer.mask, layer.frozen).cpu())
    all_bits = torch.cat(bits) if bits else torch.zeros(0, dtype=torch.bool)
    n_free = sum(row["free"] for row in layers)
    assert all_bits.numel() == n_free
    # One metadata key only: safetensors writes several in a random (hash map) order,
    # and a ticket's bytes must not change between two saves of the same model.
    mask_bytes = safetensors.torch.save({MASK_TENSOR: pack_bits(all_bits)},
                                        metadata={"format": "timm_fslt.supermask"})

    state = {k: v.detach().cpu().contiguous().clone() for k, v in non_regenerable_state(model).items()}
    state_bytes = safetensors.torch.save(state, metadata={"format": "timm_fslt.state"})
    state_bits = sum(t.numel() * t.element_size() * 8 for t in state.values())

    document = seal_config({
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "generator_version": config.generator_version,
        "timm_fslt_version": __version__,
        "architecture": arch,
        "freeze": _json_clean(config.to_dict(), "the FreezeConfig"),
        "structure": structure,
        "layers": layers,
        "mask": {"file": MASK_NAME, "tensor": MASK_TENSOR, "bits": n_free,
                 "bytes": (n_free + 7) // 8, "order": BIT_ORDER},
        "state": {"file": STATE_NAME, "bits": state_bits,
                  "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
                              for k, v in state.items()}},
        "files": {MASK_NAME: {"bytes": len(mask_bytes), "sha256": _sha256(mask_bytes)},
                  STATE_NAME: {"bytes": len(state_bytes), "sha256": _sha256(state_bytes)}},
        "metrics": metrics,
        "datasets": datasets,
    })
    config_bytes = (json.dumps(document, indent=2, allow_nan=False) + "\n").encode("utf-8")
    return {MASK_NAME: mask_bytes, STATE_NAME: state_bytes, CONFIG_NAME: config_bytes}


def _is_complete_ticket(directory: Path) -> bool:
    try:
        read_ticket(directory)
    except (TicketError, OSError):
        return False
    return True


def save_ticket(model: nn.Module, directory: PathLike, *, architecture: Optional[Mapping] = None,
                overwrite: bool = False, metrics: Optional[Mapping] = None,
                datasets: Union[None, str, Sequence[str]] = None) -> Path:
    """Save a frozen model's ticket (config.json, supermask.safetensors, state.safetensors).

    architecture: ``{"timm": name, "kwargs": {...}}`` or ``{"builder": "<registered name>",
        "kwargs": {...}}`` (see ``timm_fslt.register_builder``); by default the one
        ``timm_fslt.create_model`` recorded, else inferred from timm's ``pretrained_cfg``
        when that rebuilds exactly this model.
    overwrite: a directory that already holds a ticket is replaced; any other
        non-empty directory is refused unless ``overwrite=True`` (then its contents
        are replaced).
    metrics: e.g. ``{"accuracy": 0.91}``, stored in config.json and shown on the model card.
    datasets: Hub dataset ids the metrics were measured on (for the model card).

    The files are written to a hidden sibling directory and exchanged with the old
    ticket in one atomic step, so the path holds a complete ticket (old or new) at
    every instant; concurrent saves to one path wait for each other. Returns the
    ticket directory.
    """
    if not isinstance(overwrite, bool):
        raise TicketError(f"overwrite must be True or False, got {overwrite!r}")
    directory = Path(directory).expanduser().resolve()
    if not directory.name:
        raise TicketError(f"cannot save a ticket to {str(directory)!r}: give a directory with a name")
    files = ticket_files(model, architecture=architecture, metrics=metrics, datasets=datasets)
    if directory.exists():
        if not directory.is_dir():
            raise TicketError(f"cannot save a ticket to {str(directory)!r}: it exists and is not a directory")
        entries = sorted(p.name for p in directory.iterdir())
        if entries and not overwrite and not _is_ticket_dir(directory):
            shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
            raise TicketError(f"directory {str(directory)!r} is not empty and does not hold a ticket "
                              f"(it contains {shown}); save to a new or empty directory, or pass "
                              "overwrite=True to replace its contents")
    try:
        atomic.write_directory(directory, files, _is_complete_ticket)
    except TimeoutError as err:
        raise TicketError(f"cannot save a ticket to {str(directory)!r}: {err}") from err
    except OSError as err:
        raise TicketError(f"cannot save a ticket to {str(directory)!r}: {type(err).__name__}: {err} "
                          "(any previous ticket there is intact)") from err
    return directory


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


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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
    config = parse_json(data, path)
    version = config.get("format_version") if isinstance(config, dict) else None
    newer = _is_int(version) and version > FORMAT_VERSION  # a newer format may seal differently
    if isinstance(config, dict) and "integrity" in config and not newer:
        _verify_integrity(config, path)  # first, so that an edit of any field is named as an edit
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise TicketError(f"{str(path)!r} is not a timm_fslt ticket config (format {found!r}, "
                          f"expected {FORMAT!r})")
    version = config.get("format_version")
    if not _is_int(version) or version < 1:
        raise TicketError(f"{str(path)!r} has an invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise TicketVersionError(
            f"the ticket at {str(directory)!r} uses ticket format version {version}, newer than "
            f"this timm_fslt {__version__} reads (up to {FORMAT_VERSION}); upgrade timm_fslt to load it")
    if "integrity" not in config:
        _verify_integrity(config, path)  # format 1 warns; a newer format without a seal is refused
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
                and all(_is_int(d) and d >= 0 for d in row["shape"])
                and all(_is_int(row.get(k)) and row[k] >= 0 for k in ("numel", "pruned", "locked", "free", "kept"))
                and row["numel"] == math.prod(row["shape"])
                and row["pruned"] + row["locked"] + row["free"] == row["numel"]):
            raise TicketError(f"{str(path)!r} has a malformed layers[{i}] entry {row!r}: it needs a name, a shape "
                              "and counts with pruned + locked + free = numel = the shape's product")
    state = config["state"]
    tensors = state.get("tensors", {})
    if not (_is_int(state.get("bits", 0)) and isinstance(tensors, dict) and all(
            isinstance(t, dict) and isinstance(t.get("shape"), list) and all(_is_int(d) and d >= 0 for d in t["shape"])
            and isinstance(t.get("dtype"), str) for t in tensors.values())):
        raise TicketError(f"{str(path)!r} has a malformed 'state' entry: 'bits' must be an int and 'tensors' "
                          "map names to a shape and a dtype")
    try:
        config["metrics"] = _check_metrics(config.get("metrics"))
        config["datasets"] = _check_datasets(config.get("datasets"))
    except TicketError as err:
        raise TicketError(f"{str(path)!r}: {err}") from None
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
        n_tensors, payload = 1, (sum(row["free"] for row in config["layers"]) + 7) // 8
    else:
        tensors = config["state"].get("tensors", {})
        n_tensors = len(tensors)
        payload = sum(math.prod(t["shape"]) * 8 for t in tensors.values())  # 8 bytes: the widest dtype
    return 8 + _HEADER_BYTES_BASE + _HEADER_BYTES_PER_TENSOR * n_tensors + payload


def _read_tensor_file(directory: Path, config: dict, name: str,
                      root: Optional[Path] = None) -> dict[str, torch.Tensor]:
    path = directory / name
    record = config["files"].get(name)
    if not isinstance(record, dict) or not _is_int(record.get("bytes")) or not isinstance(record.get("sha256"), str):
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
    digest = _sha256(data)
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
    n_free = sum(row["free"] for row in config["layers"])
    if packed is None or packed.dtype != torch.uint8 or packed.dim() != 1:
        raise TicketError(f"{MASK_NAME} must hold a 1-D uint8 tensor {MASK_TENSOR!r}")
    if config["mask"].get("bits") != n_free or packed.numel() != (n_free + 7) // 8:
        raise TicketMismatchError(
            f"{MASK_NAME} holds {packed.numel()} bytes ({config['mask'].get('bits')} bits recorded) but the "
            f"layers in {CONFIG_NAME} have {n_free} free weights, i.e. {(n_free + 7) // 8} bytes")
    state = _read_tensor_file(directory, config, STATE_NAME, root)
    return config, packed, state


def size_report_from_config(config: Mapping) -> SizeReport:
    """The ``SizeReport`` of a saved ticket, from its config.json alone (no model needed)."""
    rows = [LayerSize(name=r["name"], shape=tuple(r["shape"]), numel=r["numel"], pruned=r["pruned"],
                      locked=r["locked"], free=r["free"], kept=r["kept"]) for r in config["layers"]]
    state = config.get("state", {})
    tensors = {k: [v["shape"], v["dtype"]] for k, v in state.get("tensors", {}).items()}
    return SizeReport(layers=rows, state_bits=int(state.get("bits", 0)), state_tensors=tensors)


# -- loading ------------------------------------------------------------------------------

def _check_layers(group, config: dict, arch: Mapping) -> None:
    stored = config["layers"]
    if len(group.layers) != len(stored):
        raise TicketMismatchError(
            f"the ticket stores masks for {len(stored)} layers but the model rebuilt from "
            f"{describe_architecture(arch)} has {len(group.layers)} masked layers: layer count mismatch")
    for layer, row in zip(group.layers, stored):
        if layer.layer_name != row["name"]:
            raise TicketMismatchError(f"the ticket's layer {row['name']!r} stands where the rebuilt model "
                                      f"has {layer.layer_name!r}")
        shape = list(layer.frozen.shape)
        if shape != row["shape"]:
            raise TicketMismatchError(f"layer {row['name']!r}: the ticket's mask has shape {tuple(row['shape'])} "
                                      f"but the rebuilt layer's weight has shape {tuple(shape)}")
    # Counts only after every shape matched: one wrong shape shifts other layers' erk/igq counts.
    for layer, row in zip(group.layers, stored):
        counts = layer.counts()
        for key in ("pruned", "locked", "free"):
            if counts[key] != row[key]:
                raise TicketMismatchError(
                    f"layer {row['name']!r}: the seed regenerates {counts[key]} {key} weights but the ticket "
                    f"records {row[key]}")


@torch.no_grad()
def _apply_mask(model: nn.Module, config: dict, packed: torch.Tensor) -> None:
    """Set scores so the group's own top-k selection picks exactly the stored free bits.

    Scores keep their regenerated initial values, except that every stored-kept free
    weight's |score| is lifted above the largest free |score| of the model; the next
    refresh (automatic at each forward, or after an optimizer step) then reproduces
    the stored mask, and a further search can continue from there.
    """
    group = get_group(model)
    sizes = [row["free"] for row in config["layers"]]
    selected = unpack_bits(packed, sum(sizes)).split(sizes)
    # scores hold the free weights only, in row-major order: the order of the stored bits
    top = max((float(layer.scores.detach().abs().max()) for layer in group.layers
               if layer.scores.numel()), default=0.0)
    lift = torch.nextafter(torch.tensor(top, dtype=torch.float32), torch.tensor(math.inf)).item()
    for layer, sel in zip(group.layers, selected):
        scores = layer.scores
        magnitude = scores.abs() + torch.where(sel.to(scores.device), lift, 0.0).to(scores.dtype)
        scores.copy_(torch.where(scores < 0, -magnitude, magnitude))
    refresh_masks(model)
    for layer, sel, row in zip(group.layers, selected, config["layers"]):
        if not torch.equal(free_entries(layer.mask, layer.frozen).cpu(), sel):
            kept_stored = sum(int(s.sum()) + r["locked"] for s, r in zip(selected, config["layers"]))
            kept_now = sum(int(g.mask.sum()) for g in group.layers)
            raise TicketMismatchError(
                f"the stored supermask keeps {kept_stored} weights but sparsity {group.sparsity} with scope "
                f"{group.scope!r} selects {kept_now} (first difference in layer {row['name']!r}): the mask "
                f"file does not belong to this configuration")


@torch.no_grad()
def _load_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    expected = non_regenerable_state(model)
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise TicketMismatchError(f"{STATE_NAME} does not fit the rebuilt model: missing {missing[:5]}, "
                                  f"unexpected {extra[:5]}")
    for key, target in expected.items():
        value = state[key]
        if tuple(value.shape) != tuple(target.shape) or value.dtype != target.dtype:
            raise TicketMismatchError(
                f"{STATE_NAME}: {key!r} is {tuple(value.shape)} {value.dtype}, the rebuilt model's "
                f"is {tuple(target.shape)} {target.dtype}")
        target.copy_(value)


def load_ticket(source: PathLike, *, materialize: bool = False, revision: Optional[str] = None,
                token: Union[str, bool, None] = None, cache_dir: Optional[PathLike] = None,
                trust_builder: bool = False, max_params: int = DEFAULT_MAX_PARAMS,
                max_build_seconds: float = DEFAULT_MAX_BUILD_SECONDS,
                expected_sha256: Optional[str] = None) -> nn.Module:
    """Rebuild a saved ticket: a local directory or a Hugging Face Hub repo id ("user/repo").

    The model is rebuilt from the architecture, re-frozen with the stored
    FreezeConfig (which regenerates weights and freezing pattern from the seed),
    its supermask set from the stored bits and its non-regenerable state loaded.
    It is returned in eval mode; its outputs are bit-identical to the saved
    model's.  ``materialize=True`` returns the plain model (``timm_fslt.materialize``).

    source: a directory, or a Hub repo id ``"user/name"`` (``"hf-hub:user/name"`` forces the
        Hub; a relative path whose parent folder exists here is always read as a path).
    revision, token, cache_dir: passed to ``huggingface_hub.snapshot_download`` for
        repo ids (with ``HF_HUB_OFFLINE=1`` the local Hub cache is used).
    trust_builder: allow an architecture given as an import path ``"pkg.module:function"``
        (it is imported and called: this RUNS CODE the ticket names). Registered builder
        names (``timm_fslt.register_builder``) and timm names never need it.
    max_params: refuse tickets whose declared layers and state, or whose architecture, have
        more parameter and buffer elements than this; the architecture is counted on the
        meta device while it is built and stopped as soon as it passes the bound.
    max_build_seconds: stop building the architecture after this long.
    expected_sha256: accept only the ticket whose ``config["integrity"]["config_sha256"]``
        is this (it covers every field and, through the file checksums, every byte).
    A compacted ticket (config "structure") is re-compacted with
    ``timm_fslt.pruning.compact.restore_structure`` after freezing, before the bits apply.

    Every failure is a ``timm_fslt.TicketError``: files are read as JSON and
    safetensors only, and nothing a ticket says can run code without ``trust_builder``.
    """
    from timm_fslt.ticket.hub import HUB_PREFIX, redownload, resolve_ticket_source

    if isinstance(max_params, bool) or not isinstance(max_params, int) or max_params < 1:
        raise TicketError(f"max_params must be a positive int, got {max_params!r}")
    if isinstance(max_build_seconds, bool) or not isinstance(max_build_seconds, (int, float)) \
            or not max_build_seconds > 0 or not math.isfinite(max_build_seconds):
        raise TicketError(f"max_build_seconds must be a positive number of seconds, got {max_build_seconds!r}")
    if expected_sha256 is not None and not (isinstance(expected_sha256, str) and len(expected_sha256) == 64
                                            and all(c in "0123456789abcdef" for c in expected_sha256)):
        raise TicketError(f"expected_sha256 must be 64 lowercase hex digits (config['integrity']"
                          f"['config_sha256'] of the ticket to accept), got {expected_sha256!r}")
    if isinstance(source, (str, os.PathLike)) and not os.fsdecode(os.fspath(source)).startswith(HUB_PREFIX):
        # a save killed between its two fallback renames left the old ticket in a hidden sibling
        atomic.recover(Path(os.fsdecode(os.fspath(source))).expanduser(), _is_complete_ticket)
    found = resolve_ticket_source(source, revision=revision, token=token, cache_dir=cache_dir)
    try:
        config, packed, state = read_ticket(found.directory, max_params=max_params, root=found.root)
    except TicketChecksumError:
        if found.repo_id is None:
            raise
        found = redownload(found, revision=revision, token=token, cache_dir=cache_dir)
        config, packed, state = read_ticket(found.directory, max_params=max_params, root=found.root)
    if expected_sha256 is not None:
        actual = (config.get("integrity") or {}).get("config_sha256")
        if actual != expected_sha256:
            raise TicketChecksumError(f"the ticket at {str(found.directory)!r} has config_sha256 {actual!r}, "
                                      f"not the expected_sha256 {expected_sha256!r}")
    try:
        model = _rebuild(config, packed, state, trust_builder, max_params, float(max_build_seconds))
    except TicketError:
        raise
    except Exception as err:  # malformed content the checks above did not foresee
        raise TicketError(f"the ticket at {str(found.directory)!r} could not be rebuilt: "
                          f"{type(err).__name__}: {err}") from err
    if materialize:
        from timm_fslt.materialize import materialize as _materialize
        return _materialize(model)
    return model


def _check_digests(model: nn.Module, config: dict, masked: bool) -> None:
    """Every layer's regenerated weight and code (or, once the mask and state are in, the weight
    its forward uses) against the digest saved with the ticket."""
    key = "masked_digest" if masked else "regen_digest"
    digests = _layer_digests(model, masked)
    freeze_cfg = config["freeze"]
    for row in config["layers"]:
        saved = row.get(key)
        if saved is None:
            continue  # written by timm_fslt 0.1 (its config has no integrity record: warned on read)
        if digests.get(row["name"]) != saved:
            what = ("W * mask * scale differs from the one" if masked else
                    "the seed regenerates other weights or freezing code than those")
            raise TicketChecksumError(
                f"layer {row['name']!r}: {what} the ticket was saved with ({key} {digests.get(row['name'])} != "
                f"{saved}; seed={freeze_cfg.get('seed')!r}, weight_init={freeze_cfg.get('weight_init')!r}, "
                f"scale={freeze_cfg.get('scale')!r}, generator_version={config.get('generator_version')!r}): "
                "the ticket would load as another network")


def _rebuild(config: dict, packed: torch.Tensor, state: Mapping[str, torch.Tensor],
             trust_builder: bool, max_params: int, max_seconds: float) -> nn.Module:
    arch = config["architecture"]
    resolve_builder(arch, trust_builder)  # refuses unregistered names and untrusted paths; calls nothing
    counted = build_for_check(arch, trust_builder=trust_builder, max_params=max_params, max_seconds=max_seconds)
    n_params = count_elements(counted)
    del counted
    if n_params > max_params:
        raise ArchitectureError(f"{describe_architecture(arch)} has {n_params:,} parameters, more than "
                                f"max_params={max_params:,}; pass a larger max_params to load it")
    model = build_architecture(arch, trust_builder=trust_builder, max_params=max_params, max_seconds=max_seconds)
    try:
        freeze_config = ticket_freeze_config(config)  # the ticket's generator version; warns for v1 normal
    except (TypeError, ValueError) as err:
        raise TicketError(f"{CONFIG_NAME} 'freeze' is not a valid FreezeConfig: {err}") from err
    try:
        L.cast_to_recorded_dtypes(model, config["layers"])  # weights regenerate at the recorded dtype
    except ValueError as err:
        raise TicketError(f"{CONFIG_NAME}: {err}") from err
    try:
        freeze(model, config=freeze_config)
    except (TypeError, ValueError) as err:
        raise TicketMismatchError(f"the ticket's freeze settings do not fit {describe_architecture(arch)}: "
                                  f"{err}") from err
    structure = config.get("structure")
    if structure is not None:
        from timm_fslt.pruning.compact import restore_structure
        try:
            restore_structure(model, structure)
        except Exception as err:
            raise TicketMismatchError(f"the ticket's compacted structure does not fit the rebuilt model: "
                                      f"{type(err).__name__}: {err}") from err
        if getattr(model, "fslt_structure", None) is None:
            model.fslt_structure = structure
    _check_layers(get_group(model), config, arch)
    _check_digests(model, config, masked=False)
    _apply_mask(model, config, packed)
    _load_state(model, state)
    _check_digests(model, config, masked=True)
    model.fslt_architecture = arch
    model.eval()
    return model
