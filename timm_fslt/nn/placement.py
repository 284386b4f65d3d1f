"""Where every parameter of a model goes when it is frozen: masked, regenerated or stored.

``place_parameters`` sorts each floating-point parameter into one *kind* by one rule a
reader can predict from the parameter's module, name and shape (first match wins):

====== ============================================================ ==========================
kind   which parameters                                             fate (``FreezeConfig``)
====== ============================================================ ==========================
weight ``weight`` of a conv or linear layer (torch, timm, PyG)      masked
norm   ``weight``/``bias`` of a norm layer (class name has "Norm")  ``batchnorm=``
table  ``nn.Embedding`` weights; names with ``pos``, ``token``,      regenerated: normal,
       ``embed``, ``rel`` or ``table``; any ``*bias*`` with two or   std 0.02 (embeddings 1)
       more dimensions larger than one (attention-bias tables)
weight a name starting with ``att`` (GAT-style attention vectors)   masked
bias   ``bias``, ``*_bias``, ``bias_*`` (at most one dimension > 1)  ``bias=``
gain   names with ``gamma``, ``gain``, ``scale``, ``sigma`` or         ``batchnorm=`` (as a norm
       ``temperature``, whatever their shape (GMMConv's ``sigma``)  weight: 1 when non_affine)
prelu  ``nn.PReLU.weight``                                          constant 0.25 (torch's init)
weight any other ``weight`` or ``*_weight`` (e.g. PyG's               masked
       ``SelectTopK.weight``, a projection vector)
gain   any other tensor with at most one dimension larger than one  ``batchnorm=`` (as a norm
       (layer-scale gammas, ``ScaledStdConv2d.gain``, temperatures) weight: 1 when non_affine)
weight anything else (two or more dimensions larger than one: raw   masked
       ``Parameter`` weights, RNN ``weight_ih/hh``, MHA in_proj)
====== ============================================================ ==========================

``batchnorm="non_affine"`` fixes norm weights and gains at 1 and norm biases at 0 -- except
a norm over a single element, whose output is its bias alone: that bias is 1, so the
branch is not dead from the start; ``"affine"`` trains them; ``"keep"`` keeps them as built
(stored in the ticket).  ``bias="zero"`` fixes every bias at 0 (conv-level ones like PyG's
``GCNConv.bias`` included), ``"train"`` trains them, ``"keep"`` keeps them as built.

``include``/``exclude`` (fnmatch patterns) override this.  A pattern that matches a
*module* name (``"layer4.*"``, ``"fc"``) selects that module's masked-kind parameters, as
in 0.1; one that matches a *parameter* name but not its module's (``"blocks.0.ls1.gamma"``,
``"*.alpha"``) selects that parameter whatever its kind.  An excluded parameter, and the
weights of an excluded module, are kept as built: frozen, and stored in the ticket; so is the
bias of a conv or linear layer whose weight is not masked.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import torch
from torch import nn

from timm_fslt.nn.modules import is_frozen_layer, is_maskable, is_norm
from timm_fslt.regen.init import regenerated_table

KINDS = ("weight", "norm", "table", "bias", "prelu", "gain")
# what becomes of a parameter: masked (a FrozenSupermask), constant or regenerated (rebuilt from the
# seed, stored nowhere), trained (stored), kept (as built, frozen, stored)
FATES = ("masked", "constant", "regenerated", "trained", "kept")

_TABLE_WORDS = ("pos", "token", "embed", "rel", "table")
_GAIN_WORDS = ("gamma", "gain", "scale", "sigma", "temperature")
TABLE_STD = 0.02
EMBEDDING_STD = 1.0
PRELU_INIT = 0.25


class Fate(NamedTuple):
    """What ``freeze`` decided for one parameter, kept in ``module._fslt_fates[name]``."""

    kind: str
    fate: str
    reason: str
    value: Optional[float]  # the constant, or the std of a regenerated table
    key: str  # the generator key (the qualified name the parameter was placed under)


def fate_of(module: Optional[nn.Module], name: str) -> Optional[Fate]:
    """The ``Fate`` ``freeze`` recorded for ``module``'s own tensor ``name`` (None if it recorded none)."""
    fates = getattr(module, "__dict__", {}).get("_fslt_fates")
    return fates.get(name) if fates else None


@dataclass
class Placement:
    """One parameter's kind and fate (``value``: the constant, or the std of a regenerated table)."""

    name: str  # qualified parameter name
    module_name: str
    param_name: str
    module: nn.Module
    kind: str
    fate: str
    value: Optional[float] = None
    reason: str = ""

    @property
    def key(self) -> str:
        """The generator key: the module's name for a layer's ``weight`` (as in 0.1), else the parameter's."""
        return self.module_name if self.param_name == "weight" and self.kind == "weight" else self.name


_is_conv_or_linear = is_maskable


def _is_norm_module(module: nn.Module) -> bool:
    return is_norm(module) or "Norm" in type(module).__name__


def _big_dims(param: torch.Tensor) -> int:
    return sum(1 for s in param.shape if s > 1)


def kind_of(module: nn.Module, param_name: str, param: torch.Tensor) -> str:
    """The kind of ``module``'s own parameter ``param_name`` (the table in the module docstring)."""
    low = param_name.lower()
    if param_name == "weight" and _is_conv_or_linear(module):
        return "weight"
    if param_name in ("weight", "bias") and _is_norm_module(module):
        return "norm"
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and param_name == "weight":
        return "table"
    if any(word in low for word in _TABLE_WORDS) or ("bias" in low and _big_dims(param) >= 2):
        return "table"
    if low.startswith("att"):
        return "weight"
    if low == "bias" or low.endswith("_bias") or low.startswith("bias_"):
        return "bias"
    if any(word in low for word in _GAIN_WORDS):
        return "gain"
    if isinstance(module, nn.PReLU) and param_name == "weight":
        return "prelu"
    if low == "weight" or low.endswith("_weight"):
        return "weight"
    if _big_dims(param) <= 1:
        return "gain"
    return "weight"


def _matches(name: str, patterns: Optional[Sequence[str]]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns or ())


def _names_parameter(name: str, module_name: str, patterns: Optional[Sequence[str]]) -> bool:
    """Whether a pattern matches the parameter's name but not its module's (it names the parameter)."""
    return any(fnmatch.fnmatchcase(name, p) and not fnmatch.fnmatchcase(module_name, p) for p in patterns or ())


def _named_own_parameters(model: nn.Module):
    """(module name, module, parameter name, parameter) of every parameter once (shared ones too)."""
    seen = set()
    for module_name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if is_frozen_layer(module):
            own = []
        for param_name, param in own:
            if id(param) in seen:
                continue
            seen.add(id(param))
            yield module_name, module, param_name, param


def _single_element_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    shape = getattr(module, "normalized_shape", None)
    return shape is not None and int(torch.Size(shape).numel()) == 1 or (
        shape is None and isinstance(weight, torch.Tensor) and weight.numel() == 1 and not isinstance(
            module, nn.modules.batchnorm._NormBase))


def _fate(kind: str, param_name: str, module: nn.Module, batchnorm: str, bias: str,
          layer_masked: bool) -> tuple[str, Optional[float], str]:
    if kind == "weight":
        return "masked", None, ""
    if kind == "table":
        std = EMBEDDING_STD if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) else TABLE_STD
        return "regenerated", std, f"normal(0, {std:g}) from the seed"
    if kind == "prelu":
        return "constant", PRELU_INIT, "PReLU slope, torch's initial 0.25"
    if kind == "bias":
        if not layer_masked:
            return "kept", None, "bias of a layer left unmasked"
        return {"zero": ("constant", 0.0, "bias='zero'"), "train": ("trained", None, "bias='train'"),
                "keep": ("kept", None, "bias='keep'")}[bias]
    # norm and gain follow batchnorm=
    if batchnorm == "affine":
        return "trained", None, "batchnorm='affine'"
    if batchnorm == "keep":
        return "kept", None, "batchnorm='keep'"
    if kind == "norm" and param_name == "bias":
        if _single_element_norm(module):
            return "constant", 1.0, "bias of a single-element norm (its whole output): 1"
        return "constant", 0.0, "batchnorm='non_affine'"
    return "constant", 1.0, "batchnorm='non_affine'"


PLACEMENT_VERSIONS = (1, 2)
PLACEMENT_VERSION = 2


def place_parameters(model: nn.Module, include: Optional[Sequence[str]] = None,
                     exclude: Optional[Sequence[str]] = None, *, batchnorm: str = "non_affine",
                     bias: str = "zero", version: int = PLACEMENT_VERSION) -> list[Placement]:
    """Every not-yet-frozen parameter's ``Placement``, in registration order.

    ``version=1`` is timm_fslt 0.1/0.2's rule (kept so their tickets load): only conv and
    linear weights are masked, ``bias=`` reaches only their biases, ``batchnorm=`` only
    norm layers, and everything else is kept as built.

    Raises ValueError naming the parameter when it cannot be placed (not a real
    floating-point tensor: nothing to mask, regenerate or train).
    """
    if version == 1:
        return _place_v1(model, include, exclude, batchnorm, bias)
    rows = []
    own = list(_named_own_parameters(model))
    masked_modules = set()
    for module_name, module, param_name, param in own:
        name = f"{module_name}.{param_name}" if module_name else param_name
        kind = kind_of(module, param_name, param)
        by_param_in = _names_parameter(name, module_name, include)
        by_param_ex = _names_parameter(name, module_name, exclude)
        module_ex = _matches(module_name, exclude)
        why = "kept as built (exclude)"
        if by_param_in and not by_param_ex:
            kind = "weight"
        elif kind == "weight" and include is not None and not _matches(module_name, include):
            kind, why = "excluded", "kept as built (not matched by include)"
        if by_param_ex or (module_ex and kind == "weight"):
            kind, why = "excluded", "kept as built (exclude)"
        if not (param.is_floating_point()) and kind != "excluded":
            raise ValueError(
                f"parameter {name!r} ({type(module).__name__}, {param.dtype}) cannot be placed: it is not a real "
                "floating-point tensor, so it can be neither masked nor regenerated; keep it as built with "
                f"exclude=[{name!r}] (it is then stored in the ticket), or mask it with include=[...]")
        rows.append([module_name, module, param_name, param, name, kind, why])
        if kind == "weight":
            masked_modules.add(id(module))
    out = []
    for module_name, module, param_name, param, name, kind, why in rows:
        if kind == "excluded":
            out.append(Placement(name, module_name, param_name, module, "excluded", "kept", None, why))
            continue
        unmasked_layer = _is_conv_or_linear(module) and id(module) not in masked_modules
        fate, value, reason = _fate(kind, param_name, module, batchnorm, bias, not unmasked_layer)
        if unmasked_layer and fate != "masked":
            fate, value, reason = "kept", None, "parameter of a layer left unmasked"
        out.append(Placement(name, module_name, param_name, module, kind, fate, value, reason))
    return out


def _place_v1(model, include, exclude, batchnorm, bias) -> list[Placement]:
    out = []
    for module_name, module, param_name, param in _named_own_parameters(model):
        name = f"{module_name}.{param_name}" if module_name else param_name
        masked_layer = _is_conv_or_linear(module) and (include is None or _matches(module_name, include)) \
            and not _matches(module_name, exclude)
        if masked_layer and param_name == "weight":
            row = ("weight", "masked", None, "")
        elif masked_layer and param_name == "bias":
            row = ("bias",) + _fate("bias", "bias", module, batchnorm, bias, True)
        elif is_norm(module) and not _is_conv_or_linear(module) and param_name in ("weight", "bias"):
            if batchnorm == "non_affine":
                row = ("norm", "constant", 1.0 if param_name == "weight" else 0.0, "batchnorm='non_affine'")
            else:
                row = ("norm",) + _fate("norm", param_name, module, batchnorm, bias, True)
        else:
            row = ("excluded", "kept", None, "kept as built (placement version 1)")
        out.append(Placement(name, module_name, param_name, module, *row))
    return out


def plain_state_dict(module: nn.Module) -> None:
    """Give a parametrized layer torch's default state-dict (de)serialisation.

    PyG's ``Linear`` overrides ``_save_to_state_dict`` to write ``self.weight``,
    which for a frozen layer is the computed ``W * mask`` -- a regenerable tensor
    that would then be stored and break strict loading. Patching the dynamic
    ``Parametrized*`` class (unique to this layer; ``materialize`` swaps it back)
    leaves the user's classes untouched.
    """
    cls = type(module)
    if cls._save_to_state_dict is not nn.Module._save_to_state_dict:
        cls._save_to_state_dict = nn.Module._save_to_state_dict
        cls._load_from_state_dict = nn.Module._load_from_state_dict


@torch.no_grad()
def apply_fates(placements: list, seed: int, generator_version: int) -> None:
    """Constants and regenerated tables get their values; only trained parameters keep requires_grad.

    Each module records its parameters' fates in ``module._fslt_fates`` ({name: ``Fate``}; it follows the module through copies and ``.to()``): ``non_regenerable_state``
    reads it, and a module without it was added after ``freeze``.
    """
    for p in placements:
        fates = p.module.__dict__.setdefault("_fslt_fates", {})
        fates[p.param_name] = Fate(p.kind, p.fate, p.reason, p.value, p.key)
        if p.fate == "masked":
            continue
        param = p.module._parameters[p.param_name]
        if p.fate == "constant":
            param.fill_(p.value)
        elif p.fate == "regenerated":
            param.copy_(regenerated_table(seed, p.name, tuple(param.shape), p.value, param.device,
                                          param.dtype, generator_version=generator_version))
        param.requires_grad_(p.fate == "trained")
