"""``timm_fslt.freeze``: turn any model into a partially frozen random network."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn
from torch.nn.parameter import UninitializedParameter
from torch.nn.utils import parametrize

from timm_fslt.nn.modules import check_initialized, is_frozen_layer, is_maskable, module_registrations
from timm_fslt.nn.placement import PLACEMENT_VERSION, PLACEMENT_VERSIONS, Placement, apply_fates, place_parameters
from timm_fslt.nn.placement import plain_state_dict
from timm_fslt.nn.method_options import check_method_options, fill_method_defaults
from timm_fslt.nn.methods import SearchMethod
from timm_fslt.nn.recompute import recompute_context
from timm_fslt.nn.supermask import SCALES, SCOPES, FrozenSupermask, SupermaskGroup
from timm_fslt.regen import native, pattern as freezing, rng
from timm_fslt.regen.init import SCORE_INITS, WEIGHT_INITS, random_weight
from timm_fslt.regen.init import random_weights_many as init_many

BATCHNORM_MODES = ("non_affine", "affine", "keep")
BIAS_MODES = ("zero", "train", "keep")


@dataclass
class FreezeConfig:
    """Every choice ``freeze`` makes; it is also what a ticket's config.json stores.

    prune, lock: fractions of the maskable weights permanently removed / kept.
    sparsity: the ticket's overall sparsity, in [prune, 1 - lock]; None = middle.
    distribution: per-layer frozen counts, "epl" | "erk" | "igq".
    scope: "global" (one threshold for all layers) | "layerwise".
    weight_init, score_init: see ``timm_fslt.regen.init.random_weight``.
    scale: None | "static" | "dynamic" -- multiply W*m by 1/sqrt(density).
    seed: keys the generator of weights, freezing pattern and scores.
    include, exclude: fnmatch patterns on module names (that module's weights) or on parameter
        names (that parameter); see ``timm_fslt.nn.placement``.
    batchnorm: "non_affine" (gamma=1, beta=0, frozen) | "affine" (trained) | "keep" (as built, frozen),
        for norm layers' parameters and for gains and layer scales.
    bias: "zero" (zeroed, frozen) | "train" | "keep" (as built, frozen), for every bias.
    generator_version: 2 (default: integer-only, the same bits on every CPU and GPU) or 1
        (the original generator, kept so version-1 tickets load; its kaiming_normal
        stream uses float64 sqrt, whose last bit differs between CPUs).
    placement_version: 2 (default: every weight tensor masked, the other parameters regenerated
        or stored as ``timm_fslt.nn.placement`` says) or 1 (0.1/0.2's rule, kept so their tickets
        load: conv and linear weights only, everything else kept as built).
    method: "edge_popup" (default) | "multicoated" (coat_sparsities) | "iterand" (rerand_period,
        rerand_rate); sparsity_schedule=(shape, start, until) with schedule_steps, for any method:
        see ``timm_fslt.nn.method_options``.  At their defaults they are left out of ``to_dict``.
    """

    prune: float = 0.0
    lock: float = 0.0
    sparsity: Optional[float] = None
    distribution: str = "epl"
    scope: str = "global"
    weight_init: str = "kaiming_uniform"
    score_init: str = "kaiming_normal"
    scale: Optional[str] = None
    seed: int = 0
    include: Optional[list] = None
    exclude: Optional[list] = None
    batchnorm: str = "non_affine"
    bias: str = "zero"
    generator_version: int = rng.GENERATOR_VERSION
    placement_version: int = PLACEMENT_VERSION
    method: str = "edge_popup"
    coat_sparsities: Optional[tuple] = None
    rerand_period: Optional[int] = None
    rerand_rate: Optional[float] = None
    sparsity_schedule: Optional[tuple] = None
    schedule_steps: Optional[int] = None

    def __post_init__(self):
        for arg in ("include", "exclude"):
            if isinstance(getattr(self, arg), (str, bytes)):
                raise TypeError(f"{arg} must be a list of module-name patterns (str), got the single "
                                f"string {getattr(self, arg)!r}; wrap it in a list")
        if self.include is not None:
            self.include = list(self.include)
        if self.exclude is not None:
            self.exclude = list(self.exclude)
        self.validate()
        if self.sparsity is None and not (self.method == "multicoated" and self.coat_sparsities is not None):
            self.sparsity = (self.prune + (1.0 - self.lock)) / 2.0
        fill_method_defaults(self)

    def validate(self) -> None:
        for arg in ("prune", "lock"):
            value = getattr(self, arg)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TypeError(f"{arg} must be a float in [0, 1], got {value!r}")
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{arg} must lie in [0, 1], got {value}")
        if self.prune + self.lock > 1.0 + 1e-12:
            raise ValueError(f"prune + lock must be at most 1 (the freezing ratio), got "
                             f"prune={self.prune} + lock={self.lock} = {self.prune + self.lock}")
        if self.sparsity is not None:
            if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)) \
                    or not math.isfinite(self.sparsity):
                raise TypeError(f"sparsity must be a float or None, got {self.sparsity!r}")
            lo, hi = self.prune, 1.0 - self.lock
            if not lo - 1e-12 <= self.sparsity <= hi + 1e-12:
                raise ValueError(f"sparsity must lie in [prune, 1 - lock] = [{lo:g}, {hi:g}], "
                                 f"got {self.sparsity}")
        choices = {"distribution": freezing.DISTRIBUTIONS, "scope": SCOPES,
                   "weight_init": WEIGHT_INITS, "score_init": SCORE_INITS,
                   "scale": SCALES, "batchnorm": BATCHNORM_MODES, "bias": BIAS_MODES}
        for arg, allowed in choices.items():
            if getattr(self, arg) not in allowed:
                raise ValueError(f"{arg} must be one of {list(allowed)}, got {getattr(self, arg)!r}")
        if isinstance(self.generator_version, bool) or self.generator_version not in rng.GENERATOR_VERSIONS:
            raise ValueError(f"generator_version must be one of {list(rng.GENERATOR_VERSIONS)}, "
                             f"got {self.generator_version!r}")
        if isinstance(self.placement_version, bool) or self.placement_version not in PLACEMENT_VERSIONS:
            raise ValueError(f"placement_version must be one of {list(PLACEMENT_VERSIONS)}, "
                             f"got {self.placement_version!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise TypeError(f"seed must be a non-negative int, got {self.seed!r}")
        for arg in ("include", "exclude"):
            value = getattr(self, arg)
            if value is not None and not all(isinstance(p, str) for p in value):
                raise TypeError(f"{arg} must be a list of module-name patterns (str), got {value!r}")
        check_method_options(self)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        for field, default in METHOD_DEFAULTS.items():  # (so Edge-Popup configs and tickets are as before)
            if out[field] == default:
                del out[field]
        return out


METHOD_DEFAULTS = {"method": "edge_popup", "coat_sparsities": None, "rerand_period": None, "rerand_rate": None,
                   "sparsity_schedule": None, "schedule_steps": None}


# A frozen model owns its SupermaskGroup as the attribute `_fslt_group`; only this
# module reads or writes it (other modules ask is_frozen, get_group, remove_group).
def _group_of(model: nn.Module) -> Optional[SupermaskGroup]:
    return getattr(model, "_fslt_group", None)


def _refresh_hook(module: nn.Module, args):
    group = _group_of(module)
    if group is not None:
        if torch.compiler.is_exporting() if torch.compiler.is_compiling() else torch.jit.is_tracing():
            _check_traceable(group, module)
        else:
            _refresh(group, module)


def _check_traceable(group: SupermaskGroup, model: nn.Module) -> None:
    """Under torch.export or torch.jit.trace (and the ONNX exporters built on them): the same
    refusals as a forward, but the masks are not re-chosen (a selection cannot be traced, and
    under torch.export the tensors are fake): they must be current, or the export is refused
    with a pointer to ``refresh_masks`` and ``materialize``.  The layers then record the plain
    product ``W * mask`` (``FrozenSupermask._traced_weight``)."""
    if model.__dict__.get("_fslt_modules_seen") != module_registrations():
        check_unchanged(model)
    group.check_traceable()


def check_unchanged(model: nn.Module) -> None:
    """Refuse a conv or linear layer added or replaced after ``freeze`` (e.g. by timm's
    ``reset_classifier``): it would train densely, outside the supermask, and no ticket
    could rebuild it.  Run at every forward after a module was registered anywhere in the
    process, and by ``save_ticket``."""
    for name, module in model.named_modules():
        if is_maskable(module) and not is_frozen_layer(module) and "_fslt_fates" not in module.__dict__:
            raise RuntimeError(
                f"layer {name!r} ({type(module).__name__}) was added or replaced after timm_fslt.freeze: it is not "
                "masked and no ticket could rebuild it. Change the model first (e.g. reset_classifier(...)), then "
                "call timm_fslt.freeze on it")
    model._fslt_modules_seen = module_registrations()


# Kept out of torch.compile: a refresh reads Python-side state the compiler cannot
# guard on (the scores' version counters, the process-wide optimizer step count), its
# selection has data-dependent sizes (ties, Python ints from kthvalue) and it writes the
# mask buffers in place, so tracing it would break the graph or recompile every step.
# Run eagerly before the compiled forward, it leaves the masks current as ordinary
# buffers; FrozenSupermask.forward relies on this and skips its own check when compiling.
@torch.compiler.disable
def _refresh(group: SupermaskGroup, model: nn.Module) -> None:
    if model.__dict__.get("_fslt_modules_seen") != module_registrations():
        check_unchanged(model)
    group.refresh()


def is_frozen(model: nn.Module) -> bool:
    """Whether ``model`` was frozen by ``timm_fslt.freeze`` (it owns a supermask group)."""
    return _group_of(model) is not None


def get_group(model: nn.Module) -> SupermaskGroup:
    group = _group_of(model)
    if group is None:
        raise ValueError("model is not frozen: call timm_fslt.freeze(model, prune=..., lock=...) first")
    return group


def get_config(model: nn.Module) -> FreezeConfig:
    config = getattr(model, "fslt_config", None)
    if config is None:
        raise ValueError("model is not frozen: call timm_fslt.freeze(model, prune=..., lock=...) first")
    return config


def remove_group(model: nn.Module) -> None:
    """Take off what ``freeze`` attached to the model itself: the refresh hook, the supermask
    group and the config (its layers stay as they are; ``materialize`` replaces them)."""
    for key, hook in list(model._forward_pre_hooks.items()):
        if hook is _refresh_hook:
            del model._forward_pre_hooks[key]
    del model._fslt_group
    del model.fslt_config
    model.__dict__.pop("_fslt_modules_seen", None)


def refresh_masks(model: nn.Module) -> None:
    """Recompute masks now (only needed after writing scores through ``.data``)."""
    get_group(model).refresh(force=True)


def recompute_masked_weights(model: nn.Module):
    """Context manager: forwards inside it keep no copy of ``W * mask`` for the backward.

    A conv or linear layer saves its weight argument for the input gradient, so a
    frozen model normally holds every masked weight (4 bytes per weight) from the
    forward to the backward; dense weight training saves the weight itself.  Inside
    this context each layer's masked weight is saved as a reference to the frozen
    weight, the scores and the mask, and the backward rebuilds it (one elementwise
    product per layer, bit-identical gradients)::

        with timm_fslt.recompute_masked_weights(model):
            loss = criterion(model(x), y)
        loss.backward()

    Only the forward needs to be inside.  Activation checkpointing inside the model
    takes precedence in its regions; ``backward(create_graph=True)`` is supported;
    under ``torch.compile`` nothing is recorded (the compiler decides what to save).
    The backward refuses (``RuntimeError``) if the masks changed in place between
    the forward and its backward, since the saved product could not be rebuilt.
    """
    return recompute_context(get_group(model))


def freeze(model: nn.Module, prune: float = 0.0, lock: float = 0.0, *,
           sparsity: Optional[float] = None, distribution: str = "epl", scope: str = "global",
           weight_init: str = "kaiming_uniform", score_init: str = "kaiming_normal",
           scale: Optional[str] = None, seed: int = 0,
           include: Optional[Sequence[str]] = None, exclude: Optional[Sequence[str]] = None,
           batchnorm: str = "non_affine", bias: str = "zero",
           generator_version: int = rng.GENERATOR_VERSION, method: str = "edge_popup",
           coat_sparsities: Optional[Sequence[float]] = None, rerand_period: Optional[int] = None,
           rerand_rate: Optional[float] = None, sparsity_schedule: Optional[tuple] = None,
           schedule_steps: Optional[int] = None, config: Optional[FreezeConfig] = None) -> nn.Module:
    """Freeze ``model`` in place into a partially frozen random network and return it.

    Every floating-point parameter gets one of three fates (``timm_fslt.nn.placement``):
    *masked* -- every weight the model multiplies with (conv and linear weights, raw
    weight ``Parameter``s, recurrent and attention weights) is replaced by seed-generated
    random values and gets a ``FrozenSupermask``: a fraction ``prune`` of them is removed
    for good, a fraction ``lock`` kept for good, and Edge-Popup scores search the rest;
    *regenerated* -- biases, norm and layer-scale parameters fixed by ``bias=`` and
    ``batchnorm=``, position/token tables and embeddings (drawn from the seed): a ticket
    stores nothing for them; *stored* -- what no seed rebuilds (BatchNorm running
    statistics, parameters the config trains or keeps as built).  Afterwards only the
    scores (and, if asked, norm/gain parameters or biases) require grad; masks follow the
    scores automatically.

    ``method`` picks the search (``timm_fslt.nn.method_options``): ``"edge_popup"`` (one supermask),
    ``"multicoated"`` (``coat_sparsities``: nested masks, a weight counts once per coat holding it)
    or ``"iterand"`` (every ``rerand_period`` steps a fraction ``rerand_rate`` of the free weights the
    mask leaves out is re-drawn); ``sparsity_schedule=("linear" | "cosine", start, until)`` with
    ``schedule_steps`` anneals the sparsity from ``start`` over the first ``until`` of the run's
    optimizer steps.  Pass either the keyword arguments or ``config=FreezeConfig(...)``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if config is None:
        config = FreezeConfig(prune=prune, lock=lock, sparsity=sparsity, distribution=distribution,
                              scope=scope, weight_init=weight_init, score_init=score_init,
                              scale=scale, seed=seed, include=include, exclude=exclude,
                              batchnorm=batchnorm, bias=bias, generator_version=generator_version,
                              method=method, coat_sparsities=coat_sparsities, rerand_period=rerand_period,
                              rerand_rate=rerand_rate, sparsity_schedule=sparsity_schedule,
                              schedule_steps=schedule_steps)
    else:
        config = dataclasses.replace(config)  # validates, fills the default sparsity
    return _freeze(model, config, draw_scores=True)


def freeze_for_ticket(model: nn.Module, config: FreezeConfig, freeze_keys: Optional[dict] = None) -> nn.Module:
    """``freeze`` as ``load_ticket`` needs it: weights, codes and fates regenerated, but no initial
    scores drawn and no masks selected (a ticket's stored bits set both: ``SupermaskGroup.set_selected``).
    Until then the scores are placeholders and the masks hold the locked weights only.
    ``freeze_keys``: ``{layer name: (t1, t2)}`` as a ticket records them; a layer's code is then made
    elementwise from them (``native.codes_from_keys_many``) when that gives the configuration's
    counts, which makes it the rank rule's code (``pattern.frozen_code``) exactly."""
    return _freeze(model, dataclasses.replace(config), draw_scores=False, freeze_keys=freeze_keys or {})


def _freeze(model: nn.Module, config: FreezeConfig, draw_scores: bool, freeze_keys: Optional[dict] = None) -> nn.Module:
    # Validate everything before touching the model, so bad input leaves it unchanged.
    placements = _place(model, config)
    targets = [p for p in placements if p.fate == "masked"]

    shapes = [tuple(p.module._parameters[p.param_name].shape) for p in targets]
    counts = freezing.frozen_counts(shapes, config.prune, config.lock, config.distribution)
    keys = freeze_keys or {}
    made = _regenerate_all(targets, shapes, counts, config, keys)
    supermasks = [_freeze_site(site, shape, n_pruned, n_locked, config, draw_scores, pre)
                  for site, shape, (n_pruned, n_locked), pre in zip(targets, shapes, counts, made)]
    apply_fates(placements, config.seed, config.generator_version)
    method = SearchMethod(config) if SearchMethod.applies(config) else None
    model._fslt_group = SupermaskGroup(supermasks, config.sparsity, config.scope, config.scale,
                                       refresh=draw_scores, method=method)
    model.fslt_config = config
    model._fslt_modules_seen = module_registrations()
    model.register_forward_pre_hook(_refresh_hook)
    return model


def _place(model: nn.Module, config: FreezeConfig) -> list[Placement]:
    """Every parameter's fate; raises (leaving the model unchanged) if the model cannot be frozen."""
    if is_frozen(model) or any(is_frozen_layer(m) for m in model.modules()):
        raise ValueError("model is already frozen (it has FrozenSupermask layers); "
                         "freeze a freshly built model instead")
    for name, module in model.named_modules():
        if is_maskable(module):
            check_initialized(name, module)
    placements = place_parameters(model, config.include, config.exclude, batchnorm=config.batchnorm,
                                  bias=config.bias, version=config.placement_version)
    targets = [p for p in placements if p.fate == "masked"]
    if not targets:
        raise ValueError("model has no maskable layer or weight (Conv*d, Linear, timm or PyG Linear, or a weight "
                         f"Parameter) matching include={config.include} exclude={config.exclude}")
    for p in targets:
        if isinstance(p.module._parameters[p.param_name], UninitializedParameter):
            raise ValueError(f"parameter {p.name!r} ({type(p.module).__name__}) is lazy and not initialised yet; "
                             "run one forward pass with example inputs before calling timm_fslt.freeze")
        if parametrize.is_parametrized(p.module, p.param_name):
            raise ValueError(f"parameter {p.name!r} already has a parametrization; remove it before freezing")
    return placements


def _regenerate_all(targets: list, shapes: list, counts: list, config: FreezeConfig, keys: dict) -> list:
    """Per site, ``(weight, code, free positions)`` made for the whole model at once by the compiled
    kernels (``regen/native.py``: one hand-off to the thread pool each), or None where they do not
    apply (GPU tensors, layers of 2**32 elements or more) and ``_freeze_site`` makes them itself.
    Generator version 1's weights are drawn layer by layer (``random_weight``); its codes are
    version 2's.  Codes come from a ticket's freeze keys where they give the configuration's counts
    (else by rank, ``pattern.frozen_code``); the same bits either way."""
    made, originals = [None] * len(targets), [site.module._parameters[site.param_name] for site in targets]
    chosen = [i for i, (p, shape) in enumerate(zip(originals, shapes))
              if native.usable(p.device, p.dtype, math.prod(shape)) is not None]
    if not chosen:
        return made
    if config.generator_version == 2:
        weights = init_many(config.weight_init, config.seed,
                            [(targets[i].key, shapes[i], originals[i].dtype) for i in chosen])
    else:
        weights = [random_weight(config.weight_init, config.seed, targets[i].key, shapes[i], "cpu",
                                 originals[i].dtype, generator_version=config.generator_version) for i in chosen]
    with_keys = [i for i in chosen if freezing.valid_keys(keys.get(targets[i].key))]
    from_keys = dict(zip(with_keys, native.codes_from_keys_many(
        [(rng.stream_key(config.seed, targets[i].key, "freeze"), math.prod(shapes[i]), *map(int, keys[targets[i].key]))
         for i in with_keys])))
    codes = []
    for i in chosen:
        code, n_pruned, n_locked = from_keys.get(i, (None, None, None))
        if (n_pruned, n_locked) != tuple(counts[i]):
            code = freezing.frozen_code(config.seed, targets[i].key, shapes[i], *counts[i], "cpu").reshape(-1)
        codes.append(code.view(tuple(shapes[i])))
    for i, weight, code, free in zip(chosen, weights, codes, native.free_positions_many(codes)):
        made[i] = (weight, code, free)
    return made


def _freeze_site(site: Placement, shape: tuple, n_pruned: int, n_locked: int,
                 config: FreezeConfig, draw_scores: bool = True, made: Optional[tuple] = None) -> FrozenSupermask:
    """Give one masked parameter its random weight (a buffer), its frozen code and scores
    (``draw_scores=False``: placeholder scores, for a ticket's bits to set; ``made``: its weight,
    code and free positions, if ``_regenerate_all`` made them)."""
    module, pname, key = site.module, site.param_name, site.key
    original = module._parameters[pname]
    device, dtype = original.device, original.dtype
    version = config.generator_version
    if made is not None:
        weight, code, free = made
    else:
        weight = random_weight(config.weight_init, config.seed, key, shape, device, dtype,
                               generator_version=version)
        code = freezing.frozen_code(config.seed, key, shape, n_pruned, n_locked, device)
        # Scores exist for the free weights only: draw just those (same bits as the full draw).
        # (The free positions are found once: FrozenSupermask keeps them.)
        free = (code.reshape(-1) == freezing.FREE).nonzero().squeeze(1)
    if draw_scores:
        scores = random_weight(config.score_init, config.seed, key, shape, device,
                               torch.float32, stream="score", positions=free, generator_version=version)
    else:
        scores = torch.full((free.numel(),), 0.5, dtype=torch.float32, device=device)  # (a placeholder)
    supermask = FrozenSupermask(key, scores, code, free_positions=free, n_locked=n_locked)  # (frozen_code's counts)
    supermask.module_name, supermask.param_name = site.module_name, pname
    # The random weight becomes a buffer: it is never a trainable parameter.
    del module._parameters[pname]
    module.register_buffer(pname, weight)
    parametrize.register_parametrization(module, pname, supermask, unsafe=True)
    plain_state_dict(module)
    return supermask
