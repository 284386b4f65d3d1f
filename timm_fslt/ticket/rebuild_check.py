"""Does an architecture record rebuild a model exactly? The check ``save_ticket`` runs before writing.

A ticket stores mask bits and state; everything else the loaded model holds comes from
building its architecture record again. So the record is built and compared with the model:

- **every tensor** (parameters and buffers, persistent or not) under every name it has -- a
  module shared between blocks, as coat's ``cpe``/``crpe``, is listed under each -- by name,
  shape, and, for integer and bool tensors, dtype;
- **every module**: its name, class, ``extra_repr()``, its plain attributes (numbers, strings
  and tuples of them: ``img_size``, ``window_size``, ``global_pool``, ...), and which names are
  one shared module;
- **the value of every buffer the ticket neither stores nor regenerates**
  (``relative_position_index``, ``relative_coords_table``, ``attn_mask``, rotary tables, ...):
  the loaded model takes them from the builder as built.

A frozen model's masked tensor lives at ``<module>.parametrizations.<param>.original`` and is
compared as ``<module>.<param>``; the parametrization's own tensors (scores, codes) are
``freeze``'s, not the builder's. ``num_batches_tracked`` counts training steps, not architecture;
``FORWARD_CACHES`` are buffers a forward recomputes for its input (convit's ``rel_indices``).

What a forward may change is not compared, since no input exists at save time to replay one:
``FORWARD_CACHES``, and ``RUNTIME_ATTRIBUTES``, plain attributes that choose how a module computes,
not what (PyG's ``MessagePassing.fuse``, which ``FastRGCNConv.forward`` switches off). Both list
(class, name) and cover the class's subclasses; a listed class must say its entry changes no output.
A ``ParameterDict``/``ParameterList``'s ``extra_repr()`` prints its entries (device, Parameter or,
once masked, Tensor) and is not compared; the entries are, as tensors, masked ones
(``<dict>.parametrizations.<key>.original``) as ``<dict>.<key>``.
"""
from __future__ import annotations

import enum
import inspect
import math
import re
from typing import Callable, Iterable, Mapping, Optional

import torch
from torch import nn
from torch.nn.parameter import is_lazy
from torch.nn.utils import parametrize

from timm_fslt.report import non_regenerable_state

_PARAMETRIZED = re.compile(r"^(?:(?P<prefix>.*)\.)?parametrizations\.(?P<param>[^.]+)\.(?P<rest>.+)$")
_IN_PARAMETRIZATION = re.compile(r"(?:^|\.)parametrizations(?:\.|$)")
# Module attributes that change after creation without changing the architecture.
IGNORED_ATTRIBUTES = frozenset({"training", "grad_checkpointing", "distilled_training"})
RUNTIME_BUFFERS = ("num_batches_tracked",)
# Buffers a module's forward replaces for the input's size (the loaded model recomputes them at its
# first forward): (class, buffer name). Add yours here if a module of yours caches so.
FORWARD_CACHES = {("timm.models.convit.GPSA", "rel_indices")}
# Plain attributes a forward may set that choose how a module computes, not what: (class, attribute).
# PyG's MessagePassing.fuse picks the fused message_and_aggregate kernel over message + aggregate (both
# compute the same function); the constructor derives it from the class and ``aggr`` (both compared)
# and FastRGCNConv.forward switches it off. Add yours here if a forward of yours flips such a switch.
RUNTIME_ATTRIBUTES = {("torch_geometric.nn.conv.message_passing.MessagePassing", "fuse")}
# Containers whose extra_repr() lists their entries (values, device, Parameter or plain Tensor once
# masked) rather than configuration: their entries are compared as tensors, their repr is not.
_ENTRY_LISTS = (nn.ParameterDict, nn.ParameterList)
_SKIP = object()


def builder_name(name: str) -> Optional[str]:
    """The name a tensor has in a freshly built model (None for a parametrization's own tensors)."""
    found = _PARAMETRIZED.match(name)
    if found is None:
        return name
    if found["rest"] != "original":
        return None
    return f"{found['prefix']}.{found['param']}" if found["prefix"] else found["param"]


class _Tensor:
    __slots__ = ("tensor", "kind", "persistent", "masked", "first")

    def __init__(self, tensor, kind, persistent, masked, first):
        self.tensor, self.kind, self.persistent, self.masked, self.first = tensor, kind, persistent, masked, first


def tensor_table(model: nn.Module) -> dict[str, _Tensor]:
    """Every parameter and buffer under every name (shared modules under each of theirs)."""
    table, first = {}, {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{module_name}." if module_name else ""
        for kind, tensors in (("parameter", module._parameters), ("buffer", module._buffers)):
            for key, tensor in tensors.items():
                if tensor is None:
                    continue
                full = prefix + key
                name = builder_name(full)
                if name is None:
                    continue
                if kind == "buffer" and _declared(module, key, FORWARD_CACHES):
                    continue
                persistent = kind == "parameter" or key not in module._non_persistent_buffers_set
                table[name] = _Tensor(tensor, kind, persistent, name != full, first.setdefault(id(tensor), name))
    return table


def _plain(value, depth: int = 0):
    """A module attribute as a comparable plain value, or _SKIP (objects, tensors, callables)."""
    if isinstance(value, enum.Enum):
        value = value.value
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, (tuple, list, torch.Size)) and depth < 3 and len(value) <= 256:
        items = tuple(_plain(v, depth + 1) for v in value)
        return _SKIP if any(v is _SKIP for v in items) else items
    return _SKIP


def _class(module: nn.Module) -> str:
    cls = type(module)
    if parametrize.is_parametrized(module):  # torch's Parametrized<Class>, built on the original class
        cls = cls.__bases__[0]
    return f"{cls.__module__}.{cls.__qualname__}"


def _declared(module: nn.Module, key: str, table: set) -> bool:
    """Does ``table`` list (class, key) for the module's class or one of its bases?"""
    return any((f"{cls.__module__}.{cls.__qualname__}", key) in table for cls in type(module).__mro__)


def _extra_repr(module: nn.Module) -> Optional[str]:
    if isinstance(module, _ENTRY_LISTS):
        return None
    try:
        return module.extra_repr()
    except Exception:  # a repr reading tensor values on the meta device
        return None


def module_table(model: nn.Module) -> dict[str, tuple]:
    """name -> (class, the first name of the same module object, extra_repr, plain attributes)."""
    table, first = {}, {}
    for name, module in model.named_modules(remove_duplicate=False):
        if _IN_PARAMETRIZATION.search(name):
            continue
        attributes = {key: _plain(value) for key, value in vars(module).items()
                      if not (key.startswith("_") or key in IGNORED_ATTRIBUTES or "fslt" in key
                              or _declared(module, key, RUNTIME_ATTRIBUTES))}
        attributes = {key: value for key, value in attributes.items() if value is not _SKIP}
        table[name] = (_class(module), first.setdefault(id(module), name), _extra_repr(module), attributes)
    return table


class Problem(str):
    """One difference, as text; ``attribute`` names the module attribute that differs, if one does."""
    attribute: Optional[str] = None

    def __new__(cls, text: str, attribute: Optional[str] = None):
        self = super().__new__(cls, text)
        self.attribute = attribute
        return self


def _shape(tensor) -> tuple:
    return tuple(tensor.shape)


def _names(names: Iterable[str], limit: int = 3) -> str:
    names = sorted(names)
    return ", ".join(repr(n) for n in names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit
                                                        else "")


def _lazy_problem(name: str) -> str:
    return (f"its {name!r} is an uninitialised lazy parameter: the builder must run one forward "
            "(on a dummy input) before it returns the model")


def _tensor_problems(mine: dict, theirs: dict, structured: bool) -> Iterable[str]:
    for name in [n for n, t in mine.items() if n in theirs and t.masked]:  # masked layers first, in order
        module, _, param = name.rpartition(".")
        shape, built = _shape(mine[name].tensor), theirs[name].tensor
        if is_lazy(built):
            yield _lazy_problem(name)
        elif not structured and _shape(built) != shape:
            yield f"its layer {module!r} has {param} shape {_shape(built)}, the model's has {shape}"
    extra = [n for n in theirs if n not in mine]
    missing = [n for n in mine if n not in theirs]
    if missing:
        yield f"it has no tensor {_names(missing)} (the model has)"
    if extra:
        yield f"it has tensors the model does not have: {_names(extra)}"
    for name, entry in mine.items():
        built = theirs.get(name)
        if built is None or entry.masked:
            continue
        if is_lazy(built.tensor):
            yield _lazy_problem(name)
        elif not structured and _shape(built.tensor) != _shape(entry.tensor):
            yield f"its {name!r} has shape {_shape(built.tensor)}, the model's {_shape(entry.tensor)}"
        elif not (entry.tensor.dtype.is_floating_point and built.tensor.dtype.is_floating_point) \
                and entry.tensor.dtype != built.tensor.dtype:
            yield f"its {name!r} is {built.tensor.dtype}, the model's {entry.tensor.dtype}"
        elif entry.kind == built.kind == "buffer" and entry.persistent != built.persistent:
            saved = "a persistent" if built.persistent else "a non-persistent"
            yield f"its buffer {name!r} is {saved} one, the model's is not"


def _module_problems(mine: dict, theirs: dict, structured: bool) -> Iterable[str]:
    missing = [n for n in mine if n not in theirs]
    extra = [n for n in theirs if n not in mine]
    if missing:
        yield f"it has no module {_names(missing)} (the model has)"
    if extra:
        yield f"it has modules the model does not have: {_names(extra)}"
    for name, (cls, first, text, attributes) in mine.items():
        if name not in theirs:
            continue
        b_cls, b_first, b_text, b_attributes = theirs[name]
        label = repr(name) if name else "the top module"
        if cls != b_cls:
            yield f"its module {label} is a {b_cls}, the model's a {cls}"
        elif first != b_first:
            yield (f"in the model {label} is the module {first!r} (shared), in the rebuilt one "
                   + (f"it is {b_first!r}" if b_first != name else "a module of its own"))
        elif structured:
            continue
        elif text is not None and b_text is not None and text != b_text:
            yield f"its module {label} is {b_cls.rpartition('.')[2]}({b_text}), the model's ({text})"
        else:
            # Both plain on both sides: an attribute a forward sets (a cache, a tensor) is not compared.
            for key in sorted(set(attributes) & set(b_attributes)):
                if attributes[key] != b_attributes[key]:
                    where = f"{name}.{key}" if name else key
                    yield Problem(f"its {where} is {b_attributes[key]!r}, the model's {attributes[key]!r}",
                                  attribute=key)


def value_names(model: nn.Module, table: dict) -> list[str]:
    """The buffers whose values the loaded model takes from the builder: neither stored in the
    ticket's state (under any of their names) nor regenerated."""
    stored = set(non_regenerable_state(model))
    stored_first = {table[n].first for n in stored if n in table}
    return [name for name, entry in table.items()
            if entry.kind == "buffer" and not entry.masked and entry.first not in stored_first
            and name.rpartition(".")[2] not in RUNTIME_BUFFERS]


def _value_problems(mine: dict, theirs: dict, names: list) -> Iterable[str]:
    for name in names:
        value, built = mine[name].tensor, theirs[name].tensor
        if _shape(value) != _shape(built):
            continue  # (a compacted model; its shape difference is reported otherwise)
        if value.dtype.is_floating_point and built.dtype.is_floating_point:
            built = built.to(value.dtype)  # a model cast to bfloat16 is rebuilt and cast the same way
        if not torch.equal(value.detach().cpu(), built.detach().cpu()):
            yield (f"its buffer {name!r} holds other values than the model's (the ticket does not store it: "
                   "the builder must rebuild it exactly)")


def rebuild_problems(model: nn.Module, candidate: nn.Module, structured: bool,
                     build_on_cpu: Callable[[], nn.Module]) -> list[str]:
    """Every way ``candidate`` (the record, freshly built) differs from the frozen ``model``.

    ``candidate`` may hold its parameters on the meta device; the buffers whose values are
    compared must be real, else ``build_on_cpu()`` is called for a full build.
    """
    mine, theirs = tensor_table(model), tensor_table(candidate)
    problems = list(_tensor_problems(mine, theirs, structured))
    problems += _module_problems(module_table(model), module_table(candidate), structured)
    if problems:
        return problems
    names = value_names(model, mine)
    if any(theirs[n].tensor.is_meta for n in names):
        theirs = tensor_table(build_on_cpu())
    return list(_value_problems(mine, theirs, names))


def argument_hint(model: nn.Module, problems: list, recorded: Mapping) -> str:
    """Name the creation argument an inferred record most likely misses: a differing attribute
    that the model class's constructor takes (``img_size``), else the ones it was not given."""
    try:
        parameters = [p for p in inspect.signature(type(model).__init__).parameters
                      if p not in ("self", "args", "kwargs")]
    except (TypeError, ValueError):
        return ""
    for problem in problems:
        if getattr(problem, "attribute", None) in parameters:
            return f"; the model was built with another {problem.attribute}= than the record says"
    unset = [p for p in parameters if p not in recorded]
    return (f"; it was built with an argument the record lacks (one of {', '.join(unset[:12])}"
            + (", ..." if len(unset) > 12 else "") + ")") if unset else ""
