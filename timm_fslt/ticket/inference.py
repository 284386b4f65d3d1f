"""The architecture record of a model built by plain ``timm.create_model``, read off the model.

Read, never guessed: the name is timm's ``pretrained_cfg["architecture"]``; the creation
arguments are the ones timm recorded (``model._model_args``, timm 1.0.2x and later: every
keyword ``create_model`` received, and supported changes made since, such as
``set_input_size``), with the model's current ``num_classes`` and ``in_chans`` attributes,
and its image size where it differs from the pretrained default (``_traits["img_size"]``,
else ``img_size`` / ``patch_embed.img_size``). The record is then built and compared with
the model tensor by tensor (``ticket.rebuild_check``); if anything differs, ``save_ticket``
refuses and names what differs.
"""
from __future__ import annotations

import json
from typing import Any, Mapping, Optional

from torch import nn

from timm_fslt.errors import ArchitectureError

# kwargs of timm.create_model that fetch weights but do not change the architecture.
DOWNLOAD_KWARGS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir",
                   "pretrained_strict", "pretrained_model_args")


def _int(value: Any) -> Optional[int]:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _spatial(value: Any) -> Optional[tuple]:
    if _int(value):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(_int(v) for v in value):
        return tuple(value)
    return None


def _in_chans(model: nn.Module, cfg: Mapping, kwargs: Mapping) -> Optional[int]:
    """The model's own ``in_chans``, else the recorded one, else the first conv's input channels
    (TResNet's first conv sees 16x the channels after its space-to-depth: its attribute is read first)."""
    for value in (getattr(model, "in_chans", None), kwargs.get("in_chans")):
        if _int(value):
            return value
    first_conv = cfg.get("first_conv")
    if isinstance(first_conv, (list, tuple)):
        first_conv = first_conv[0] if first_conv else None
    if isinstance(first_conv, str):
        try:
            return _int(getattr(model.get_submodule(first_conv), "in_channels", None))
        except AttributeError:
            return None
    return None


def _img_size(model: nn.Module, cfg: Mapping, kwargs: Mapping) -> Any:
    """The image size the model was built for, where it is not the default (None: leave it out)."""
    traits = getattr(model, "_traits", None)
    if isinstance(traits, Mapping) and "img_size" in traits:
        current = _spatial(traits["img_size"])
    else:  # timm before the traits: the attributes models keep
        patch_embed = getattr(model, "patch_embed", None)
        current = _spatial(getattr(model, "img_size", None)) or _spatial(getattr(patch_embed, "img_size", None))
    passed = kwargs.get("img_size")
    if current is None:
        return passed
    if _spatial(passed) == current:
        return passed  # as the caller wrote it (an int stays an int)
    default = cfg.get("input_size")
    if passed is None and isinstance(default, (list, tuple)) and len(default) == 3 \
            and _spatial(tuple(default[-2:])) == current:
        return None
    return current[0] if current[0] == current[1] else list(current)


def infer_timm_architecture(model: nn.Module, help_text: str) -> dict:
    """``{"timm": name, "kwargs": {...}}`` as far as the model shows it (checked by the caller)."""
    cfg = getattr(model, "pretrained_cfg", None)
    name = cfg.get("architecture") if isinstance(cfg, Mapping) else None
    if not isinstance(name, str) or not name:
        raise ArchitectureError(f"cannot tell which architecture built this {type(model).__name__}: {help_text}")
    recorded = getattr(model, "_model_args", None)
    kwargs = {k: v for k, v in recorded.items() if k not in DOWNLOAD_KWARGS and v is not None} \
        if isinstance(recorded, Mapping) else {}
    if _int(getattr(model, "num_classes", None)) or getattr(model, "num_classes", None) == 0:
        kwargs["num_classes"] = model.num_classes
    in_chans = _in_chans(model, cfg, kwargs)
    if in_chans:
        kwargs["in_chans"] = in_chans
    img_size = _img_size(model, cfg, kwargs)
    if img_size is not None:
        kwargs["img_size"] = img_size
    for key, value in kwargs.items():
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            raise ArchitectureError(
                f"cannot record how this {name} was built: its creation argument {key}={value!r} is not "
                f"JSON (a ticket records names and numbers only). Build it with a JSON value timm accepts "
                f"(e.g. a layer's name as a string) through timm_fslt.create_model({name!r}, ...), or pass "
                f"save_ticket(..., architecture={{'builder': '<name>', 'kwargs': {{...}}}}) naming a function "
                "registered with timm_fslt.register_builder that builds it") from None
    return {"timm": name, "kwargs": kwargs}
