"""Saving and loading tickets: ``save_ticket`` / ``load_ticket``.

A frozen ticket is tiny because everything random comes back from the seed: the
architecture and the ``FreezeConfig`` regenerate the weights and the freezing
pattern bit-exactly, so a ticket stores one bit per FREE weight plus the state
that no seed can rebuild. The files and what loading checks: ``ticket.format``
and ``ticket.integrity``; the README's "Tickets" section.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import safetensors.torch
import torch
from torch import nn

from timm_fslt import atomic
from timm_fslt.errors import TicketChecksumError, TicketError
from timm_fslt.frozen import check_unchanged, get_config, get_group, is_frozen
from timm_fslt.nn import method_symbols, modules as L
from timm_fslt.nn.supermask import free_entries
from timm_fslt.regen import pattern as freezing
from timm_fslt.report import architecture_buffers, non_regenerable_state
from timm_fslt.ticket.architecture import build_architecture, create_model, json_clean, resolve_architecture
from timm_fslt.ticket.format import (BIT_ORDER, CONFIG_NAME, DEFAULT_MAX_BUILD_SECONDS, DEFAULT_MAX_PARAMS, FORMAT,
                                     MASK_NAME, MASK_TENSOR, STATE_NAME, TIMM_WEIGHTS_NAME, PathLike,
                                     check_bool, check_datasets, check_metrics, is_ticket_dir, read_ticket,
                                     sha256_hex)
from timm_fslt.ticket.integrity import OWN_KEY, layer_digests, regenerated_record, seal_config
from timm_fslt.ticket.loading import rebuild
from timm_fslt.ticket.mask_coding import CODED_SINCE, MASK_ALPHABET, METADATA, RAW_VERSION, check_mask_coding
from timm_fslt.ticket.mask_coding import encode_mask
from timm_fslt.ticket.method_record import METHOD_VERSION, mask_fields
from timm_fslt.ticket.state_codec import check_state_dtype, encode_state
from timm_fslt.ticket.timm_config import check_data_config, timm_keys, timm_weights_bytes
from timm_fslt.ticket.sources import HUB_PREFIX, LOCAL_PREFIX, redownload, resolve_ticket_source
from timm_fslt.version import __version__

__all__ = ["create_model", "load_ticket", "save_ticket", "ticket_files"]


# -- saving -----------------------------------------------------------------------------

def frozen_group(model: nn.Module):
    if not isinstance(model, nn.Module):
        raise TicketError(f"model must be a frozen torch.nn.Module, got {type(model).__name__}")
    if not is_frozen(model) or getattr(model, "fslt_config", None) is None:
        raise TicketError("model is not frozen: call timm_fslt.freeze(model, prune=..., lock=...) "
                          "and search its supermask before saving a ticket")
    return get_group(model)


def ticket_files(model: nn.Module, *, architecture: Optional[Mapping] = None,
                 metrics: Optional[Mapping] = None,
                 datasets: Union[None, str, Sequence[str]] = None,
                 state_dtype: Optional[str] = None, data_config: Optional[Mapping] = None,
                 timm_weights: bool = False, mask_coding: str = "auto") -> dict[str, bytes]:
    """The bytes of the ticket files of a frozen model (``save_ticket`` writes them)."""
    mask_coding = check_mask_coding(mask_coding)
    data_config = check_data_config(data_config)
    check_bool(timm_weights, "timm_weights")
    group = frozen_group(model)
    try:
        check_unchanged(model)  # a layer added after freeze could not be rebuilt
    except RuntimeError as err:
        raise TicketError(f"cannot save this model's ticket: {err}") from None
    state_dtype = check_state_dtype(state_dtype)
    config = get_config(model)
    metrics = check_metrics(metrics)
    datasets = check_datasets(datasets)
    structure = getattr(model, "fslt_structure", None)
    if structure is not None:
        structure = json_clean(structure, "model.fslt_structure")
    arch = resolve_architecture(model, architecture)

    group.refresh()
    method = method_symbols.stores_symbols(group)  # a method ticket: format 6 (ticket.method_record)
    digests = layer_digests(model, masked=False)
    masked = layer_digests(model, masked=True, positive_zeros=method)
    dtypes = L.frozen_weight_dtypes(model)
    symbols = method_symbols.layer_symbols(group) if method else None
    alphabet = method_symbols.alphabet_of(group, symbols) if method else MASK_ALPHABET
    layers, bits = [], []
    for layer in group.layers:
        counts = layer.counts()
        param = {} if getattr(layer, "param_name", "weight") == "weight" else {
            "module": layer.module_name, "param": layer.param_name}  # a masked tensor other than a weight
        layers.append({"name": layer.layer_name, **param, "shape": list(layer.frozen.shape), **counts,
                       "regen_digest": digests[layer.layer_name], "masked_digest": masked[layer.layer_name],
                       "dtype": L.dtype_name(dtypes[id(layer)])})
        if structure is None:  # (t1, t2) of the regenerated code; a compacted layer's code is not one
            layers[-1]["freeze_keys"] = list(freezing.freeze_keys_of_code(
                config.seed, layer.layer_name, layer.frozen, counts["pruned"], counts["locked"]))
        if method:
            layers[-1]["symbol_counts"] = method_symbols.symbol_counts(symbols[len(bits)])
            bits.append(symbols[len(bits)])
        else:
            bits.append(free_entries(layer.mask, layer.frozen).cpu())
    n_free = sum(row["free"] for row in layers)
    assert sum(b.numel() for b in bits) == n_free
    coding, payload, coding_fields = encode_mask(bits, mask_coding, alphabet)
    if method:
        coding_fields.update(mask_fields(group, alphabet, n_free, coding))
    # One metadata key only: safetensors writes several in a random (hash map) order,
    # and a ticket's bytes must not change between two saves of the same model.
    mask_bytes = safetensors.torch.save({MASK_TENSOR: torch.frombuffer(bytearray(payload), dtype=torch.uint8)},
                                        metadata={"format": METADATA[coding]})

    state_record, state_bytes = encode_state(_state_to_store(model, arch), state_dtype)
    files = {MASK_NAME: mask_bytes, STATE_NAME: state_bytes}
    if timm_weights:
        files[TIMM_WEIGHTS_NAME] = timm_weights_bytes(model, arch, structure)

    own = {
        "format": FORMAT,
        "format_version": METHOD_VERSION if method else CODED_SINCE if coding == "entropy" else RAW_VERSION,
        "generator_version": config.generator_version,
        "timm_fslt_version": __version__,
        "architecture": arch,
        "freeze": json_clean(config.to_dict(), "the FreezeConfig"),
        "structure": structure,
        "layers": layers,
        "regenerated": regenerated_record(model),
        "mask": {"file": MASK_NAME, "tensor": MASK_TENSOR, "bits": n_free,
                 "bytes": len(payload), "order": BIT_ORDER, **coding_fields},
        "state": {"file": STATE_NAME, **state_record},
        "files": {name: {"bytes": len(data), "sha256": sha256_hex(data)} for name, data in files.items()},
        "metrics": metrics,
        "datasets": datasets,
    }
    # timm's keys first (what timm.create_model("local-dir:..." / "hf-hub:...") reads), ours under
    # "timm_fslt"; one seal covers both (ticket.timm_config, ticket.integrity).
    document = seal_config({**timm_keys(model, arch, data_config), OWN_KEY: own})
    config_bytes = (json.dumps(document, indent=2, allow_nan=False) + "\n").encode("utf-8")
    return {**files, CONFIG_NAME: config_bytes}


@torch.no_grad()
def _state_to_store(model: nn.Module, arch: Mapping) -> dict[str, torch.Tensor]:
    """``non_regenerable_state`` without the architecture buffers a fresh build of ``arch``
    reproduces exactly (a DCT basis, clamp bounds: the loader's own build gives them); those
    that differ (a buffer the model changed) are stored."""
    state = non_regenerable_state(model)
    candidates = architecture_buffers(model)
    if not candidates:
        return state
    fresh = build_architecture(arch).state_dict()
    for key in sorted(candidates):
        built = fresh.get(key)
        value = state[key]
        if built is not None and built.shape == value.shape and built.dtype == value.dtype \
                and torch.equal(built.cpu(), value.cpu()):
            del state[key]
    return state


def _is_complete_ticket(directory: Path) -> bool:
    try:
        read_ticket(directory)
    except (TicketError, OSError):
        return False
    return True


def save_ticket(model: nn.Module, directory: PathLike, *, architecture: Optional[Mapping] = None,
                overwrite: bool = False, metrics: Optional[Mapping] = None,
                datasets: Union[None, str, Sequence[str]] = None, state_dtype: Optional[str] = None,
                data_config: Optional[Mapping] = None, timm_weights: bool = False,
                mask_coding: str = "auto") -> Path:
    """Save a frozen model's ticket (config.json, supermask.safetensors, state.safetensors).

    config.json follows timm's Hub schema (``architecture``, ``num_classes``, ``model_args``,
    ``pretrained_cfg``; ``ticket.timm_config``) with everything of timm_fslt's under
    ``"timm_fslt"``, so ``timm.create_model("local-dir:DIR")`` builds the architecture.

    architecture: ``{"timm": name, "kwargs": {...}}`` or ``{"builder": "<registered name>",
        "kwargs": {...}}`` (see ``timm_fslt.register_builder``); by default the one
        ``timm_fslt.create_model`` recorded, else inferred from timm's ``pretrained_cfg``
        when that rebuilds exactly this model.
    overwrite: a directory that already holds a ticket is replaced; any other
        non-empty directory is refused unless ``overwrite=True`` (then its contents
        are replaced).
    metrics: e.g. ``{"accuracy": 0.91}``, stored in config.json and shown on the model card.
    datasets: Hub dataset ids the metrics were measured on (for the model card).
    data_config: timm's data config the ticket was evaluated with (keys of
        ``timm.data.resolve_data_config``: input_size, interpolation, mean, std, crop_pct,
        crop_mode), in config.json's ``pretrained_cfg`` as timm stores it; by default the one timm
        resolves for a model with a timm ``pretrained_cfg`` (``ticket.timm_config``), else none.
    timm_weights: also write timm's standard ``model.safetensors``, the state dict of
        ``timm_fslt.materialize(model)``, so that plain timm (without timm_fslt) loads the
        ticket with ``timm.create_model("local-dir:DIR" / "hf-hub:user/name", pretrained=True)``
        and gives identical outputs. It costs the dense weights' bytes: a 10-class timm ResNet-18
        frozen at prune 0.35 / lock 0.35 writes 44,775,912 bytes beside its 486,235-byte ticket
        (92x). timm models only, not compacted tickets.
    state_dtype: ``None`` (default) stores the state (BatchNorm running statistics, trained
        or kept tensors) at its own precision: the loaded model is bit-identical to this one.
        ``"bfloat16"`` (or ``"float16"``) stores floating state wider than that at that
        precision, about half the state's bits; the loaded model then equals this model with
        its state rounded the same way (``timm_fslt.ticket.state_codec.round_state``).
        Measured effect on accuracy: benchmarks/README.md ("Lower-precision state").
    mask_coding: how ``supermask.safetensors`` stores the free weights' bits: ``"raw"`` (one bit
        each; format 4), ``"entropy"`` (each layer entropy-coded with rANS, or stored raw or as a
        constant where that is smaller; format 5; ``timm_fslt.entropy``), or ``"auto"`` (default):
        entropy-coded when that is smaller than raw. The loaded masks are the same bits either way.

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
    files = ticket_files(model, architecture=architecture, metrics=metrics, datasets=datasets,
                         state_dtype=state_dtype, data_config=data_config, timm_weights=timm_weights,
                         mask_coding=mask_coding)
    if directory.exists():
        if not directory.is_dir():
            raise TicketError(f"cannot save a ticket to {str(directory)!r}: it exists and is not a directory")
        entries = sorted(p.name for p in directory.iterdir())
        if entries and not overwrite and not is_ticket_dir(directory):
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


# -- loading ------------------------------------------------------------------------------


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

    source: a directory, or a Hub repo id ``"user/name"``; as in ``timm.create_model``,
        ``"hf-hub:user/name[@revision]"`` is always the Hub and ``"local-dir:PATH"`` always a local
        directory (a relative path whose parent folder exists here is read as a path too).
        A ticket's ``model.safetensors`` (``timm_weights=True``) is never read nor downloaded:
        the model is rebuilt from the seed, so those weights are neither needed nor trusted.
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
        text = os.fsdecode(os.fspath(source))
        text = text[len(LOCAL_PREFIX):] if text.startswith(LOCAL_PREFIX) else text
        if text:
            atomic.recover_if_missing(Path(text).expanduser(), _is_complete_ticket)
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
        model = rebuild(config, packed, state, trust_builder, max_params, float(max_build_seconds),
                         found.directory)
    except TicketError:
        raise
    except Exception as err:  # malformed content the checks above did not foresee
        raise TicketError(f"the ticket at {str(found.directory)!r} could not be rebuilt: "
                          f"{type(err).__name__}: {err}") from err
    if materialize:
        from timm_fslt.materialize import materialize as _materialize
        return _materialize(model)
    return model
