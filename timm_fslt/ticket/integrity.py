"""Integrity of a ticket: the seal of config.json and the digests of regenerated layers.

``seal_config`` adds ``config["integrity"]``: the sha256 of the canonical JSON of every other
field, and a 64-bit digest per field that names an edited one on load. ``layer_digests``
gives, per masked layer, 128 bits of sha256 over its regenerated weight and freezing code
(``regen_digest``) or over the weight its forward uses (``masked_digest``); the loader
compares both with the ones saved (``check_digests``, after ``check_layers`` compared names,
shapes and counts), so a resealed edit cannot load as another network. In a format-4 config.json
the seal sits in ``config["timm_fslt"]["integrity"]`` and covers timm's keys too.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from timm_fslt.errors import TicketChecksumError, TicketIntegrityWarning, TicketMismatchError
from timm_fslt.nn import modules as L
from timm_fslt.nn.placement import fate_of

CONFIG_NAME = "config.json"


def tensor_digest(*tensors: torch.Tensor) -> str:
    """128 bits of sha256 over tensors' dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().to("cpu").contiguous()
        h.update(f"{str(t.dtype).replace('torch.', '')}{list(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:32]


@torch.no_grad()
def layer_digests(model: nn.Module, masked: bool, positive_zeros: bool = False) -> dict[str, str]:
    """Per masked layer: the digest of its regenerated weight and freezing code (``regen_digest``),
    or of the weight its forward uses, ``W * mask * scale`` (``masked_digest``); ``positive_zeros``
    (format 6, ``ticket.method_record``): of that weight with its signed zeros made +0."""
    sites = list(L.iter_sites(model))

    def digest(site) -> str:
        key, module, pname, supermask = site
        tensors = (getattr(module, pname),) if masked else (module.parametrizations[pname].original,
                                                             supermask.frozen)
        if positive_zeros and masked and tensors[0].is_floating_point():
            tensors = (tensors[0] + 0.0,)  # (-0 + 0 = +0; every other value unchanged)
        return tensor_digest(*tensors)
    # sha256 (and the masked product) release the GIL: the layers are hashed on torch's threads
    threads = min(torch.get_num_threads(), len(sites))
    if threads > 1 and sum(site[3].numel for site in sites) >= 1 << 20:
        grad = torch.is_grad_enabled()

        def digest_in_thread(site) -> str:
            with torch.set_grad_enabled(grad):  # (grad mode is per thread)
                return digest(site)
        with ThreadPoolExecutor(threads) as pool:
            digests = list(pool.map(digest_in_thread, sites))
    else:
        digests = [digest(site) for site in sites]
    return {site[0]: value for site, value in zip(sites, digests)}


def check_layers(group, config: dict, arch: Mapping) -> None:
    """The rebuilt model's masked layers: the ticket's names, shapes and pruned/locked/free counts."""
    from timm_fslt.ticket.architecture import describe_architecture

    stored = config["layers"]
    if len(group.layers) != len(stored):
        raise TicketMismatchError(
            f"the ticket stores masks for {len(stored)} layers but the model rebuilt from "
            f"{describe_architecture(arch)} has {len(group.layers)} masked layers: layer count mismatch")
    for layer, row in zip(group.layers, stored):
        if layer.layer_name != row["name"] or getattr(layer, "param_name", "weight") != row.get("param", "weight"):
            raise TicketMismatchError(f"the ticket's layer {row['name']!r} stands where the rebuilt model "
                                      f"has {layer.layer_name!r}")
        shape = list(layer.frozen.shape)
        if shape != row["shape"]:
            raise TicketMismatchError(f"layer {row['name']!r}: the ticket's mask has shape {tuple(row['shape'])} "
                                      f"but the rebuilt layer's weight has shape {tuple(shape)}")
    # Counts only after every shape matched: one wrong shape shifts other layers' erk/igq counts.
    for layer, row in zip(group.layers, stored):
        counts = layer.frozen_counts()
        for key in ("pruned", "locked", "free"):
            if counts[key] != row[key]:
                raise TicketMismatchError(
                    f"layer {row['name']!r}: the seed regenerates {counts[key]} {key} weights but the ticket "
                    f"records {row[key]}")


def check_digests(model: nn.Module, config: dict, masked: bool) -> None:
    """Every layer's regenerated weight and code (or, once the mask and state are in, the weight
    its forward uses) against the digest saved with the ticket."""
    key = "masked_digest" if masked else "regen_digest"
    version = config.get("format_version")
    digests = layer_digests(model, masked, positive_zeros=isinstance(version, int) and version >= 6)
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


def _regenerated(model: nn.Module) -> dict[str, tuple[dict, torch.Tensor]]:
    out = {}
    modules = dict(model.named_modules(remove_duplicate=False))
    for key, tensor in model.state_dict(keep_vars=True).items():
        path, _, local = key.rpartition(".")
        fate = fate_of(modules.get(path), local)
        if fate is None or fate.fate not in ("constant", "regenerated"):
            continue
        if fate.fate == "constant":
            rule = {"value": fate.value}
        else:  # drawn under the name it was placed by (a shared module's other names reuse it)
            rule = {"std": fate.value, **({} if fate.key == key else {"key": fate.key})}
        out[key] = ({**rule, "shape": list(tensor.shape), "dtype": L.dtype_name(tensor.dtype)}, tensor.detach())
    return out


@torch.no_grad()
def regenerated_record(model: nn.Module) -> dict:
    """``{"digest", "tensors": {name: row}}`` of every parameter ``freeze`` fixed to a constant
    (row ``{"value", "shape", "dtype"}``) or drew from the seed (``{"std", "shape", "dtype"}``, plus
    ``"key"`` when drawn under another name: N(0, std**2) on the stream "table").  A ticket stores
    none of their values; ``digest`` covers all of them in sorted name order, and the loader
    checks the rebuilt model's against it."""
    rows = _regenerated(model)
    names = sorted(rows)
    return {"digest": tensor_digest(*(rows[n][1] for n in names)) if names else None,
            "tensors": {n: rows[n][0] for n in names}}


def check_regenerated(model: nn.Module, saved: Mapping) -> None:
    """Raise ``TicketChecksumError`` if the rebuilt model's constants and seed-drawn parameters are not
    the ones a ticket recorded (``regenerated_record`` at save time)."""
    if not isinstance(saved, Mapping) or not isinstance(saved.get("tensors"), Mapping):
        raise TicketChecksumError("config.json 'regenerated' must be an object with 'digest' and 'tensors'")
    now, recorded = regenerated_record(model), saved["tensors"]
    if set(now["tensors"]) != set(recorded):
        missing, extra = sorted(set(recorded) - set(now["tensors"])), sorted(set(now["tensors"]) - set(recorded))
        raise TicketChecksumError(f"the rebuilt model regenerates other parameters than the ticket recorded "
                                  f"(recorded, not rebuilt: {missing[:5]}; rebuilt, not recorded: {extra[:5]})")
    for key, row in now["tensors"].items():
        if recorded[key] != row:
            raise TicketChecksumError(f"parameter {key!r}: the rebuilt model regenerates it as {row}, the ticket "
                                      f"recorded {recorded[key]}: the ticket would load as another network")
    if saved.get("digest") != now["digest"]:
        raise TicketChecksumError("the regenerated parameters' values differ from those the ticket was saved with "
                                  f"(digest {now['digest']} != {saved.get('digest')}): the ticket would load as "
                                  "another network")


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


OWN_KEY = "timm_fslt"  # format 4: our record, beside the keys timm reads (architecture, model_args, ...)


def is_nested(document: Any) -> bool:
    """A format-4 config.json: timm's keys at the top, our record under ``"timm_fslt"``."""
    return isinstance(document, Mapping) and isinstance(document.get(OWN_KEY), Mapping)


def _body(document: Mapping) -> tuple[dict, dict]:
    """(what the seal's sha256 covers, the flat view whose fields it names) of a config document.

    Formats 1-3: every top-level field but ``integrity``. Format 4: the whole document but
    ``timm_fslt.integrity``, so timm's keys are sealed with ours; its fields are named
    ``model_args.num_classes``, ``pretrained_cfg.mean``, ``timm_fslt.freeze.seed``, ...
    """
    if not is_nested(document):
        body = {k: v for k, v in document.items() if k != "integrity"}
        return body, body
    own = {k: v for k, v in document[OWN_KEY].items() if k != "integrity"}
    body = {**{k: v for k, v in document.items() if k != OWN_KEY}, OWN_KEY: own}
    flat = {**{k: v for k, v in document.items() if k != OWN_KEY}, **{f"{OWN_KEY}.{k}": v for k, v in own.items()}}
    return body, flat


def field_digests(document: Mapping) -> dict[str, str]:
    """64-bit digests of each field (``freeze.seed``, ``layers[3]``, ...): they name what an edit changed."""
    out = {}
    for key, value in document.items():
        if key == "integrity":
            continue
        if isinstance(value, dict) and value:
            for sub, item in value.items():
                out[f"{key}.{sub}"] = hashlib.sha256(canonical_json(item)).hexdigest()[:16]
        elif isinstance(value, list) and value:
            for i, item in enumerate(value):
                out[f"{key}[{i}]"] = hashlib.sha256(canonical_json(item)).hexdigest()[:16]
        else:
            out[key] = hashlib.sha256(canonical_json(value)).hexdigest()[:16]
    return out


def seal_config(document: Mapping) -> dict:
    """``document`` with its ``integrity`` record: the sha256 of the canonical JSON of every
    other field, and per-field digests that name an edited field on load. A format-4 document
    (timm's keys at the top, ours under ``"timm_fslt"``) keeps the record in
    ``document["timm_fslt"]["integrity"]`` and the seal covers timm's keys too.

    Integrity, not authenticity: whoever rewrites a ticket can reseal it. A ticket's
    identity is ``config["integrity"]["config_sha256"]``; pin it with
    ``load_ticket(..., expected_sha256=...)`` to accept exactly one ticket.
    """
    body, flat = _body(document)
    record = {"config_sha256": hashlib.sha256(canonical_json(body)).hexdigest(), "fields": field_digests(flat)}
    if is_nested(document):
        return {**{k: v for k, v in document.items() if k != OWN_KEY}, OWN_KEY: {**body[OWN_KEY], "integrity": record}}
    return {**body, "integrity": record}


def verify_integrity(document: dict, path: Path) -> None:
    own = document[OWN_KEY] if is_nested(document) else document
    record = own.get("integrity")
    version = own.get("format_version")  # (not yet validated: any JSON value)
    if isinstance(version, int) and not isinstance(version, bool) and version < 2 and record is None:
        warnings.warn(f"the ticket {str(path.parent)!r} was written by timm_fslt 0.1 (ticket format 1) and has "
                      f"no integrity record: an edit of its {CONFIG_NAME} cannot be detected; save it again "
                      "with this release to seal it", TicketIntegrityWarning, stacklevel=4)
        return
    if not (isinstance(record, dict) and isinstance(record.get("config_sha256"), str)
            and isinstance(record.get("fields"), dict)):
        raise TicketChecksumError(f"{str(path)!r} has no valid 'integrity' record (config_sha256 and fields): "
                                  "the config was altered or truncated")
    body, flat = _body(document)
    digest = hashlib.sha256(canonical_json(body)).hexdigest()
    if digest == record["config_sha256"]:
        return
    stored, now = record["fields"], field_digests(flat)
    changed = sorted(k for k in set(stored) | set(now) if stored.get(k) != now.get(k))
    named = [f"{k} ({'added' if k not in stored else 'removed' if k not in now else 'changed'})" for k in changed]
    raise TicketChecksumError(
        f"{str(path)!r} was edited after it was saved: its checksum {digest[:16]}... does not match "
        f"{str(record['config_sha256'])[:16]}... recorded in it; edited field"
        f"{'s' if len(named) != 1 else ''}: {', '.join(named[:10]) or 'the integrity record itself'}"
        f"{', ...' if len(named) > 10 else ''}")
