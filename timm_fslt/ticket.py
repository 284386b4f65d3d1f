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
import importlib
import json
import math
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import safetensors.torch
import torch
from torch import nn

from . import __version__
from . import layers as L
from .core import FreezeConfig, freeze, get_config, get_group, refresh_masks
from .errors import (ArchitectureError, TicketChecksumError, TicketError, TicketMismatchError,
                     TicketVersionError)
from .report import LayerSize, SizeReport, non_regenerable_state
from .rng import GENERATOR_VERSION
from .supermask import _free_entries

FORMAT = "timm_fslt.ticket"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
MASK_NAME = "supermask.safetensors"
STATE_NAME = "state.safetensors"
MASK_TENSOR = "supermask"
CARD_NAME = "README.md"
MAX_CONFIG_BYTES = 64 * 2**20  # a ResNet-50 ticket's config.json is ~30 KB
DEFAULT_MAX_PARAMS = 2_000_000_000
TICKET_FILES = (CONFIG_NAME, MASK_NAME, STATE_NAME)
BIT_ORDER = ("layers in config order; free positions of each layer in row-major order; "
             "bit i is bit (i % 8), least significant first, of byte i // 8; padding bits are 0")

# kwargs of timm.create_model that fetch weights but do not change the architecture.
_DOWNLOAD_KWARGS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path",
                    "cache_dir")
_BUILDER_RE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")
_ARCH_HELP = ("pass architecture={'timm': '<timm model name>', 'kwargs': {...}} or "
              "architecture={'builder': 'pkg.module:function', 'kwargs': {...}} to save_ticket, "
              "or build the model with timm_fslt.create_model(name, **kwargs)")

PathLike = Union[str, os.PathLike]


# -- architecture -------------------------------------------------------------------

def create_model(model_name: str, **kwargs) -> nn.Module:
    """``timm.create_model`` that remembers how it was called, so a ticket can rebuild it.

    Records ``model.fslt_architecture = {"timm": model_name, "kwargs": kwargs}``
    (download-only kwargs such as ``pretrained`` are left out: a ticket never
    needs pretrained weights).
    """
    import timm
    from . import models  # noqa: F401  (registers conv6 / resnet18_cifar in timm)

    if not isinstance(model_name, str) or not timm.is_model(model_name):
        raise ValueError(f"model_name must be a timm model name (see timm.list_models()), got {model_name!r}")
    model = timm.create_model(model_name, **kwargs)
    model.fslt_architecture = {
        "timm": model_name,
        "kwargs": {k: v for k, v in kwargs.items() if k not in _DOWNLOAD_KWARGS}}
    return model


def _json_clean(value: Any, what: str) -> Any:
    """``value`` as it will come back from JSON (tuples become lists), or a clear error."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as err:
        raise TicketError(f"{what} must be JSON-serialisable (str, int, float, bool, None, "
                          f"lists and dicts of them): {err}") from None


def normalize_architecture(architecture: Any, where: str = "architecture") -> dict:
    """Validate ``{"timm": name, "kwargs": {...}}`` / ``{"builder": "pkg.mod:fn", "kwargs": {...}}``."""
    if architecture is None:
        raise ArchitectureError(f"{where} is missing: {_ARCH_HELP}")
    if not isinstance(architecture, Mapping):
        raise ArchitectureError(f"{where} must be a dict, got {type(architecture).__name__}: {_ARCH_HELP}")
    unknown = set(architecture) - {"timm", "builder", "kwargs"}
    if unknown:
        raise ArchitectureError(f"{where} has unknown keys {sorted(unknown)}; allowed: 'timm' or "
                                "'builder', and 'kwargs'")
    kinds = [k for k in ("timm", "builder") if architecture.get(k) is not None]
    if len(kinds) != 1:
        raise ArchitectureError(f"{where} needs exactly one of 'timm' (a timm model name) or "
                                f"'builder' (an import path 'pkg.module:function'), got {dict(architecture)!r}")
    kind = kinds[0]
    name = architecture[kind]
    if not isinstance(name, str) or not name:
        raise ArchitectureError(f"{where}[{kind!r}] must be a non-empty string, got {name!r}")
    if kind == "builder" and not _BUILDER_RE.match(name):
        raise ArchitectureError(f"{where}['builder'] must be an import path 'pkg.module:function', "
                                f"got {name!r}")
    kwargs = architecture.get("kwargs") or {}
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise ArchitectureError(f"{where}['kwargs'] must be a dict with string keys, got {kwargs!r}")
    kwargs = _json_clean(dict(kwargs), f"{where}['kwargs']")
    if kind == "timm":
        kwargs = {k: v for k, v in kwargs.items() if k not in _DOWNLOAD_KWARGS}
    return {kind: name, "kwargs": kwargs}


def describe_architecture(arch: Mapping) -> str:
    kind = "timm" if "timm" in arch else "builder"
    args = ", ".join(f"{k}={v!r}" for k, v in arch.get("kwargs", {}).items())
    return f"{kind} {arch[kind]}({args})"


TRUSTED_BUILDER_PREFIXES = ("timm_fslt.",)


def check_builder_trusted(arch: Mapping, trust_builder: bool) -> None:
    """Refuse to import and call a ticket's builder outside timm_fslt unless the caller trusts it.

    A builder path names any importable function (``os:system`` too), so running one
    that came with a downloaded ticket is running that ticket's code; timm names are
    looked up in timm's registry and are always safe.
    """
    path = arch.get("builder")
    if path is None or trust_builder or path.startswith(TRUSTED_BUILDER_PREFIXES):
        return
    raise ArchitectureError(
        f"the ticket's architecture calls the builder {path!r}, which is outside timm_fslt; importing "
        "and calling it runs code named by the ticket. If you trust where this ticket came from, pass "
        "trust_builder=True to load_ticket")


def count_parameters(arch: Mapping) -> Optional[int]:
    """Parameter and buffer elements of an architecture, counted on the meta device (None if unknown)."""
    try:
        with torch.device("meta"):
            model = build_architecture(arch)
    except TicketError:
        raise
    except Exception:
        return None
    return sum(t.numel() for t in model.parameters()) + sum(t.numel() for t in model.buffers())


def build_architecture(arch: Mapping) -> nn.Module:
    """Build the untrained model an architecture record describes (never downloads weights)."""
    try:
        return _build_architecture(arch)
    except TicketError:
        raise
    except Exception as err:  # a constructor refusing hostile or stale kwargs, whatever its error type
        raise ArchitectureError(f"{describe_architecture(normalize_architecture(arch))} could not be built: "
                                f"{type(err).__name__}: {err}") from err


def _build_architecture(arch: Mapping) -> nn.Module:
    arch = normalize_architecture(arch)
    kwargs = dict(arch["kwargs"])
    if "timm" in arch:
        import timm
        from . import models  # noqa: F401  (registers conv6 / resnet18_cifar in timm)

        name = arch["timm"]
        if not timm.is_model(name):
            raise ArchitectureError(f"unknown timm model {name!r} in the ticket's architecture; "
                                    "install the package that registers it (and import it) first")
        try:
            model = timm.create_model(name, pretrained=False, **kwargs)
        except TypeError as err:
            raise ArchitectureError(f"timm model {name!r} rejected the ticket's kwargs {kwargs!r}: {err}") from err
    else:
        path = arch["builder"]
        module_name, attr = path.split(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise ArchitectureError(f"cannot import module {module_name!r} of the ticket's builder "
                                    f"{path!r}: {err}") from err
        fn = module
        for part in attr.split("."):
            fn = getattr(fn, part, None)
            if fn is None:
                raise ArchitectureError(f"module {module_name!r} has no {attr!r}, the ticket's builder {path!r}")
        if not callable(fn):
            raise ArchitectureError(f"the ticket's builder {path!r} is not callable")
        try:
            model = fn(**kwargs)
        except TypeError as err:
            raise ArchitectureError(f"builder {path!r} rejected the ticket's kwargs {kwargs!r}: {err}") from err
    if not isinstance(model, nn.Module):
        raise ArchitectureError(f"{describe_architecture(arch)} returned {type(model).__name__}, "
                                "not a torch.nn.Module")
    return model


def _build_for_check(arch: Mapping) -> nn.Module:
    # On the meta device nothing is allocated; a few constructors need real values
    # (e.g. ``.tolist()`` on a drop-path schedule), so fall back to the CPU.
    try:
        with torch.device("meta"):
            return build_architecture(arch)
    except TicketError:
        raise
    except Exception:
        return build_architecture(arch)


def _layer_mismatch(model: nn.Module, arch: Mapping, config: FreezeConfig,
                    structured: bool) -> Optional[str]:
    """Why ``arch`` does not rebuild ``model`` (None when it does)."""
    candidate = _build_for_check(arch)
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
        raise ArchitectureError(f"cannot tell which architecture built this {type(model).__name__}: {_ARCH_HELP}")
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
                f"{describe_architecture(arch)}, but {problem}; {_ARCH_HELP}")
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


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_directory_atomically(directory: Path, files: Mapping[str, bytes]) -> None:
    """Write ``files`` to a temporary sibling, then swap it in: never a half-written ticket."""
    parent = directory.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=parent))
    try:
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; a ticket is an ordinary folder
        for name, data in files.items():
            _write_bytes(tmp / name, data)
        _fsync_dir(tmp)
        if directory.exists():
            # Two renames (a directory cannot replace a non-empty one): if the second
            # fails, the old ticket is moved back; it is deleted only once the new one is in place.
            old = parent / f".{directory.name}.{uuid.uuid4().hex[:8]}.old"
            os.rename(directory, old)
            try:
                os.rename(tmp, directory)
            except BaseException:
                os.rename(old, directory)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, directory)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
    layers, bits = [], []
    for layer in group.layers:
        counts = layer.counts()
        layers.append({"name": layer.layer_name, "shape": list(layer.frozen.shape), **counts})
        bits.append(_free_entries(layer.mask, layer.frozen).cpu())
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

    document = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "generator_version": GENERATOR_VERSION,
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
    }
    config_bytes = (json.dumps(document, indent=2, allow_nan=False) + "\n").encode("utf-8")
    return {MASK_NAME: mask_bytes, STATE_NAME: state_bytes, CONFIG_NAME: config_bytes}


def save_ticket(model: nn.Module, directory: PathLike, *, architecture: Optional[Mapping] = None,
                overwrite: bool = False, metrics: Optional[Mapping] = None,
                datasets: Union[None, str, Sequence[str]] = None) -> Path:
    """Save a frozen model's ticket (config.json, supermask.safetensors, state.safetensors).

    architecture: ``{"timm": name, "kwargs": {...}}`` or ``{"builder": "pkg.mod:fn",
        "kwargs": {...}}``; by default the one ``timm_fslt.create_model`` recorded, else
        inferred from timm's ``pretrained_cfg`` when that rebuilds exactly this model.
    overwrite: a directory that already holds a ticket is replaced; any other
        non-empty directory is refused unless ``overwrite=True`` (then its contents
        are replaced).
    metrics: e.g. ``{"accuracy": 0.91}``, stored in config.json and shown on the model card.
    datasets: Hub dataset ids the metrics were measured on (for the model card).

    The files are written to a temporary sibling directory and renamed into place,
    so a crash never leaves a half-written ticket and an old ticket survives intact.
    Returns the ticket directory.
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
    _write_directory_atomically(directory, files)
    return directory


# -- reading ----------------------------------------------------------------------------

def read_config(directory: PathLike) -> dict:
    """Read and validate a ticket's config.json (format, versions, architecture)."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise TicketError(f"{str(Path(directory))!r} is not a ticket: it has no {CONFIG_NAME}")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise TicketError(f"{str(path)!r} is too large ({size} bytes; a ticket's {CONFIG_NAME} is at most "
                          f"{MAX_CONFIG_BYTES} bytes)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise TicketError(f"{str(path)!r} is not valid JSON: {type(err).__name__}: {err}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise TicketError(f"{str(path)!r} is not a timm_fslt ticket config (format {found!r}, "
                          f"expected {FORMAT!r})")
    version = config.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise TicketError(f"{str(path)!r} has an invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise TicketVersionError(
            f"the ticket at {str(Path(directory))!r} uses ticket format version {version}, newer than "
            f"this timm_fslt {__version__} reads (up to {FORMAT_VERSION}); upgrade timm_fslt to load it")
    generator = config.get("generator_version")
    if generator != GENERATOR_VERSION:
        raise TicketVersionError(
            f"the ticket was written with random generator version {generator!r}, but this timm_fslt "
            f"has generator version {GENERATOR_VERSION}: its weights and freezing pattern cannot be "
            f"regenerated bit-exactly; load it with a timm_fslt release whose GENERATOR_VERSION is {generator!r}")
    config["architecture"] = normalize_architecture(config.get("architecture"),
                                                    f"the ticket's architecture ({CONFIG_NAME})")
    for key, kind in (("freeze", dict), ("layers", list), ("files", dict), ("mask", dict), ("state", dict)):
        if not isinstance(config.get(key), kind):
            raise TicketError(f"{str(path)!r} lacks a valid {key!r} entry ({kind.__name__})")
    for row in config["layers"]:
        if not (isinstance(row, dict) and isinstance(row.get("name"), str) and isinstance(row.get("shape"), list)
                and all(isinstance(row.get(k), int) for k in ("numel", "pruned", "locked", "free", "kept"))):
            raise TicketError(f"{str(path)!r} has a malformed layer entry {row!r}")
    return config


def _read_tensor_file(directory: Path, config: dict, name: str) -> dict[str, torch.Tensor]:
    path = directory / name
    record = config["files"].get(name)
    if not isinstance(record, dict) or not isinstance(record.get("bytes"), int) \
            or not isinstance(record.get("sha256"), str):
        raise TicketError(f"{CONFIG_NAME} has no size and sha256 for {name}")
    if not path.is_file():
        raise TicketChecksumError(f"the ticket at {str(directory)!r} is incomplete: {name} is missing")
    data = path.read_bytes()
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


def read_ticket(directory: PathLike) -> tuple[dict, torch.Tensor, dict[str, torch.Tensor]]:
    """(config, packed supermask bytes, state tensors) of a ticket directory, all verified."""
    directory = Path(directory)
    config = read_config(directory)
    mask_tensors = _read_tensor_file(directory, config, MASK_NAME)
    packed = mask_tensors.get(MASK_TENSOR)
    n_free = sum(row["free"] for row in config["layers"])
    if packed is None or packed.dtype != torch.uint8 or packed.dim() != 1:
        raise TicketError(f"{MASK_NAME} must hold a 1-D uint8 tensor {MASK_TENSOR!r}")
    if config["mask"].get("bits") != n_free or packed.numel() != (n_free + 7) // 8:
        raise TicketMismatchError(
            f"{MASK_NAME} holds {packed.numel()} bytes ({config['mask'].get('bits')} bits recorded) but the "
            f"layers in {CONFIG_NAME} have {n_free} free weights, i.e. {(n_free + 7) // 8} bytes")
    state = _read_tensor_file(directory, config, STATE_NAME)
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
        if not torch.equal(_free_entries(layer.mask, layer.frozen).cpu(), sel):
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
                trust_builder: bool = False, max_params: int = DEFAULT_MAX_PARAMS) -> nn.Module:
    """Rebuild a saved ticket: a local directory or a Hugging Face Hub repo id ("user/repo").

    The model is rebuilt from the architecture, re-frozen with the stored
    FreezeConfig (which regenerates weights and freezing pattern from the seed),
    its supermask set from the stored bits and its non-regenerable state loaded.
    It is returned in eval mode; its outputs are bit-identical to the saved
    model's.  ``materialize=True`` returns the plain model (``timm_fslt.materialize``).

    revision, token, cache_dir: passed to ``huggingface_hub.snapshot_download`` for
    repo ids (with ``HF_HUB_OFFLINE=1`` the local Hub cache is used).
    trust_builder: allow an architecture ``builder`` outside ``timm_fslt`` (it is
    imported and called, i.e. it runs code the ticket names).
    max_params: refuse architectures with more parameter elements than this,
    counted on the meta device before anything is allocated.
    A compacted ticket (config "structure") is re-compacted with
    ``timm_fslt.compaction.restore_structure`` after freezing, before the bits apply.

    Every failure is a ``timm_fslt.TicketError``: files are read as JSON and
    safetensors only, and nothing a ticket says can run code without ``trust_builder``.
    """
    from .hub import resolve_ticket

    if isinstance(max_params, bool) or not isinstance(max_params, int) or max_params < 1:
        raise TicketError(f"max_params must be a positive int, got {max_params!r}")
    directory = resolve_ticket(source, revision=revision, token=token, cache_dir=cache_dir)
    config, packed, state = read_ticket(directory)
    try:
        model = _rebuild(config, packed, state, trust_builder, max_params)
    except TicketError:
        raise
    except Exception as err:  # malformed content the checks above did not foresee
        raise TicketError(f"the ticket at {str(directory)!r} could not be rebuilt: "
                          f"{type(err).__name__}: {err}") from err
    if materialize:
        from .materialize import materialize as _materialize
        return _materialize(model)
    return model


def _rebuild(config: dict, packed: torch.Tensor, state: Mapping[str, torch.Tensor],
             trust_builder: bool, max_params: int) -> nn.Module:
    arch = config["architecture"]
    check_builder_trusted(arch, trust_builder)
    n_params = count_parameters(arch)
    if n_params is not None and n_params > max_params:
        raise ArchitectureError(f"{describe_architecture(arch)} has {n_params:,} parameters, more than "
                                f"max_params={max_params:,}; pass a larger max_params to load it")
    model = build_architecture(arch)
    try:
        freeze_config = FreezeConfig(**config["freeze"])
    except (TypeError, ValueError) as err:
        raise TicketError(f"{CONFIG_NAME} 'freeze' is not a valid FreezeConfig: {err}") from err
    try:
        freeze(model, config=freeze_config)
    except (TypeError, ValueError) as err:
        raise TicketMismatchError(f"the ticket's freeze settings do not fit {describe_architecture(arch)}: "
                                  f"{err}") from err
    structure = config.get("structure")
    if structure is not None:
        try:
            from .compaction import restore_structure
        except ImportError as err:
            raise TicketError("the ticket was compacted (config.json has a 'structure') but "
                              f"timm_fslt.compaction.restore_structure is not available: {err}") from err
        try:
            restore_structure(model, structure)
        except Exception as err:
            raise TicketMismatchError(f"the ticket's compacted structure does not fit the rebuilt model: "
                                      f"{type(err).__name__}: {err}") from err
        if getattr(model, "fslt_structure", None) is None:
            model.fslt_structure = structure
    _check_layers(get_group(model), config, arch)
    _apply_mask(model, config, packed)
    _load_state(model, state)
    model.fslt_architecture = arch
    model.eval()
    return model
