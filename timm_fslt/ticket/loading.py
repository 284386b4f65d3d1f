"""Rebuilding a ticket's model: what ``load_ticket`` does once the files are read and verified.

Build (parameters on the meta device, then empty memory: every one is overwritten), re-freeze
with the stored configuration (weights and codes regenerated; codes from the stored freeze keys),
re-compact, check the regenerated digests, set the stored mask bits and state, check the masked
digests.  Nothing is drawn or selected that the ticket then replaces.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from timm_fslt.errors import ArchitectureError, TicketError, TicketMismatchError
from timm_fslt.frozen import FreezeConfig, freeze_for_ticket, get_group
from timm_fslt.nn import method_symbols, modules as L
from timm_fslt.regen import native
from timm_fslt.report import architecture_buffers, non_regenerable_state
from timm_fslt.ticket.architecture import (build_architecture, build_for_check, count_elements, describe_architecture,
                                           resolve_builder)
from timm_fslt.ticket.format import CONFIG_NAME, STATE_NAME
from timm_fslt.ticket.mask_coding import is_symbol_record, unpack_bits
from timm_fslt.ticket.integrity import check_digests, check_layers, check_regenerated
from timm_fslt.ticket.timm_config import apply_data_config, check_built, check_timm_builds


@torch.no_grad()
def _apply_mask(model: nn.Module, config: dict, packed: torch.Tensor) -> None:
    """Set the stored supermask, and scores that the group's own top-k selection maps to it.

    Nothing is drawn or selected: every stored-kept free weight gets the score 1.0 and every
    other free weight 0.5, and the masks are written from the bits directly.  Those scores
    select exactly the stored bits whenever the bits keep as many free weights as the
    configuration's selection does (then the k-th largest score is 1.0 and exactly the kept
    weights reach it), which is checked: so the masks are what a refresh would choose, the
    next refresh (after an optimizer step) keeps them, and a search can continue from the
    ticket (all scores positive: every free weight gets a gradient).
    """
    group = get_group(model)
    sizes = [row["free"] for row in config["layers"]]
    selected = list(unpack_bits(packed, sum(sizes)).split(sizes))
    counts = group.selected_counts()
    stored = [int(sel.sum()) for sel in selected]
    if (stored if group.scope == "layerwise" else [sum(stored)]) != counts:
        first = next((row["name"] for row, n, k in zip(config["layers"], stored, counts) if n != k),
                     config["layers"][0]["name"] if config["layers"] else None)
        kept_stored = sum(n + r["locked"] for n, r in zip(stored, config["layers"]))
        locked = sum(r["locked"] for r in config["layers"])
        kept_now = locked + sum(counts)
        raise TicketMismatchError(
            f"the stored supermask keeps {kept_stored} weights but sparsity {group.sparsity} with scope "
            f"{group.scope!r} selects {kept_now} (first difference in layer {first!r}): the mask "
            f"file does not belong to this configuration")
    fast = all(_native_bits(layer) for layer in group.layers)
    for layer, sel in zip(group.layers, selected):
        if fast:  # mask bits and scores in one pass (regen/native.py)
            native.apply_bits(layer.mask, layer.free_index().index, sel.contiguous(), layer.scores)
        else:
            scores = layer.scores
            scores.view(-1).copy_(torch.where(sel.to(scores.device), 1.0, 0.5))
    group.set_selected([sel.to(layer.mask.device) for layer, sel in zip(group.layers, selected)], written=fast)


@torch.no_grad()
def _apply_symbols(model: nn.Module, config: dict, symbols: torch.Tensor) -> None:
    """A search method's ticket (format 6, ``ticket.method_record``): the saved step count (so the
    scheduled sparsity is the saved one), then the symbols through ``nn.method_symbols``: scores
    the group's own coat selections map to exactly the stored levels, its masks by ``set_selected``,
    the kept weights' IteRand rounds.  Every coat's count is checked against the configuration's."""
    group = get_group(model)
    method_symbols.set_search_step(group, config["mask"]["search_step"])
    parts = list(symbols.split([row["free"] for row in config["layers"]]))
    problem = method_symbols.check_counts(group, parts)
    if problem is not None:
        raise TicketMismatchError(f"{problem} (after {group.search_step} steps): the mask file does not belong to "
                                  "this configuration")
    try:
        method_symbols.apply_symbols(group, parts)
    except ValueError as err:
        raise TicketMismatchError(str(err)) from None


def _native_bits(layer) -> bool:
    """Whether ``native.apply_bits`` can write this layer (CPU, contiguous, float32 scores, not all free)."""
    mask, scores, free = layer.mask, layer.scores, layer.free_index()
    return (native.usable(mask.device) is not None and mask.is_contiguous() and scores.is_contiguous()
            and scores.device.type == "cpu" and scores.dtype == torch.float32 and free.index is not None
            and free.index.device.type == "cpu")


@torch.no_grad()
def _load_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """The stored state into the rebuilt model (values at their recorded dtypes: ``read_ticket``)."""
    expected = non_regenerable_state(model)
    # Tickets of formats 1 and 2 stored BatchNorm's num_batches_tracked, which is not stored any
    # more (it does not change an eval output); it still loads into the buffer the model holds.
    buffers = model.state_dict()
    expected.update({k: buffers[k] for k in state if k not in expected and k.endswith(".num_batches_tracked")
                     and k in buffers})
    for key in architecture_buffers(model) - set(state):
        del expected[key]  # not stored: the ticket was saved with this build's very values
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


def _empty_parameters(model: nn.Module) -> list:
    """Give every meta parameter (``parameters_on_meta``) uninitialised CPU memory, shared
    parameters staying shared; returns ``(module, name)`` of each, for ``_unwritten``."""
    made, sites = {}, []
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.is_meta:
                new = made.get(id(param))
                if new is None:
                    new = made[id(param)] = nn.Parameter(torch.empty_like(param, device="cpu"),
                                                         requires_grad=param.requires_grad)
                module._parameters[name] = new
                sites.append((module, name))
    return sites


def _unwritten(sites: list) -> bool:
    """Whether a parameter ``_empty_parameters`` made is still there and was never written (its
    version counter is 0): its value would be whatever the memory held."""
    return any(name in module._parameters and module._parameters[name] is not None
               and module._parameters[name]._version == 0 for module, name in sites)


def rebuild(config: dict, packed: torch.Tensor, state: Mapping[str, torch.Tensor],
             trust_builder: bool, max_params: int, max_seconds: float, directory: Path) -> nn.Module:
    arch = config["architecture"]
    resolve_builder(arch, trust_builder)  # refuses unregistered names and untrusted paths; calls nothing
    counted = build_for_check(arch, trust_builder=trust_builder, max_params=max_params, max_seconds=max_seconds)
    n_params = count_elements(counted)
    if config.get("timm_config") and n_params <= max_params:  # what plain timm builds from this config.json
        check_timm_builds(directory, counted, arch, max_params, max_seconds)
    del counted
    if n_params > max_params:
        raise ArchitectureError(f"{describe_architecture(arch)} has {n_params:,} parameters, more than "
                                f"max_params={max_params:,}; pass a larger max_params to load it")
    # Every parameter of the rebuilt model is overwritten -- regenerated, set to its constant, or
    # loaded from the stored state -- so the build need not initialise them: its parameters are
    # made on the meta device (the constructor's random init costs nothing there; buffers are
    # real, they can be the architecture's own values) and then given empty memory.  A constructor
    # that cannot build that way is built the ordinary way by build_for_check (nothing to empty
    # then); if some parameter was not overwritten after all, the model is built again that way.
    model = build_for_check(arch, trust_builder=trust_builder, max_params=max_params, max_seconds=max_seconds,
                            values=True)
    sites = _empty_parameters(model)
    model = _rebuild_model(model, config, packed, state, arch)
    if not _unwritten(sites):
        return model
    model = build_architecture(arch, trust_builder=trust_builder, max_params=max_params, max_seconds=max_seconds)
    return _rebuild_model(model, config, packed, state, arch)


def _rebuild_model(model: nn.Module, config: dict, packed: torch.Tensor, state: Mapping[str, torch.Tensor],
                   arch: Mapping) -> nn.Module:
    try:
        freeze_config = ticket_freeze_config(config)  # the ticket's generator version; warns for v1 normal
    except (TypeError, ValueError) as err:
        raise TicketError(f"{CONFIG_NAME} 'freeze' is not a valid FreezeConfig: {err}") from err
    try:
        L.cast_to_recorded_dtypes(model, config["layers"])  # weights regenerate at the recorded dtype
    except ValueError as err:
        raise TicketError(f"{CONFIG_NAME}: {err}") from err
    try:
        keys = {row["name"]: tuple(row["freeze_keys"]) for row in config["layers"]
                if isinstance(row.get("freeze_keys"), list) and len(row["freeze_keys"]) == 2}
        freeze_for_ticket(model, freeze_config, keys)
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
    check_layers(get_group(model), config, arch)
    check_digests(model, config, masked=False)
    if "regenerated" in config:  # (tickets before 0.3 have no record: their regenerated values were constants)
        check_regenerated(model, config["regenerated"])
    if is_symbol_record(config["mask"]):
        _apply_symbols(model, config, packed)
    else:
        _apply_mask(model, config, packed)
    _load_state(model, state)
    check_digests(model, config, masked=True)
    check_built(model, config.get("timm_config"), f"the ticket's {CONFIG_NAME}")
    apply_data_config(model, config.get("data_config"))
    model.fslt_architecture = arch
    model.eval()
    return model


def ticket_freeze_config(config: dict) -> FreezeConfig:
    """A ticket's FreezeConfig (config.json "freeze"), with the generator version it was written with.

    A version-1 ticket's "freeze" has no generator_version (the field came with version
    2): the top-level one decides.  Version 1's normal stream goes through torch's float64
    sqrt, whose last bit differs between CPUs, so a version-1 kaiming_normal ticket may
    rebuild other weights than it was saved with on another machine: that is warned
    (its initial scores differ the same way, which does not matter: the mask bits are
    stored).  Raises ValueError/TypeError for invalid fields.
    """
    generator = config.get("generator_version")
    fields = dict(config["freeze"])
    fields.setdefault("placement_version", 1)  # tickets before 0.3 used the first placement rule
    if fields.setdefault("generator_version", generator) != generator:
        raise ValueError(f"freeze.generator_version {fields['generator_version']!r} differs from the "
                         f"ticket's generator_version {generator!r}")
    if generator == 1 and fields.get("weight_init") == "kaiming_normal":
        warnings.warn("this ticket uses generator version 1 with weight_init='kaiming_normal': version 1's normal "
                      "stream depends on the CPU's float64 sqrt, so its weights may differ in the last bit from "
                      "the machine that saved it; tickets saved now use generator version 2 (the same bits on "
                      "every machine)", UserWarning, stacklevel=5)
    return FreezeConfig(**fields)
