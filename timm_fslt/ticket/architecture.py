"""Which network a ticket rebuilds: the architecture record and the registries it is looked up in.

A ticket stores its architecture as a small JSON record, one of:

``{"timm": "<model name>", "kwargs": {...}}``
    looked up in timm's model registry (``timm.is_model``); built with ``pretrained=False``.
``{"builder": "<registered name>", "kwargs": {...}}``
    looked up in timm_fslt's builder registry: functions that ``timm_fslt`` itself
    (``"gin"``) or the user's own code registered with ``register_builder``.
``{"builder": "pkg.module:function", "kwargs": {...}}``
    an import path. Importing and calling it runs code the ticket names, so
    ``load_ticket`` refuses it unless the caller passes ``trust_builder=True``;
    even then the function must be a top-level attribute of the module (no dotted
    attribute walk that could reach ``os`` or ``shutil`` through another module).

Nothing a ticket names is imported or called before it is found in a registry or the
caller has said it trusts the ticket; and every build runs under a budget of parameter
elements and seconds, checked as each parameter is registered, so a record such as
``{"timm": "vit_tiny_patch16_224", "kwargs": {"depth": 30000}}`` is stopped early
instead of eating minutes and gigabytes.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import re
import threading
import time
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from timm_fslt.errors import ArchitectureError, TicketError
from timm_fslt.frozen import get_config
from timm_fslt.ticket.inference import DOWNLOAD_KWARGS, infer_timm_architecture
from timm_fslt.ticket.meta_init import skip_meta_init
from timm_fslt.ticket.rebuild_check import argument_hint, rebuild_problems
# A registered builder's name: no ':' (that makes an import path) and nothing a shell or path would read.
_NAME_RE = re.compile(r"^[A-Za-z_][\w.\-]*$")
# An import path for trust_builder=True: dotted module, one colon, ONE attribute name.
_PATH_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
# Names tickets written by timm_fslt 0.1 used, mapped to today's registered names.
_LEGACY_BUILDERS = {"timm_fslt.models.gin:gin": "gin"}
ARCH_HELP = ("pass architecture={'timm': '<timm model name>', 'kwargs': {...}} or "
             "architecture={'builder': '<name registered with timm_fslt.register_builder>', 'kwargs': {...}} "
             "to save_ticket, or build the model with timm_fslt.create_model(name, **kwargs)")

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


class _ConstructorError(ArchitectureError):
    """The builder itself raised (as opposed to a refused record or an exceeded budget)."""


# -- the builder registry ----------------------------------------------------------------

def register_builder(name: str, fn: Optional[Callable[..., nn.Module]] = None, *, replace: bool = False):
    """Register ``fn(**kwargs) -> nn.Module`` under ``name`` so tickets can name it safely.

    Use as ``register_builder("my_net", build_my_net)`` or as a decorator
    ``@register_builder("my_net")``. A ticket saved with
    ``architecture={"builder": "my_net", "kwargs": {...}}`` then loads wherever the same
    name is registered, without ``trust_builder``. Registering another function under a
    taken name raises unless ``replace=True``.
    """
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"name must be a builder name of letters, digits, '_', '.' or '-' (no ':'), "
                         f"got {name!r}")
    if not isinstance(replace, bool):
        raise TypeError(f"replace must be True or False, got {replace!r}")

    def add(function: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _register_own_builders()  # so that a user's name never silently takes one of ours
        if not callable(function):
            raise TypeError(f"fn must be callable (kwargs -> torch.nn.Module), got {type(function).__name__}")
        taken = _BUILDERS.get(name)
        if taken is not None and taken is not function and not replace:
            raise ValueError(f"builder name {name!r} is already registered to {_qualname(taken)}; "
                             "pass replace=True to register another function under it")
        _BUILDERS[name] = function
        return function

    return add if fn is None else add(fn)


def registered_builders() -> list[str]:
    """The names ``register_builder`` has registered (timm_fslt's own included)."""
    _register_own_builders()
    return sorted(_BUILDERS)


def _qualname(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _register_own_builders() -> None:
    """timm_fslt's own architectures: conv6 / resnet18_cifar / MNIST nets register in timm when
    ``timm_fslt.models`` is imported; the GIN (a PyG model, not a timm one) is registered here,
    so that the models never import the ticket code."""
    from timm_fslt.models.gin import gin  # on first use: the registry needs no model code before that

    _BUILDERS.setdefault("gin", gin)


def is_import_path(builder: str) -> bool:
    return ":" in builder


# -- the record ----------------------------------------------------------------------------

def json_clean(value: Any, what: str) -> Any:
    """``value`` as it will come back from JSON (tuples become lists), or a clear error."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as err:
        raise TicketError(f"{what} must be JSON-serialisable (str, int, float, bool, None, "
                          f"lists and dicts of them): {err}") from None


def normalize_architecture(architecture: Any, where: str = "architecture") -> dict:
    """Validate ``{"timm": name, "kwargs": {...}}`` / ``{"builder": name_or_path, "kwargs": {...}}``."""
    if architecture is None:
        raise ArchitectureError(f"{where} is missing: {ARCH_HELP}")
    if not isinstance(architecture, Mapping):
        raise ArchitectureError(f"{where} must be a dict, got {type(architecture).__name__}: {ARCH_HELP}")
    unknown = set(architecture) - {"timm", "builder", "kwargs"}
    if unknown:
        raise ArchitectureError(f"{where} has unknown keys {sorted(unknown)}; allowed: 'timm' or "
                                "'builder', and 'kwargs'")
    kinds = [k for k in ("timm", "builder") if architecture.get(k) is not None]
    if len(kinds) != 1:
        raise ArchitectureError(f"{where} needs exactly one of 'timm' (a timm model name) or "
                                f"'builder' (a registered builder name), got {dict(architecture)!r}")
    kind = kinds[0]
    name = architecture[kind]
    if not isinstance(name, str) or not name:
        raise ArchitectureError(f"{where}[{kind!r}] must be a non-empty string, got {name!r}")
    if kind == "builder":
        name = _LEGACY_BUILDERS.get(name, name)
        if not (_NAME_RE.match(name) or _PATH_RE.match(name)):
            raise ArchitectureError(
                f"{where}['builder'] must be a name registered with timm_fslt.register_builder, or (for "
                f"trust_builder=True) an import path 'pkg.module:function', got {name!r}")
    kwargs = architecture.get("kwargs") or {}
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise ArchitectureError(f"{where}['kwargs'] must be a dict with string keys, got {kwargs!r}")
    kwargs = {key: json_clean(value, f"{where}['kwargs'][{key!r}]") for key, value in kwargs.items()}
    if kind == "timm":
        kwargs = {k: v for k, v in kwargs.items() if k not in DOWNLOAD_KWARGS}
    return {kind: name, "kwargs": kwargs}


def describe_architecture(arch: Mapping) -> str:
    kind = "timm" if "timm" in arch else "builder"
    args = ", ".join(f"{k}={v!r}" for k, v in arch.get("kwargs", {}).items())
    return f"{kind} {arch[kind]}({args})"


def resolve_builder(arch: Mapping, trust_builder: bool = False) -> Callable[..., nn.Module]:
    """The function that builds ``arch``, found in a registry; nothing is called.

    timm names are looked up in timm's registry and registered builder names in
    timm_fslt's. An import path is imported (its module only) when ``trust_builder``.
    """
    arch = normalize_architecture(arch)
    if "timm" in arch:
        import timm
        _register_own_builders()
        name = arch["timm"]
        if not timm.is_model(name):
            raise ArchitectureError(f"unknown timm model {name!r} in the ticket's architecture; install "
                                    "(and import) the package that registers it first")
        return lambda **kwargs: timm.create_model(name, pretrained=False, **kwargs)
    name = arch["builder"]
    if not is_import_path(name):
        _register_own_builders()
        if name not in _BUILDERS:
            raise ArchitectureError(
                f"unknown builder {name!r} in the ticket's architecture: register the function that builds "
                f"it with timm_fslt.register_builder({name!r}, fn) before loading (registered: "
                f"{sorted(_BUILDERS)})")
        return _BUILDERS[name]
    if not trust_builder:
        raise ArchitectureError(
            f"the ticket's architecture names the import path {name!r}: importing and calling it runs code "
            "the ticket chose. Register the builder in your code with timm_fslt.register_builder(name, fn) "
            "and save the ticket under that name, or, if you trust where this ticket came from, pass "
            "trust_builder=True to load_ticket")
    module_name, attr = name.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ArchitectureError(f"cannot import module {module_name!r} of the ticket's builder {name!r}: "
                                f"{err}") from err
    fn = getattr(module, attr, None)
    if fn is None:
        raise ArchitectureError(f"module {module_name!r} has no {attr!r}, the ticket's builder {name!r}")
    if not callable(fn):
        raise ArchitectureError(f"the ticket's builder {name!r} is not callable")
    return fn


# -- building under a budget -------------------------------------------------------------------

class BuildBudget:
    """Stop a build once it registers more parameter/buffer elements, or runs longer, than allowed.

    torch calls the global registration hooks for every ``register_parameter`` /
    ``register_buffer`` (and so for every ``nn.Parameter`` attribute), so the count is
    checked as the model grows, long before a hostile ``depth=30000`` is reached. Only
    the building thread is counted; ``start`` (``time.monotonic()``) lets a retry share
    the first attempt's seconds. Lazy parameters count once built (``count_elements``).
    """

    def __init__(self, max_elements: Optional[int], max_seconds: Optional[float], what: str,
                 start: Optional[float] = None):
        self.max_elements, self.max_seconds, self.what = max_elements, max_seconds, what
        self.elements = 0
        self._thread = threading.get_ident()
        self._start = time.monotonic() if start is None else start

    def _tensor(self, module, name, tensor):
        if threading.get_ident() != self._thread:
            return None
        if tensor is not None and not is_lazy(tensor):
            self.elements += tensor.numel()
        self._check()
        return None

    def _module(self, module, name, submodule):
        if threading.get_ident() == self._thread:
            self._check()
        return None

    def _check(self) -> None:
        if self.max_elements is not None and self.elements > self.max_elements:
            raise ArchitectureError(
                f"{self.what} has more parameters than max_params={self.max_elements:,} (parameter and buffer "
                f"elements; stopped while building, at {self.elements:,}); pass a larger max_params to load it")
        if self.max_seconds is not None and time.monotonic() - self._start > self.max_seconds:
            raise ArchitectureError(
                f"{self.what} took more than max_build_seconds={self.max_seconds:g} s to build (stopped at "
                f"{self.elements:,} elements); pass a larger max_build_seconds to load it")

    def _to_meta(self, module, name, param):
        """(``parameters_on_meta``) a real parameter becomes a meta one as it is registered."""
        if threading.get_ident() != self._thread or type(param) is not nn.Parameter or param.is_meta:
            return None
        return nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)

    @contextlib.contextmanager
    def active(self, parameters_on_meta: bool = False):
        from torch.nn.modules import module as _m
        handles = [_m.register_module_parameter_registration_hook(self._tensor),
                   _m.register_module_buffer_registration_hook(self._tensor),
                   _m.register_module_module_registration_hook(self._module)]
        if parameters_on_meta:
            handles.append(_m.register_module_parameter_registration_hook(self._to_meta))
        try:
            with skip_meta_init():
                yield self
        finally:
            for handle in handles:
                handle.remove()


def build_architecture(arch: Mapping, *, trust_builder: bool = True, max_params: Optional[int] = None,
                       max_seconds: Optional[float] = None, parameters_on_meta: bool = False,
                       start: Optional[float] = None) -> nn.Module:
    """Build the untrained model an architecture record describes (never downloads weights).

    ``trust_builder`` defaults to True here because a caller that builds its own record
    runs its own code; ``load_ticket`` passes the user's choice. ``parameters_on_meta``:
    parameters are moved to the meta device as they are registered (buffers stay real:
    the save-time check compares their values without allocating the weights).
    """
    arch = normalize_architecture(arch)
    fn = resolve_builder(arch, trust_builder)
    budget = BuildBudget(max_params, max_seconds, describe_architecture(arch), start)
    try:
        with budget.active(parameters_on_meta):
            model = fn(**dict(arch["kwargs"]))
    except TicketError:
        raise
    except Exception as err:  # a constructor refusing hostile or stale kwargs, whatever its error type
        raise _ConstructorError(f"{describe_architecture(arch)} could not be built: "
                                f"{type(err).__name__}: {err}") from err
    if not isinstance(model, nn.Module):
        raise ArchitectureError(f"{describe_architecture(arch)} returned {type(model).__name__}, "
                                "not a torch.nn.Module")
    return model


def count_elements(model: nn.Module) -> int:
    """Parameter and buffer elements; an uninitialised lazy parameter counts 0."""
    return sum(t.numel() for t in (*model.parameters(), *model.buffers()) if not is_lazy(t))


def build_for_check(arch: Mapping, *, trust_builder: bool = True, max_params: Optional[int] = None,
                    max_seconds: Optional[float] = None, values: bool = False) -> nn.Module:
    """Build without allocating the weights: on the meta device, or (``values=True``) with
    the parameters on the meta device and real buffers. A constructor that needs real
    tensors (PyG's ``PNAConv`` reads its degree histogram; a builder that runs a forward
    to initialise lazy layers) raises there: it is built again on the CPU, under the same
    budget (the seconds count from the first attempt). Only an error on the CPU is the
    record's fault; an exceeded budget is never retried."""
    start = time.monotonic()
    kwargs = dict(trust_builder=trust_builder, max_params=max_params, max_seconds=max_seconds, start=start)
    try:
        if values:
            return build_architecture(arch, parameters_on_meta=True, **kwargs)
        with torch.device("meta"):
            return build_architecture(arch, **kwargs)
    except _ConstructorError:
        return build_architecture(arch, **kwargs)


def create_model(model_name: str, **kwargs) -> nn.Module:
    """``timm.create_model`` that remembers how it was called, so a ticket can rebuild it.

    Records ``model.fslt_architecture = {"timm": model_name, "kwargs": kwargs}``: every
    creation argument (``img_size``, ``depth``, drop rates, ...), download-only ones such
    as ``pretrained`` left out (a ticket never needs pretrained weights). A value that is
    not JSON (a class, a function) cannot go into a ticket: ``save_ticket`` names it.
    """
    import timm
    _register_own_builders()

    if not isinstance(model_name, str) or not timm.is_model(model_name):
        raise ValueError(f"model_name must be a timm model name (see timm.list_models()), got {model_name!r}")
    model = timm.create_model(model_name, **kwargs)
    model.fslt_architecture = {
        "timm": model_name,
        "kwargs": {k: v for k, v in kwargs.items() if k not in DOWNLOAD_KWARGS}}
    return model


# -- which record rebuilds a given model ----------------------------------------------------

def resolve_architecture(model: nn.Module, architecture: Optional[Mapping] = None) -> dict:
    """The architecture record for a frozen ``model``: explicit, recorded by ``create_model``,
    or read off a plain timm model (``ticket.inference``).

    Whichever it is, it is built and compared with the model (``ticket.rebuild_check``:
    every tensor, module and attribute, and the values of the buffers a ticket does not
    store); a record that does not rebuild the model exactly is refused, so a ticket that
    would load as another network is never written.
    """
    get_config(model)  # a frozen model, or a clear error
    structured = getattr(model, "fslt_structure", None) is not None
    if architecture is not None:
        arch, source = normalize_architecture(architecture), "architecture="
    elif getattr(model, "fslt_architecture", None) is not None:
        arch, source = normalize_architecture(model.fslt_architecture, "model.fslt_architecture"), \
            "model.fslt_architecture"
    else:
        arch, source = normalize_architecture(infer_timm_architecture(model, ARCH_HELP)), None
    candidate = build_for_check(arch, values=True)
    problems = rebuild_problems(model, candidate, structured, lambda: build_architecture(arch))
    if not problems:
        return arch
    more = f" (and {len(problems) - 1} more difference{'s' if len(problems) > 2 else ''})" if len(problems) > 1 else ""
    if source is None:
        raise ArchitectureError(
            f"cannot infer the architecture unambiguously: timm's pretrained_cfg names "
            f"{describe_architecture(arch)}, but {problems[0]}{more}"
            f"{argument_hint(model, problems, arch['kwargs'])}; {ARCH_HELP}")
    raise ArchitectureError(f"{source} {describe_architecture(arch)} does not rebuild this model: "
                            f"{problems[0]}{more}. If the model was changed after it was built (reset_classifier, "
                            "set_input_size, ...), pass architecture= with the arguments that build it as it is now")
