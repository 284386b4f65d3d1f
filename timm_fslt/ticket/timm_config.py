"""The keys of a ticket's config.json that timm reads (ticket format 4), and their check against ours.

timm's Hub schema (what ``timm.models.push_to_hf_hub`` / ``save_for_hf`` write and
``timm.create_model("hf-hub:..." / "local-dir:...")`` reads) is::

    {"architecture": "<timm model name>", "num_classes": N, "num_features": F, "global_pool": "...",
     "model_args": {...creation kwargs...}, "pretrained_cfg": {...data config, first_conv, classifier...}}

A format-4 ticket writes exactly these (produced by timm's own ``save_config_for_hf``, with
``model_args`` replaced by the ticket's verified architecture kwargs) and keeps everything of
timm_fslt's under ``"timm_fslt"``. ``pretrained_cfg`` holds the data config the ticket was
evaluated with (``save_ticket(..., data_config=...)``; by default
``timm.data.resolve_data_config(model=model)``).

A builder (non-timm) ticket cannot be built by plain timm: its ``architecture`` is
``"timm_fslt-builder/<builder name>"`` -- a '/' never occurs in a timm model name, so timm
says "Unknown model" instead of building some other network -- its ``model_args`` are the
builder's kwargs and its ``pretrained_cfg`` holds the data config only (or is empty).

The seal covers these keys with ours, and ``check_timm_keys`` refuses a ticket whose timm
keys say another network than our record (a resealed edit of ``model_args`` or
``architecture``): timm and timm_fslt always build the same architecture from one ticket.
"""
from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Mapping, Optional

import safetensors.torch
import torch
from torch import nn

from timm_fslt.errors import TicketError, TicketMismatchError
from timm_fslt.materialize import materialize
from timm_fslt.ticket.architecture import BuildBudget, describe_architecture
from timm_fslt.ticket.integrity import OWN_KEY
from timm_fslt.ticket.state_codec import is_int

BUILDER_PREFIX = "timm_fslt-builder/"
# The top-level keys timm's hub loader reads (timm.models._hub._parse_model_cfg) or writes.
TIMM_KEYS = ("architecture", "num_classes", "num_features", "global_pool", "model_args", "pretrained_cfg",
             "label_names", "label_descriptions")


# timm's data config (``timm.data.resolve_data_config``): the preprocessing a ticket was evaluated with.
DATA_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos", "random")
CROP_MODES = ("center", "squash", "border")


def _positive_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def check_data_config(data_config: Optional[Mapping], what: str = "data_config") -> Optional[dict]:
    """timm's data config as JSON (tuples as lists), or a ``TicketError`` naming the bad key."""
    if data_config is None:
        return None
    allowed = ", ".join(DATA_CONFIG_KEYS)
    if not isinstance(data_config, Mapping):
        raise TicketError(f"{what} must be a dict of timm data-config keys ({allowed}; as "
                          f"timm.data.resolve_data_config returns), got {type(data_config).__name__}")
    unknown = sorted(str(k) for k in data_config if k not in DATA_CONFIG_KEYS)
    if unknown:
        raise TicketError(f"{what} has unknown keys {unknown}; allowed: {allowed}")
    out = {}
    for key in DATA_CONFIG_KEYS:
        if key not in data_config:
            continue
        value = data_config[key]
        if key == "input_size":
            ok = isinstance(value, (tuple, list)) and len(value) == 3 and all(
                isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
            value, need = (list(value) if ok else value), "(channels, height, width), three positive ints"
        elif key in ("mean", "std"):
            ok = isinstance(value, (tuple, list)) and len(value) > 0 and all(
                not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) for v in value) \
                and (key == "mean" or all(v > 0 for v in value))
            value, need = (list(value) if ok else value), "a list of finite numbers, one per channel" + (
                " (positive)" if key == "std" else "")
        elif key == "crop_pct":
            ok, need = _positive_number(value) and value <= 4, "a number in (0, 4]"
        elif key == "interpolation":
            ok, need = value in INTERPOLATIONS and isinstance(value, str), f"one of {list(INTERPOLATIONS)}"
        else:
            ok, need = value in CROP_MODES and isinstance(value, str), f"one of {list(CROP_MODES)}"
        if not ok:
            raise TicketError(f"{what}[{key!r}] must be {need}, got {value!r}")
        out[key] = value
    channels = out.get("input_size", [None])[0]
    for key in ("mean", "std"):
        if channels is not None and key in out and len(out[key]) not in (1, channels):
            raise TicketError(f"{what}[{key!r}] has {len(out[key])} values but input_size has {channels} channels")
    return out


_TRAITS = ("in_chans", "num_classes", "global_pool", "img_size")
_CHECKPOINT_KEYS = ("tag", "license", "origin_url", "paper_ids", "paper_name", "notes", "hf_hub_id", "url", "file",
                    "hf_hub_filename", "source")


def timm_architecture_name(arch: Mapping) -> str:
    """The string config.json's ``architecture`` holds for our architecture record."""
    return arch["timm"] if "timm" in arch else BUILDER_PREFIX + arch["builder"]


def _clean(value):
    return json.loads(json.dumps(value, allow_nan=False))


def timm_keys(model: nn.Module, arch: Mapping, data_config: Optional[Mapping]) -> dict:
    """The timm-facing keys of a format-4 config.json for ``model`` built from ``arch``."""
    kwargs = _clean(dict(arch["kwargs"]))
    if "timm" in arch and isinstance(getattr(model, "pretrained_cfg", None), Mapping):
        from timm.models._hub import save_config_for_hf  # what timm.models.save_for_hf writes

        with tempfile.TemporaryDirectory(prefix="fslt-timm-config-") as tmp:
            path = Path(tmp) / "config.json"
            try:
                # timm records in_chans, num_classes, global_pool and img_size from the model itself (and
                # refuses an override that differs: an encoder ignores num_classes); the rest from ours
                save_config_for_hf(model, str(path), model_args={k: v for k, v in kwargs.items() if k not in _TRAITS},
                                   data_config=None if data_config is None else dict(data_config))
            except ValueError as err:  # timm's own check of the data config against the model's input
                what = "data_config does not fit the model" if data_config is not None else \
                    f"timm cannot record {arch['timm']}'s data config"
                raise TicketError(f"{what}: {err} (timm.data.resolve_model_data_config(model) gives one that "
                                  "fits)") from err
            except Exception as err:
                raise TicketError(f"cannot write timm's config keys for {arch['timm']}: "
                                  f"{type(err).__name__}: {err}") from err
            keys = json.loads(path.read_text(encoding="utf-8"))
        keys = {k: v for k, v in keys.items() if k in TIMM_KEYS}
        # these describe timm's pretrained checkpoint of the architecture, which a ticket does not use
        for key in _CHECKPOINT_KEYS:
            keys.get("pretrained_cfg", {}).pop(key, None)
        if keys.get("architecture") != arch["timm"]:
            raise TicketError(f"timm's pretrained_cfg names architecture {keys.get('architecture')!r}, but the "
                              f"ticket rebuilds {arch['timm']!r}")
    else:
        if data_config is None:
            data_config = model_data_config(model)
        keys = {"architecture": timm_architecture_name(arch), "pretrained_cfg": dict(data_config or {})}
    # The kwargs timm_fslt verified rebuild this very model (ticket.rebuild_check), not timm's view
    # of the model's arguments: the loader requires the two to be equal.
    keys.pop("model_args", None)
    if kwargs:
        keys["model_args"] = kwargs
    return _clean(keys)


def model_data_config(model: nn.Module) -> Optional[dict]:
    """The data config timm resolves for ``model`` when it carries a timm ``pretrained_cfg``
    (against the model's current input size and channels, as ``timm.models.save_for_hf`` records
    it), else None."""
    if not isinstance(getattr(model, "pretrained_cfg", None), Mapping) or not model.pretrained_cfg:
        return None
    from timm.data import resolve_data_config
    from timm.data.model_config import resolve_input_data_config

    try:
        resolved = resolve_input_data_config(model)
    except Exception:  # not a timm model class: what its pretrained_cfg says
        resolved = resolve_data_config(model=model)
    return check_data_config(resolved, "the model's timm data config")


def check_timm_keys(document: Mapping, arch: Mapping, path) -> tuple[dict, Optional[dict]]:
    """(timm's keys, the data config in them) of a format-4 config.json, checked against our
    architecture record ``arch``; a contradiction is a ``TicketMismatchError``."""
    keys = {k: v for k, v in document.items() if k != OWN_KEY}
    unknown = sorted(set(keys) - set(TIMM_KEYS))
    if unknown:
        raise TicketError(f"{str(path)!r} has top-level keys {unknown} that are neither timm's ({list(TIMM_KEYS)}) "
                          f"nor {OWN_KEY!r}")
    expected = timm_architecture_name(arch)
    if keys.get("architecture") != expected:
        raise TicketMismatchError(
            f"{str(path)!r}: timm's 'architecture' is {keys.get('architecture')!r} but the ticket's own record "
            f"({OWN_KEY}.architecture) rebuilds {expected!r}: plain timm would build another network than "
            "timm_fslt loads; the ticket was altered")
    model_args = keys.get("model_args", {})
    if not isinstance(model_args, dict) or model_args != dict(arch["kwargs"]):
        ours = dict(arch["kwargs"])
        if isinstance(model_args, dict):
            differ = sorted(k for k in set(model_args) | set(ours) if model_args.get(k, ...) != ours.get(k, ...))
            what = "differ in " + ", ".join(f"{k} (timm {model_args.get(k, 'absent')!r}, ours "
                                            f"{ours.get(k, 'absent')!r})" for k in differ[:5])
        else:
            what = f"are {type(model_args).__name__}, not a dict"
        raise TicketMismatchError(
            f"{str(path)!r}: timm's 'model_args' and the ticket's own architecture kwargs ({OWN_KEY}.architecture) "
            f"{what}: plain timm would build another network than timm_fslt loads; the ticket was altered")
    pretrained_cfg = keys.get("pretrained_cfg")
    if not isinstance(pretrained_cfg, dict):
        raise TicketError(f"{str(path)!r} lacks a valid 'pretrained_cfg' entry (dict), which timm reads")
    # timm writes the model's class count at the top and in pretrained_cfg (model_args may say another
    # that the model ignores: an encoder); check_built compares it with the rebuilt model
    given = {"num_classes": keys.get("num_classes"), "pretrained_cfg.num_classes": pretrained_cfg.get("num_classes")}
    for where, value in given.items():
        if value is not None and (not is_int(value) or value < 0):
            raise TicketError(f"{str(path)!r}: {where} must be a non-negative int, got {value!r}")
    given = {w: v for w, v in given.items() if v is not None}
    if len(set(given.values())) > 1:
        raise TicketMismatchError(f"{str(path)!r}: the class counts contradict each other ({given}); the ticket "
                                  "was altered")
    data_config = {k: pretrained_cfg[k] for k in DATA_CONFIG_KEYS if k in pretrained_cfg}
    data_config = check_data_config(data_config, f"{str(path)!r} pretrained_cfg") if data_config else None
    return keys, data_config


def check_timm_builds(directory: Path, ours: nn.Module, arch: Mapping, max_params: int, max_seconds: float) -> None:
    """``timm.create_model("local-dir:DIR")`` builds the tensors our record builds (``ours``, from
    ``build_for_check``): timm also derives creation arguments from ``pretrained_cfg`` (``in_chans``
    from ``input_size``, ``img_size`` when ``fixed_input_size``), so comparing the two builds refuses
    every reading of timm's keys that is another network. Built on the meta device under the load's budget."""
    if "timm" not in arch:
        return  # plain timm cannot build a builder ticket at all ("timm_fslt-builder/<name>")
    import timm

    what = f"the network plain timm builds from {str(Path(directory) / 'config.json')!r}"
    budget = BuildBudget(max_params, max_seconds, what)
    theirs = None
    for device in ("meta", "cpu"):  # a constructor that needs real tensors is built again on the CPU
        try:
            with budget.active(), torch.device(device):
                theirs = timm.create_model(f"local-dir:{directory}")
            break
        except TicketError:
            raise
        except Exception as err:
            problem = f"{type(err).__name__}: {err}"
    if theirs is None:
        raise TicketMismatchError(f"plain timm cannot build this ticket's config.json ({problem}), though its own "
                                  f"record builds {arch['timm']}: the ticket was altered")
    got = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    want = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    if type(theirs) is not type(ours) or got != want:
        differ = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
        first = differ[0] if differ else "the model class"
        raise TicketMismatchError(
            f"{what} is not the one the ticket's record builds: {first} is {got.get(first, 'absent')} in timm's, "
            f"{want.get(first, 'absent')} in ours ({len(differ)} tensors differ); timm derives creation arguments "
            "from config.json's model_args and pretrained_cfg (input_size, fixed_input_size): the ticket was altered")


def check_built(model: nn.Module, keys: Optional[Mapping], where: str) -> None:
    """The model rebuilt from our record has the class count timm's keys state."""
    if not keys or keys.get("num_classes") is None:
        return
    built = getattr(model, "num_classes", None)
    if is_int(built) and built != keys["num_classes"]:
        raise TicketMismatchError(f"{where}: timm's 'num_classes' is {keys['num_classes']} but the model rebuilt "
                                  f"from the ticket has {built} classes; the ticket was altered")


@torch.no_grad()
def timm_weights_bytes(model: nn.Module, arch: Mapping, structure) -> bytes:
    """timm's standard ``model.safetensors``: the state dict of ``timm_fslt.materialize(model)``
    (effective weights W * mask * scale, norms, buffers), loadable by plain timm."""
    if "timm" not in arch:
        raise TicketError(f"timm_weights=True writes weights plain timm loads, but this ticket's architecture is "
                          f"{describe_architecture(arch)}, not a timm model: save it with timm_weights=False")
    if structure is not None:
        raise TicketError("timm_weights=True: this ticket is compacted (its layers were cut by torch-pruning), "
                          f"so its weights do not fit the {arch['timm']} timm builds; save it with timm_weights=False")
    plain = materialize(model)
    tensors = {key: value.detach().cpu().contiguous() for key, value in plain.state_dict().items()}
    try:  # one metadata key, as timm/transformers write it: the bytes are the same at every save
        return safetensors.torch.save(tensors, metadata={"format": "pt"})
    except (RuntimeError, ValueError) as err:  # e.g. tensors sharing memory (tied weights)
        raise TicketError(f"timm_weights=True: cannot write model.safetensors: {err}") from err


def apply_data_config(model: nn.Module, data_config: Optional[Mapping]) -> None:
    """The ticket's data config into a loaded timm model's ``pretrained_cfg``, so that
    ``timm.data.resolve_data_config(model=model)`` gives the ticket's preprocessing."""
    if data_config and isinstance(getattr(model, "pretrained_cfg", None), Mapping):
        model.pretrained_cfg = {**model.pretrained_cfg, **data_config}
        if hasattr(model, "default_cfg"):
            model.default_cfg = model.pretrained_cfg
