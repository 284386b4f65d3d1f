"""How one layer of a frozen model is cut: torch-pruning's ``customized_pruners``.

torch-pruning looks a layer's pruner up by its exact class and slices
``layer.weight`` into a fresh trainable ``Parameter``.  A frozen layer is a
dynamically created ``Parametrized<Class>`` subclass whose weight is computed from
a random buffer, scores, a frozen code and a mask, so the built-in pruners either
miss it or break it.  ``pruners(model)`` is the ``customized_pruners`` dict for
``tp.DependencyGraph().build_dependency`` and ``tp.pruner.BasePruner``
(``pruner_kwargs(model)`` adds the PyG ``Linear`` root type).  Frozen layers are
cut consistently (random weight, scores, frozen code, mask, bias), every other
module by torch-pruning's own pruner; every cut is recorded in
``model.fslt_structure`` (``timm_fslt.pruning.record``) as indices into the
ORIGINAL layer, which is what regenerates the weights from the seed
(``timm_fslt.pruning.restore.restore_structure``).

After slicing, the masks are re-selected at the next forward: structured pruning
re-bases the ticket's sparsity on the weights that remain.  ``timm_fslt.compact``
instead keeps the budget of the removed weights (``keep_budget=True``), so its
masks do not move.
"""
from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning import ops as tp_ops
from torch_pruning.pruner import function as tp_function

from timm_fslt.frozen import get_group
from timm_fslt.nn.methods import refuse_unsupported
from timm_fslt.nn.modules import has_frozen_weight, is_frozen_layer, is_pyg_linear
from timm_fslt.nn.supermask import free_entries
from timm_fslt.pruning.geometry import channel_attrs, is_depthwise, is_grouped, weight_dims
from timm_fslt.pruning.record import StructureRecorder

__all__ = [
    "FrozenDepthwiseConvPruner", "FrozenLayerPruner", "RecordedCoupledPruner", "RecordedPruner",
    "pruner_kwargs", "pruners", "root_module_types",
]

# Module kinds whose torch-pruning pruner slices tensors; each gets a recording wrapper.
_SLICING_TYPES = (
    tp_ops.OPTYPE.CONV, tp_ops.OPTYPE.DEPTHWISE_CONV, tp_ops.OPTYPE.LINEAR, tp_ops.OPTYPE.BN,
    tp_ops.OPTYPE.LN, tp_ops.OPTYPE.GN, tp_ops.OPTYPE.IN, tp_ops.OPTYPE.PRELU,
    tp_ops.OPTYPE.EMBED, tp_ops.OPTYPE.MHA, tp_ops.OPTYPE.LSTM,
)
_DEFAULT_ROOTS = (tp_ops.TORCH_CONV, tp_ops.TORCH_LINEAR, tp_ops.TORCH_LSTM)


# -- slicing ---------------------------------------------------------------------------------------
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
    # (cut along the flat free order; the result is the (1, n_free) row FrozenSupermask keeps)
    new = nn.Parameter(old.detach().reshape(-1)[kept].reshape(1, -1), requires_grad=old.requires_grad)
    if old.grad is not None:
        new.grad = old.grad.reshape(-1)[kept].reshape(1, -1)
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
        return getattr(layer, channel_attrs(layer)[1])

    def get_in_channels(self, layer: nn.Module) -> int:
        return getattr(layer, channel_attrs(layer)[0])

    def get_in_channel_groups(self, layer: nn.Module) -> int:
        return getattr(layer, "groups", 1)

    def get_out_channel_groups(self, layer: nn.Module) -> int:
        return getattr(layer, "groups", 1)

    # slicing
    def supermask_of(self, layer: nn.Module, name: str):
        if not has_frozen_weight(layer):
            raise ValueError(f"layer {name!r} ({type(layer).__name__}) is not frozen (it has no "
                             "FrozenSupermask); timm_fslt's pruner only cuts frozen layers")
        supermask = layer.parametrizations.weight[0]
        refuse_unsupported(get_group(self.recorder.model), "timm_fslt's torch-pruning pruners")
        if not any(s is supermask for s in get_group(self.recorder.model).layers):
            raise ValueError(
                f"layer {name!r} carries a FrozenSupermask that is not in the model's SupermaskGroup "
                "(was it copied in from another model?); cutting it would break regeneration from "
                "the seed")
        if is_grouped(layer):
            raise ValueError(f"layer {name!r} is a grouped convolution (groups={layer.groups}); "
                             "timm_fslt can cut frozen convs with groups=1 or depthwise convs only")
        return supermask

    def _prune(self, layer: nn.Module, idxs, axis: str) -> None:
        name = self.recorder.name_of(layer)
        supermask = self.supermask_of(layer, name)
        depthwise = is_depthwise(layer)
        if depthwise:
            axis = "out"  # a depthwise conv's input and output channels are the same channels
        size = self.get_out_channels(layer) if axis == "out" else self.get_in_channels(layer)
        keep = _keep_list(size, idxs, f"{axis}put channels of frozen layer {name!r}")
        if len(keep) == size:
            return
        out_dim, in_dim = weight_dims(layer)
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
        in_attr, out_attr = channel_attrs(layer)
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


class RecordedPruner(tp.pruner.BasePruningFunc):
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


class RecordedCoupledPruner(RecordedPruner):
    """For modules with one channel axis (BatchNorm, LayerNorm, ...): in is out."""

    prune_in_channels = RecordedPruner.prune_out_channels


def _is_coupled(base) -> bool:
    cls = type(base)
    return getattr(cls, "prune_in_channels") is getattr(cls, "prune_out_channels")


def _check_frozen_layer(name: str, module: nn.Module, grouped: set) -> None:
    if id(module.parametrizations.weight[0]) not in grouped:
        raise ValueError(f"layer {name!r} carries a FrozenSupermask that is not in the "
                         "model's SupermaskGroup; its cuts could not be regenerated from the seed")
    if is_grouped(module):
        raise ValueError(f"layer {name!r} is a grouped convolution (groups={module.groups}); "
                         "timm_fslt can cut frozen convs with groups=1 or depthwise convs only")


def _add_torch_pruning_base(wrapped: dict, name: str, module: nn.Module) -> None:
    """Note torch-pruning's own pruner for ``module``'s class in ``wrapped``, if it slices tensors."""
    if is_pyg_linear(module):
        base = _PygLinearPruner()
    else:
        optype = tp_ops.module2type(module)
        if optype not in _SLICING_TYPES:
            return
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


def _check_covered(model: nn.Module, result: dict) -> None:
    # torch-pruning would cut any parameter outside these modules along its last dim,
    # and that cut cannot be recorded for regeneration.
    covered = set()
    for module in model.modules():
        if type(module) in result:
            covered.update(id(p) for p in module.parameters())
    loose = [n for n, p in model.named_parameters() if id(p) not in covered]
    masked = [n.split(".parametrizations.")[0] + "." + n.split(".parametrizations.")[1].split(".")[0]
              for n in loose if ".parametrizations." in n]
    if masked:
        raise ValueError(
            f"masked tensors {masked[:6]}{' ...' if len(masked) > 6 else ''} are not conv or linear weights "
            "(recurrent, attention or raw weights); timm_fslt's pruners cut only conv and linear layers, so "
            "this model cannot be pruned structurally")
    if loose:
        raise ValueError(
            f"parameters {loose[:6]}{' ...' if len(loose) > 6 else ''} live outside conv, linear and "
            "norm layers; torch-pruning would cut them without timm_fslt being able to record it, "
            "which would break regeneration of the ticket")


def pruners(model: nn.Module, *, keep_budget: bool = False) -> dict:
    """``customized_pruners`` for torch-pruning on a frozen model.

    Maps every frozen layer's class (parametrize makes one class per layer) to a
    ``FrozenLayerPruner`` and every other prunable module class to a recording
    wrapper of torch-pruning's own pruner, so that all cuts land in
    ``model.fslt_structure``::

        DG = tp.DependencyGraph().build_dependency(
            model, example_inputs, customized_pruners=pruners(model))

    ``keep_budget=True`` (what ``timm_fslt.compact`` uses) counts the removed weights
    in the sparsity budget, so the remaining masks do not move.
    """
    grouped = set(id(s) for s in get_group(model).layers)  # ValueError if the model is not frozen
    recorder = StructureRecorder(model)
    frozen_pruner = FrozenLayerPruner(recorder, keep_budget)
    depthwise_pruner = FrozenDepthwiseConvPruner(recorder, keep_budget)
    result: dict = {}
    wrapped: dict = {}
    for name, module in model.named_modules():
        if has_frozen_weight(module):
            _check_frozen_layer(name, module, grouped)
            # parametrize gives every frozen layer its own class, so this key is per layer
            result[type(module)] = depthwise_pruner if is_depthwise(module) else frozen_pruner
        elif not is_frozen_layer(module):  # (masked tensors outside a conv/linear weight: see _check_covered)
            _add_torch_pruning_base(wrapped, name, module)
    for cls, base in wrapped.items():
        wrapper = RecordedCoupledPruner if _is_coupled(base) else RecordedPruner
        result[cls] = wrapper(base, recorder)
    _check_covered(model, result)
    return result


def _has_pyg_linear(model: nn.Module) -> bool:
    return any(is_pyg_linear(m) for m in model.modules())


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
