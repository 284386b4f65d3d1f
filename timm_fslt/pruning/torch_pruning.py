"""Frozen networks inside torch-pruning's DepGraph ecosystem.

torch-pruning looks a layer's pruner up by its exact class and slices
``layer.weight`` into a fresh trainable ``Parameter``.  A frozen layer is a
dynamically created ``Parametrized<Class>`` subclass whose weight is computed from
a random buffer, scores, a frozen code and a mask, so the built-in pruners either
miss it or break it.  This module supplies the three roles torch-pruning keeps
apart, for frozen models:

* how a layer is cut: ``pruners(model)`` is the ``customized_pruners`` dict for
  ``tp.DependencyGraph().build_dependency`` and ``tp.pruner.BasePruner``
  (``pruner_kwargs(model)`` adds the PyG ``Linear`` root type).  Frozen layers are
  cut consistently (random weight, scores, frozen code, mask, bias), every other
  module by torch-pruning's own pruner; every cut is recorded in
  ``model.fslt_structure`` as indices into the ORIGINAL layer, which is what
  regenerates the weights from the seed (``timm_fslt.pruning.compact.restore_structure``).
* how much a channel matters: ``SupermaskImportance`` ranks channels by the
  learned supermask.
* what a network costs: ``count_ops_and_params`` is torch-pruning's counter with
  hooks for frozen layers and PyG ``Linear`` (torch-pruning matches hooks by exact
  type and forgets custom hooks after every call).

After slicing, the masks are re-selected at the next forward: structured pruning
re-bases the ticket's sparsity on the weights that remain.  ``timm_fslt.compact``
instead keeps the budget of the removed weights, so its masks do not move.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.utils import parametrize
from torch_pruning import ops as tp_ops
from torch_pruning.pruner import function as tp_function
from torch_pruning.utils import op_counter as tp_op_counter

from timm_fslt.frozen import get_group
from timm_fslt.nn.modules import _is_pyg_linear, is_frozen_layer
from timm_fslt.nn.supermask import FrozenSupermask, free_entries

__all__ = [
    "FrozenLayerPruner", "FrozenDepthwiseConvPruner", "SupermaskImportance", "StructureRecorder",
    "count_ops_and_params", "op_counting_hooks", "plain_class", "pruner_kwargs", "pruners",
    "root_module_types", "torch_pruning_kwargs",
]

# Module kinds whose torch-pruning pruner slices tensors; each gets a recording wrapper.
_SLICING_TYPES = (
    tp_ops.OPTYPE.CONV, tp_ops.OPTYPE.DEPTHWISE_CONV, tp_ops.OPTYPE.LINEAR, tp_ops.OPTYPE.BN,
    tp_ops.OPTYPE.LN, tp_ops.OPTYPE.GN, tp_ops.OPTYPE.IN, tp_ops.OPTYPE.PRELU,
    tp_ops.OPTYPE.EMBED, tp_ops.OPTYPE.MHA, tp_ops.OPTYPE.LSTM,
)
_DEFAULT_ROOTS = (tp_ops.TORCH_CONV, tp_ops.TORCH_LINEAR, tp_ops.TORCH_LSTM)


# -- layer geometry ---------------------------------------------------------------------------
def plain_class(module: nn.Module) -> type:
    """The class a parametrized layer had before freezing (``Conv2d`` for ``ParametrizedConv2d``)."""
    cls = type(module)
    if parametrize.is_parametrized(module):
        return cls.__bases__[0]
    return cls


def _is_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd)


def _channel_attrs(module: nn.Module) -> tuple[str, str]:
    """Names of the (in, out) channel attributes of a conv / torch Linear / PyG Linear."""
    if isinstance(module, nn.Linear):
        return "in_features", "out_features"
    return "in_channels", "out_channels"


def _weight_dims(module: nn.Module) -> tuple[int, int]:
    """Weight dims holding the (out, in) channels: transposed convs store (in, out, ...)."""
    if _is_conv(module) and module.transposed:
        return 1, 0
    return 0, 1


def _is_depthwise(module: nn.Module) -> bool:
    return (_is_conv(module) and module.groups > 1
            and module.groups == module.in_channels == module.out_channels)


def _is_grouped(module: nn.Module) -> bool:
    return _is_conv(module) and module.groups > 1 and not _is_depthwise(module)


def _select(owner: nn.Module, name: str, dim: int, keep: torch.Tensor) -> None:
    """Keep ``keep`` along ``dim`` of a parameter or buffer, preserving its kind and grad flag."""
    if name in owner._parameters:
        old = owner._parameters[name]
        new = nn.Parameter(old.detach().index_select(dim, keep.to(old.device)).contiguous(),
                           requires_grad=old.requires_grad)
        if old.grad is not None:
            new.grad = old.grad.index_select(dim, keep.to(old.device)).contiguous()
        owner._parameters[name] = new
    else:
        old = owner._buffers[name]
        owner._buffers[name] = old.index_select(dim, keep.to(old.device)).contiguous()


def _select_free_scores(supermask, dim: int, keep: torch.Tensor) -> None:
    """Cut a supermask's scores (one per free weight, row-major) like its weight along ``dim``.

    Slicing keeps the row-major order of the remaining positions, so the surviving
    free weights' scores stay in the order the cut frozen code's free index expects.
    """
    frozen = supermask.frozen
    channel = torch.zeros(frozen.shape[dim], dtype=torch.bool, device=frozen.device)
    channel[keep.to(frozen.device)] = True
    view = [1] * frozen.dim()
    view[dim] = -1
    kept = free_entries(channel.view(view).expand(frozen.shape), frozen)  # over the free weights
    old = supermask._parameters["scores"]
    kept = kept.to(old.device)
    new = nn.Parameter(old.detach()[kept].contiguous(), requires_grad=old.requires_grad)
    if old.grad is not None:
        new.grad = old.grad[kept].contiguous()
    supermask._parameters["scores"] = new


def _keep_list(size: int, idxs, what: str) -> list[int]:
    removed = sorted({int(i) for i in idxs})
    bad = [i for i in removed if not 0 <= i < size]
    if bad:
        raise ValueError(f"{what}: channel indices must lie in [0, {size}), got {bad[:8]}")
    if len(removed) >= size:
        raise ValueError(f"{what}: cannot remove all {size} channels")
    gone = set(removed)
    return [i for i in range(size) if i not in gone]


# -- structure record ------------------------------------------------------------------------
class StructureRecorder:
    """Keeps ``model.fslt_structure`` current while modules of ``model`` are sliced.

    ``model.fslt_structure`` maps a module's qualified name to a JSON-ready entry:

    * frozen layer: ``{"type": "Conv2d", "frozen": true, "source_shape": [...],
      "kept": {"<weight dim>": [original indices]}, "removed_numel": n, "removed_kept": k}``
      -- every remaining weight sits at these coordinates of the original layer,
      which is where the seed regenerates it; the two counters are the sparsity
      budget kept by ``timm_fslt.compact``.
    * any other sliced module (BatchNorm, an unfrozen conv, ...):
      ``{"type": "BatchNorm2d", "frozen": false, "source_channels": {"out": n},
      "kept": {"out": [...]}}``, with axis "out"/"in" as torch-pruning's
      ``prune_out_channels``/``prune_in_channels`` see it (one axis "out" for
      modules whose two are the same, like BatchNorm).

    Absent or empty means full size.  Indices compose over repeated pruning.
    """

    def __init__(self, model: nn.Module):
        self._model = weakref.ref(model)

    @property
    def model(self) -> nn.Module:
        model = self._model()
        if model is None:
            raise RuntimeError("the model these pruners were built for no longer exists")
        return model

    def name_of(self, module: nn.Module) -> str:
        for name, candidate in self.model.named_modules():
            if candidate is module:
                return name
        raise ValueError(
            f"{type(module).__name__} is not a module of the model these pruners were built for "
            "(timm_fslt.pruning.torch_pruning.pruners(model)); its cut could not be recorded, "
            "so the ticket could not be regenerated")

    def structure(self) -> dict:
        model = self.model
        structure = getattr(model, "fslt_structure", None)
        if structure is None:
            structure = {}
            model.fslt_structure = structure
        return structure

    @staticmethod
    def _compose(kept: dict, key: str, size: int, keep: list[int]) -> None:
        previous = kept.get(key)
        if previous is None:
            previous = list(range(size))
        kept[key] = [previous[i] for i in keep]

    def record_frozen(self, module: nn.Module, name: str, dim: int, keep: list[int]) -> None:
        supermask = module.parametrizations.weight[0]
        entry = self.structure().setdefault(name, {
            "type": plain_class(module).__name__, "frozen": True,
            "source_shape": list(supermask.frozen.shape), "kept": {},
            "removed_numel": 0, "removed_kept": 0})
        self._compose(entry["kept"], str(dim), supermask.frozen.shape[dim], keep)

    def record_budget(self, name: str, supermask) -> None:
        entry = self.structure()[name]
        entry["removed_numel"] = int(supermask.removed_numel)
        entry["removed_kept"] = int(supermask.removed_kept)

    def record_channels(self, module: nn.Module, name: str, axis: str, keep: list[int],
                        size: int) -> None:
        entry = self.structure().setdefault(name, {
            "type": type(module).__name__, "frozen": False, "source_channels": {}, "kept": {}})
        entry["source_channels"].setdefault(axis, size)
        self._compose(entry["kept"], axis, size, keep)


# -- pruners -------------------------------------------------------------------------------------
class FrozenLayerPruner(tp.pruner.BasePruningFunc):
    """Cuts channels of a frozen conv / Linear / PyG Linear and records the cut.

    Slices, along the channel's weight dim, the random weight
    (``parametrizations.weight.original``, a buffer), the scores (a Parameter,
    keeping ``requires_grad`` and ``.grad``), the frozen code and the mask; the bias
    too for output channels.  ``keep_budget`` (used by ``timm_fslt.compact``)
    counts the removed weights in the sparsity budget so the masks do not move;
    otherwise the masks are re-selected over the remaining weights.
    """

    TARGET_MODULES = None

    def __init__(self, recorder: StructureRecorder, keep_budget: bool = False):
        super().__init__()
        self.recorder = recorder
        self.keep_budget = keep_budget

    # torch-pruning API
    def prune_out_channels(self, layer: nn.Module, idxs) -> nn.Module:
        self._prune(layer, idxs, "out")
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs) -> nn.Module:
        self._prune(layer, idxs, "in")
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return getattr(layer, _channel_attrs(layer)[1])

    def get_in_channels(self, layer: nn.Module) -> int:
        return getattr(layer, _channel_attrs(layer)[0])

    def get_in_channel_groups(self, layer: nn.Module) -> int:
        return getattr(layer, "groups", 1)

    def get_out_channel_groups(self, layer: nn.Module) -> int:
        return getattr(layer, "groups", 1)

    # slicing
    def supermask_of(self, layer: nn.Module, name: str):
        if not is_frozen_layer(layer):
            raise ValueError(f"layer {name!r} ({type(layer).__name__}) is not frozen (it has no "
                             "FrozenSupermask); timm_fslt's pruner only cuts frozen layers")
        supermask = layer.parametrizations.weight[0]
        if not any(s is supermask for s in get_group(self.recorder.model).layers):
            raise ValueError(
                f"layer {name!r} carries a FrozenSupermask that is not in the model's SupermaskGroup "
                "(was it copied in from another model?); cutting it would break regeneration from "
                "the seed")
        if _is_grouped(layer):
            raise ValueError(f"layer {name!r} is a grouped convolution (groups={layer.groups}); "
                             "timm_fslt can cut frozen convs with groups=1 or depthwise convs only")
        return supermask

    def _prune(self, layer: nn.Module, idxs, axis: str) -> None:
        name = self.recorder.name_of(layer)
        supermask = self.supermask_of(layer, name)
        depthwise = _is_depthwise(layer)
        if depthwise:
            axis = "out"  # a depthwise conv's input and output channels are the same channels
        size = self.get_out_channels(layer) if axis == "out" else self.get_in_channels(layer)
        keep = _keep_list(size, idxs, f"{axis}put channels of frozen layer {name!r}")
        if len(keep) == size:
            return
        out_dim, in_dim = _weight_dims(layer)
        dim = out_dim if axis == "out" else in_dim
        self.recorder.record_frozen(layer, name, dim, keep)

        numel_before, kept_before = supermask.frozen.numel(), int(supermask.mask.sum())
        keep_t = torch.tensor(keep, dtype=torch.long)
        _select_free_scores(supermask, dim, keep_t)  # (reads the frozen code: before it is cut)
        _select(layer.parametrizations.weight, "original", dim, keep_t)
        for tensor_name in ("frozen", "mask"):
            _select(supermask, tensor_name, dim, keep_t)
        if axis == "out" and getattr(layer, "bias", None) is not None:
            _select(layer, "bias", 0, keep_t)
        in_attr, out_attr = _channel_attrs(layer)
        if depthwise:
            layer.in_channels = layer.out_channels = layer.groups = len(keep)
        else:
            setattr(layer, out_attr if axis == "out" else in_attr, len(keep))
        if self.keep_budget:
            supermask.removed_numel += numel_before - supermask.frozen.numel()
            supermask.removed_kept += kept_before - int(supermask.mask.sum())
        self.recorder.record_budget(name, supermask)
        supermask.invalidate()  # the group re-selects the masks at the next forward


class FrozenDepthwiseConvPruner(FrozenLayerPruner):
    """Depthwise convs: pruning the input channels is pruning the output channels."""

    prune_in_channels = FrozenLayerPruner.prune_out_channels  # intra-layer dependency for DepGraph


class _PygLinearPruner(tp.pruner.BasePruningFunc):
    """torch-pruning has no pruner for PyG's ``Linear`` (not an ``nn.Linear``); weight is (out, in)."""

    TARGET_MODULES = None

    def prune_out_channels(self, layer, idxs):
        keep = torch.tensor(_keep_list(layer.out_channels, idxs, "PyG Linear output"))
        _select(layer, "weight", 0, keep)
        if layer.bias is not None:
            _select(layer, "bias", 0, keep)
        layer.out_channels = len(keep)
        return layer

    def prune_in_channels(self, layer, idxs):
        keep = torch.tensor(_keep_list(layer.in_channels, idxs, "PyG Linear input"))
        _select(layer, "weight", 1, keep)
        layer.in_channels = len(keep)
        return layer

    def get_out_channels(self, layer):
        return layer.out_channels

    def get_in_channels(self, layer):
        return layer.in_channels


class _RecordedPruner(tp.pruner.BasePruningFunc):
    """torch-pruning's own pruner for an ordinary module, recording what it removes.

    Also puts back the ``requires_grad`` flags torch-pruning resets (it rebuilds
    every sliced tensor as a trainable Parameter; a frozen model's BatchNorm
    affine parameters must stay frozen).
    """

    TARGET_MODULES = None

    def __init__(self, base: tp.pruner.BasePruningFunc, recorder: StructureRecorder):
        super().__init__()
        self.base = base
        self.recorder = recorder

    def _run(self, axis: str, layer, idxs):
        self.base.pruning_dim = self.pruning_dim
        fn = self.base.prune_out_channels if axis == "out" else self.base.prune_in_channels
        size = self.get_out_channels(layer) if axis == "out" else self.get_in_channels(layer)
        idxs = list(idxs)
        if size is None or not idxs:
            return fn(layer, idxs)
        name = self.recorder.name_of(layer)
        keep = _keep_list(size, idxs, f"{axis}put channels of {name!r}")
        flags = {n: p.requires_grad for n, p in layer.named_parameters()}
        result = fn(layer, idxs)
        for n, p in layer.named_parameters():
            if n in flags:
                p.requires_grad_(flags[n])
        self.recorder.record_channels(layer, name, axis, keep, size)
        return result

    def prune_out_channels(self, layer, idxs):
        return self._run("out", layer, idxs)

    def prune_in_channels(self, layer, idxs):
        return self._run("in", layer, idxs)

    def get_out_channels(self, layer):
        self.base.pruning_dim = self.pruning_dim
        return self.base.get_out_channels(layer)

    def get_in_channels(self, layer):
        self.base.pruning_dim = self.pruning_dim
        return self.base.get_in_channels(layer)

    def get_in_channel_groups(self, layer):
        return self.base.get_in_channel_groups(layer)

    def get_out_channel_groups(self, layer):
        return self.base.get_out_channel_groups(layer)


class _RecordedCoupledPruner(_RecordedPruner):
    """For modules with one channel axis (BatchNorm, LayerNorm, ...): in is out."""

    prune_in_channels = _RecordedPruner.prune_out_channels


def _is_coupled(base) -> bool:
    cls = type(base)
    return getattr(cls, "prune_in_channels") is getattr(cls, "prune_out_channels")


def _build_pruners(model: nn.Module, keep_budget: bool) -> dict:
    group = get_group(model)  # ValueError if the model is not frozen
    grouped = set(id(s) for s in group.layers)
    recorder = StructureRecorder(model)
    frozen_pruner = FrozenLayerPruner(recorder, keep_budget)
    depthwise_pruner = FrozenDepthwiseConvPruner(recorder, keep_budget)
    result: dict = {}
    wrapped: dict = {}
    for name, module in model.named_modules():
        if is_frozen_layer(module):
            supermask = module.parametrizations.weight[0]
            if id(supermask) not in grouped:
                raise ValueError(f"layer {name!r} carries a FrozenSupermask that is not in the "
                                 "model's SupermaskGroup; its cuts could not be regenerated from the seed")
            if _is_grouped(module):
                raise ValueError(f"layer {name!r} is a grouped convolution (groups={module.groups}); "
                                 "timm_fslt can cut frozen convs with groups=1 or depthwise convs only")
            # parametrize gives every frozen layer its own class, so this key is per layer
            result[type(module)] = depthwise_pruner if _is_depthwise(module) else frozen_pruner
            continue
        if _is_pyg_linear(module):
            base = _PygLinearPruner()
        else:
            optype = tp_ops.module2type(module)
            if optype not in _SLICING_TYPES:
                continue
            base = tp_function.PrunerBox[optype]
        cls = type(module)
        previous = wrapped.get(cls)
        if previous is not None and previous is not base:
            raise ValueError(
                f"module {name!r} ({cls.__name__}) needs torch-pruning's {type(base).__name__} while "
                f"another {cls.__name__} needs {type(previous).__name__} (e.g. an unfrozen depthwise "
                "conv beside ordinary convs); torch-pruning picks pruners per class, so timm_fslt "
                "cannot record both. Freeze these layers too")
        wrapped[cls] = base
    for cls, base in wrapped.items():
        wrapper = _RecordedCoupledPruner if _is_coupled(base) else _RecordedPruner
        result[cls] = wrapper(base, recorder)

    # torch-pruning would cut any parameter outside these modules along its last dim,
    # and that cut cannot be recorded for regeneration.
    covered = set()
    for module in model.modules():
        if type(module) in result:
            covered.update(id(p) for p in module.parameters())
    loose = [n for n, p in model.named_parameters() if id(p) not in covered]
    if loose:
        raise ValueError(
            f"parameters {loose[:6]}{' ...' if len(loose) > 6 else ''} live outside conv, linear and "
            "norm layers; torch-pruning would cut them without timm_fslt being able to record it, "
            "which would break regeneration of the ticket")
    return result


def pruners(model: nn.Module) -> dict:
    """``customized_pruners`` for torch-pruning on a frozen model.

    Maps every frozen layer's class (parametrize makes one class per layer) to a
    ``FrozenLayerPruner`` and every other prunable module class to a recording
    wrapper of torch-pruning's own pruner, so that all cuts land in
    ``model.fslt_structure``::

        DG = tp.DependencyGraph().build_dependency(
            model, example_inputs, customized_pruners=pruners(model))
    """
    return _build_pruners(model, keep_budget=False)


def _has_pyg_linear(model: nn.Module) -> bool:
    return any(_is_pyg_linear(m) for m in model.modules())


def root_module_types(model: nn.Module) -> list:
    """torch-pruning's default root types plus PyG's ``Linear`` when the model has one."""
    roots = list(_DEFAULT_ROOTS)
    if _has_pyg_linear(model):
        from torch_geometric.nn.dense.linear import Linear as PygLinear
        roots.append(PygLinear)
    return roots


def pruner_kwargs(model: nn.Module) -> dict:
    """Keyword arguments for ``tp.pruner.BasePruner`` (MetaPruner) on a frozen model::

        pruner = tp.pruner.BasePruner(model, example_inputs, importance=SupermaskImportance(),
                                      pruning_ratio=0.25, **pruner_kwargs(model))
    """
    return {"customized_pruners": pruners(model), "root_module_types": root_module_types(model)}


torch_pruning_kwargs = pruner_kwargs  # exported as timm_fslt.torch_pruning_kwargs


# -- importance ----------------------------------------------------------------------------------
class SupermaskImportance(tp.importance.Importance):
    """Ranks channels by the learned supermask of the frozen layers in a group.

    criterion:
      ``"kept"``      number of kept weights (locked or selected) per channel;
      ``"magnitude"`` L1 norm of the effective weights ``W * mask * scale``;
      ``"score"``     score mass ``sum |s|`` over the channel's free weights -- the
                      search's preference, independent of where the threshold falls.
    A channel's importance sums its output slice in producing layers and its input
    slice in consuming layers.  Groups without a frozen layer return ``None``
    (torch-pruning then leaves them alone).  ``normalizer``: None | "mean" | "max" | "sum".
    """

    CRITERIA = ("kept", "magnitude", "score")
    NORMALIZERS = (None, "mean", "max", "sum")

    def __init__(self, criterion: str = "kept", normalizer: Optional[str] = None):
        if criterion not in self.CRITERIA:
            raise ValueError(f"criterion must be one of {list(self.CRITERIA)}, got {criterion!r}")
        if normalizer not in self.NORMALIZERS:
            raise ValueError(f"normalizer must be one of {list(self.NORMALIZERS)}, got {normalizer!r}")
        self.criterion = criterion
        self.normalizer = normalizer

    def _values(self, layer: nn.Module, supermask) -> torch.Tensor:
        if self.criterion == "kept":
            return supermask.mask.float()
        if self.criterion == "magnitude":
            return layer.weight.detach().abs().float()  # W * mask * scale
        return supermask.scores_like_weight(0.0).abs_().float()  # 0 at pruned and locked weights

    @torch.no_grad()
    def __call__(self, group) -> Optional[torch.Tensor]:
        root_idxs = list(group[0].root_idxs)
        size = max(root_idxs) + 1 if root_idxs else 0
        total = None
        for item in group:
            dep, idxs = item.dep, item.idxs
            layer, fn = dep.layer, dep.pruning_fn
            pruner = getattr(fn, "__self__", None)
            if not isinstance(pruner, FrozenLayerPruner) or not is_frozen_layer(layer):
                continue
            if any(r is None for r in item.root_idxs):
                continue
            supermask = layer.parametrizations.weight[0]
            supermask.group.refresh()
            out_dim, in_dim = _weight_dims(layer)
            is_out = fn.__func__ is FrozenLayerPruner.prune_out_channels or _is_depthwise(layer)
            dim = out_dim if is_out else in_dim
            values = self._values(layer, supermask)
            per_channel = values.transpose(0, dim).reshape(values.shape[dim], -1).sum(1)
            local = per_channel[torch.as_tensor(idxs, dtype=torch.long, device=per_channel.device)]
            if total is None:
                total = torch.zeros(size, dtype=torch.float32, device=local.device)
            total.scatter_add_(0, torch.as_tensor(item.root_idxs, dtype=torch.long,
                                                  device=local.device), local)
        if total is None:
            return None
        total = total[torch.as_tensor(root_idxs, dtype=torch.long, device=total.device)]
        if self.normalizer == "mean":
            total = total / total.mean().clamp_min(1e-12)
        elif self.normalizer == "max":
            total = total / total.max().clamp_min(1e-12)
        elif self.normalizer == "sum":
            total = total / total.sum().clamp_min(1e-12)
        return total


# -- operation counting --------------------------------------------------------------------------
def op_counting_hooks(model: nn.Module) -> dict:
    """torch-pruning counting hooks for the frozen layers and PyG Linears of ``model``, by exact type."""
    hooks = {}
    for module in model.modules():
        if is_frozen_layer(module) or _is_pyg_linear(module):
            hooks[type(module)] = (tp_op_counter.conv_flops_counter_hook if _is_conv(module)
                                   else tp_op_counter.linear_flops_counter_hook)
    return hooks


def count_ops_and_params(model: nn.Module, example_inputs, layer_wise: bool = False):
    """``tp.utils.count_ops_and_params`` that also counts frozen layers (and PyG Linears).

    MACs and parameters of a frozen layer are those of the same dense plain layer
    (what ``timm_fslt.materialize`` gives; the mask is not exploited): its weight
    counts, not its scores, which exist for the free weights only.
    torch-pruning forgets custom hooks after every call, so they are set per call.
    """
    tp_op_counter.CUSTOM_MODULES_MAPPING = {**tp_op_counter.CUSTOM_MODULES_MAPPING,
                                            **op_counting_hooks(model)}
    result = tp_op_counter.count_ops_and_params(model, example_inputs, layer_wise=layer_wise)

    def unscored(module: nn.Module) -> int:  # weights of frozen layers in module without a score
        return sum(m.frozen.numel() - m.scores.numel() for m in module.modules()
                   if isinstance(m, FrozenSupermask))

    if not layer_wise:
        macs, params = result
        return macs, params + unscored(model)
    macs, params, layer_macs, layer_params = result
    layer_params = {m: (None if n is None else n + unscored(m)) for m, n in layer_params.items()}
    return macs, params + unscored(model), layer_macs, layer_params
