"""Structural compaction of a ticket, and the record that regenerates it.

At high sparsity some channels of a ticket carry nothing: a conv whose kept
weights never read an input channel, or whose output channel has no kept weight.
``compact`` removes the channels whose removal provably leaves the network's
eval-mode outputs unchanged, using torch-pruning's dependency graph to cut every
coupled layer (BatchNorm, residual partners, consumers) consistently.

A channel -- one index of a torch-pruning group, i.e. the same channel of every
layer coupled through BatchNorms, element-wise ops and residual additions -- is
removed when, in eval mode, one of these holds:

1. **unread**: every conv/linear that consumes the channel has only zero
   effective weights on it (no kept weight, e.g. all unkept), and the channel
   does not reach the model output.  Whatever the channel holds (a BatchNorm
   constant included) is then multiplied by zero everywhere.
2. **zero** (``zero_channels=True``): the channel is exactly zero everywhere: every
   conv/linear producing it has no kept weight in that output channel and a zero
   (or no) bias, every BatchNorm on it maps 0 to 0 with its running statistics
   and affine values (``(0 - mean) / sqrt(var + eps) * gamma + beta == 0`` exactly;
   true for a channel that was dead through training, whose running mean stays 0,
   and not for one that died late), and every element-wise op on it maps zero to
   zero (ReLU and friends, additions of two zero channels, pooling, reshapes,
   products, PyG's gather/scatter).  Its consumers' weights on it (kept or not)
   are then multiplied by zero.

Groups containing a module whose channels are not independent (LayerNorm,
GroupNorm, attention, RNNs, grouped convs) are left alone, and at least one
channel of every group stays.  Removed channels are repeated until nothing more
is found (removing a channel can make another one dead).  Finally the compacted
model is run on the example inputs and compared to the original; if torch-pruning
treated a channel-mixing op as element-wise and the outputs moved, ``compact``
retries without rule 2 and otherwise raises.

The removed weights stay in the sparsity budget (``FrozenSupermask.removed_numel``
and ``removed_kept``), so the remaining masks and scales are exactly those of the
original ticket.  Every cut is recorded in ``model.fslt_structure`` as indices into
the original layers; ``restore_structure`` re-applies it to a freshly frozen
full-size model, which is how a compacted ticket is regenerated from its seed.
"""
from __future__ import annotations

import copy
import re

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning import ops as tp_ops

from timm_fslt.frozen import get_group
from timm_fslt.nn.methods import refuse_unsupported
from timm_fslt.nn.modules import has_frozen_weight, is_pyg_linear
from timm_fslt.pruning.counting import count_ops_and_params
from timm_fslt.pruning.geometry import is_depthwise, is_grouped, weight_dims
from timm_fslt.pruning.pruners import FrozenLayerPruner, RecordedPruner, pruners, root_module_types
# restore_structure lives in timm_fslt.pruning.restore (it runs the pruners); the ticket loader and
# timm_fslt.restore_structure import it from here.
from timm_fslt.pruning.restore import restore_structure  # noqa: F401

__all__ = ["compact", "restore_structure", "find_dead_channels"]

# Element-wise autograd ops f with f(0) == 0 (matched on the grad_fn name without its digits).
_ZERO_PRESERVING = re.compile(
    r"^(Relu|Threshold|LeakyRelu|Elu|Gelu|Silu|Hardswish|Hardtanh|Tanh|Mish|Neg|Clamp|Clone|"
    r"Add|Sub|Mul|Div|Mean|Sum|AvgPool\dD|AdaptiveAvgPool\dD|MaxPool\dDWithIndices|"
    r"AdaptiveMaxPool\dD|View|Reshape|UnsafeView|Flatten|Permute|Transpose|Squeeze|Unsqueeze|"
    r"Expand|Cat|Index|IndexSelect|Gather|Scatter|ScatterAdd|ScatterReduce|IndexAdd|IndexReduce|"
    r"Stack|Split|SplitWithSizes|Slice|Select|Contiguous|ToCopy|NativeDropout|Dropout)$")
# Additions and subtractions also add operands from outside the graph (constants, inputs).
_NEEDS_GRAPH_OPERANDS = ("Add", "Sub")
_ROUTING_TYPES = (tp_ops.OPTYPE.CONCAT, tp_ops.OPTYPE.SPLIT, tp_ops.OPTYPE.RESHAPE,
                  tp_ops.OPTYPE.SLICE, tp_ops.OPTYPE.UNBIND, tp_ops.OPTYPE.EXPAND)


def _forward(model: nn.Module, example_inputs):
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def _flatten(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _flatten(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _flatten(v)]
    return []


def _grad_fn_name(node) -> str:
    grad_fn = getattr(node, "grad_fn", None)
    name = grad_fn.name() if grad_fn is not None and hasattr(grad_fn, "name") else ""
    return re.sub(r"Backward\d*$", "", name)


def _has_outside_operand(node) -> bool:
    grad_fn = getattr(node, "grad_fn", None)
    return any(f is None for f, _ in getattr(grad_fn, "next_functions", ()))


def _is_weight_path(node) -> bool:
    # The parametrization's own op feeding a frozen layer's weight, not a data path.
    return _grad_fn_name(node) == "_MaskedWeight"


def _channel_slices(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """Per channel along ``dim``: True when every weight of that channel is exactly zero."""
    return (weight.detach().transpose(0, dim).reshape(weight.shape[dim], -1) == 0).all(1).cpu()


def _bn_maps_zero_to_zero(bn: nn.Module) -> torch.Tensor:
    channels = bn.num_features
    if not bn.track_running_stats or bn.running_mean is None:
        return torch.zeros(channels, dtype=torch.bool)
    with torch.no_grad():
        y = nn.functional.batch_norm(
            torch.zeros(1, channels, dtype=bn.running_mean.dtype, device=bn.running_mean.device),
            bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    return (y[0] == 0).cpu()


def _is_weighted(owner, module) -> bool:
    """A conv / linear (frozen or not) cut by one of timm_fslt's pruners."""
    return isinstance(owner, (FrozenLayerPruner, RecordedPruner)) and isinstance(module, nn.Module) \
        and (has_frozen_weight(module) or isinstance(module, (nn.modules.conv._ConvNd, nn.Linear))
             or is_pyg_linear(module))


def _note_weighted(module: nn.Module, producing: bool, idxs: list, roots: list, blocked: dict) -> None:
    """Mark the channels a conv / linear keeps alive: it produces them or reads them."""
    out_dim, in_dim = weight_dims(module)
    weight = module.weight  # W * mask * scale for a frozen layer
    if producing:  # a producer of the channel
        dead_rows = _channel_slices(weight, out_dim)
        bias = getattr(module, "bias", None)
        if bias is not None:
            dead_rows = dead_rows & (bias.detach() == 0).cpu()
        for i, r in zip(idxs, roots):
            blocked["produced"].add(r)
            if not dead_rows[i]:
                blocked["zero"].add(r)
    else:  # a consumer: reads the channel through its input weights
        dead_cols = _channel_slices(weight, in_dim)
        for i, r in zip(idxs, roots):
            if not dead_cols[i]:
                blocked["unread"].add(r)


def _maps_zero_to_zero(node) -> bool:
    """An element-wise op that keeps an all-zero channel zero (see the module docstring)."""
    if _is_weight_path(node):
        return True
    name = _grad_fn_name(node)
    return bool(_ZERO_PRESERVING.match(name)) and not (
        name in _NEEDS_GRAPH_OPERANDS and _has_outside_operand(node))


def _analyse(group, zero_channels: bool, output_grad_fns: set) -> tuple[set, set]:
    """(unread, zero) root channel indices of a full group; empty sets if it is not analysable."""
    root_idxs = list(group[0].root_idxs)
    # channels something reads / keeps non-zero, and channels some conv or linear produces
    blocked = {"unread": set(), "zero": set(), "produced": set()}
    zero_ok = zero_channels
    for item in group:
        dep, idxs, roots = item.dep, list(item.idxs), list(item.root_idxs)
        if any(r is None for r in roots):
            return set(), set()
        node, module, fn = dep.target, dep.target.module, dep.handler
        if node.type == tp_ops.OPTYPE.OUTPUT or (
                node.grad_fn in output_grad_fns and fn.__name__ == "prune_out_channels"):
            blocked["unread"].update(roots)  # the channel is part of the model's output
            blocked["zero"].update(roots)
        elif _is_weighted(getattr(fn, "__self__", None), module):
            if is_depthwise(module) or is_grouped(module):
                return set(), set()
            _note_weighted(module, fn.__name__ == "prune_out_channels", idxs, roots, blocked)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            zero_to_zero = _bn_maps_zero_to_zero(module)
            blocked["zero"].update(r for i, r in zip(idxs, roots) if not zero_to_zero[i])
        elif node.type in _ROUTING_TYPES:
            continue
        elif isinstance(module, tp_ops._ElementWiseOp):
            zero_ok = zero_ok and _maps_zero_to_zero(node)
        else:
            return set(), set()  # a module whose channels are not independent
    unread = {r for r in root_idxs if r not in blocked["unread"]}
    zero = set()
    if zero_ok:
        zero = {r for r in root_idxs if r in blocked["produced"] and r not in blocked["zero"]}
    return unread, zero


def _candidate_groups(DG, roots):
    for group in DG.get_all_groups(root_module_types=roots):
        owner = getattr(group[0].dep.handler, "__self__", None)
        # torch-pruning swaps in its own function for a depthwise root; such groups are skipped
        if isinstance(owner, (FrozenLayerPruner, RecordedPruner)):
            yield group


def find_dead_channels(model: nn.Module, example_inputs, zero_channels: bool = True) -> dict:
    """Dead channels of a frozen model, without changing it: ``{root layer name: {"unread": [...],
    "zero": [...]}}``, indices in the root layer's output channels (see the module docstring)."""
    work = copy.deepcopy(model)
    DG = _dependency_graph(work, example_inputs, keep_budget=True)
    names = {m: n for n, m in work.named_modules()}
    found = {}
    for group in _candidate_groups(DG, root_module_types(work)):
        unread, zero = _analyse(group, zero_channels, DG.fslt_output_grad_fns)
        if unread or zero:
            found[names[group[0].dep.target.module]] = {"unread": sorted(unread),
                                                        "zero": sorted(zero - unread)}
    return found


def _dependency_graph(model: nn.Module, example_inputs, keep_budget: bool):
    outputs = set()

    def remember_outputs(out):
        # torch-pruning adds an output node only for outputs no module produced; the
        # channels of a module whose result is the model's output must stay too.
        outputs.update(t.grad_fn for t in _flatten(out) if t.grad_fn is not None)
        return out

    DG = tp.DependencyGraph().build_dependency(
        model, example_inputs, customized_pruners=pruners(model, keep_budget=keep_budget),
        output_transform=remember_outputs, verbose=False)
    DG.fslt_output_grad_fns = outputs
    return DG


def _compact_once(model: nn.Module, example_inputs, zero_channels: bool, max_rounds: int):
    work = copy.deepcopy(model)
    work.eval()
    DG = _dependency_graph(work, example_inputs, keep_budget=True)
    roots = root_module_types(work)
    counts = {"unread": 0, "zero": 0}
    rounds = 0
    for rounds in range(1, max_rounds + 1):
        plans = []
        for group in _candidate_groups(DG, roots):
            unread, zero = _analyse(group, zero_channels, DG.fslt_output_grad_fns)
            removable = sorted(unread | zero)
            if not removable:
                continue
            if len(removable) >= len(group[0].idxs):  # keep one channel: layers cannot be empty
                removable = removable[1:]
            if removable:
                plans.append((group[0].dep.target.module, group[0].dep.handler, removable,
                              len(unread & set(removable)), len(set(removable) - unread)))
        if not plans:
            rounds -= 1
            break
        # Groups are independent channel spaces, so all plans of a round apply as found.
        for module, fn, removable, n_unread, n_zero in plans:
            DG.get_pruning_group(module, fn, removable).prune(record_history=False)
            counts["unread"] += n_unread
            counts["zero"] += n_zero
    return work, counts, rounds


def _outputs_match(reference: list, outputs: list) -> tuple[bool, float]:
    if len(reference) != len(outputs):
        return False, float("inf")
    worst = 0.0
    ok = True
    for a, b in zip(reference, outputs):
        if a.shape != b.shape:
            return False, float("inf")
        diff = (a.float() - b.float()).abs().max().item() if a.numel() else 0.0
        worst = max(worst, diff)
        # channels whose every contribution is exactly zero: only the summation order may change
        ok &= torch.allclose(b.float(), a.float(), rtol=1e-5, atol=1e-6 * max(1.0, a.abs().max().item()))
    return ok, worst


def _channel_report(before: dict, after: dict) -> dict:
    def sizes(entry):
        return {k: len(v) for k, v in entry["kept"].items()}

    def source(entry):
        if entry.get("frozen"):
            return {k: entry["source_shape"][int(k)] for k in entry["kept"]}
        return dict(entry["source_channels"])

    out = {}
    for name, entry in after.items():
        now = sizes(entry)
        old_entry = before.get(name)
        then = {**source(entry), **(sizes(old_entry) if old_entry else {})}
        removed = {k: then[k] - now[k] for k in now if then.get(k, now[k]) != now[k]}
        if removed:
            out[name] = removed
    return out


def _reference_outputs(model: nn.Module, example_inputs) -> list[torch.Tensor]:
    """The model's eval-mode outputs on ``example_inputs``, which the compacted copy must match."""
    was_training = model.training
    model.eval()
    if not isinstance(example_inputs, (torch.Tensor, tuple, list, dict)):
        raise TypeError("example_inputs must be a tensor, a tuple of positional inputs or a dict of "
                        f"keyword inputs, got {type(example_inputs).__name__}")
    try:
        with torch.no_grad():
            reference = [t.detach().clone() for t in _flatten(_forward(model, example_inputs))]
    except Exception as err:  # the user's inputs, not compaction, are at fault here
        raise ValueError(f"example_inputs do not run through the model: {type(err).__name__}: "
                         f"{str(err).splitlines()[0]}") from err
    finally:
        model.train(was_training)
    if not reference:
        raise ValueError("example_inputs must make the model return tensors (to verify compaction)")
    return reference


def _compact_verified(model: nn.Module, example_inputs, reference: list, zero_channels: bool,
                      max_rounds: int):
    """(compacted copy, counts, rounds, zero rule used, worst difference): the first attempt whose
    outputs match ``reference``, with rule 2 and then without it."""
    attempts = [zero_channels, False] if zero_channels else [False]
    for use_zero in attempts:
        work, counts, rounds = _compact_once(model, example_inputs, use_zero, max_rounds)
        work_group = get_group(work)
        masks = [layer.mask.clone() for layer in work_group.layers]
        work_group.refresh(force=True)
        if any(not torch.equal(m, layer.mask) for m, layer in zip(masks, work_group.layers)):
            raise RuntimeError("internal error: compaction moved the remaining masks")
        with torch.no_grad():
            outputs = _flatten(_forward(work, example_inputs))
        ok, worst = _outputs_match(reference, outputs)
        if ok:
            return work, counts, rounds, use_zero, worst
    raise RuntimeError(
        "compact could not remove dead channels without changing the model's outputs: torch-pruning "
        "treats some channel-mixing operation of this model as element-wise. The model is unchanged")


def compact(model: nn.Module, example_inputs, *, zero_channels: bool = True,
            max_rounds: int = 20) -> tuple[nn.Module, dict]:
    """Remove the dead channels of a frozen model; returns ``(compacted_copy, report)``.

    ``model`` is left untouched; the compacted model is a new, smaller frozen model
    whose eval-mode outputs equal the original's (checked on ``example_inputs``: a
    tensor, a tuple of positional inputs such as ``(x, edge_index)``, or a dict of
    keyword inputs).  Its masks are exactly the original ticket's, its cuts are in
    ``compacted.fslt_structure``.  The report holds MACs and parameters before and
    after (torch-pruning's counter with frozen-layer hooks), the weights and kept
    weights of the masked layers, the channels removed per module and by rule
    (``unread``, ``zero``), and the largest output difference seen.
    """
    group = get_group(model)  # ValueError if the model is not frozen
    refuse_unsupported(group, "timm_fslt.compact")
    if not isinstance(max_rounds, int) or isinstance(max_rounds, bool) or max_rounds < 1:
        raise ValueError(f"max_rounds must be a positive int, got {max_rounds!r}")
    group.refresh()
    was_training = model.training
    reference = _reference_outputs(model, example_inputs)
    work, counts, rounds, use_zero, worst = _compact_verified(model, example_inputs, reference,
                                                              zero_channels, max_rounds)
    work.train(was_training)

    macs_before, params_before = count_ops_and_params(model, example_inputs)
    macs_after, params_after = count_ops_and_params(work, example_inputs)
    layers_before, layers_after = group.layers, get_group(work).layers
    return work, {
        "macs_before": int(macs_before), "macs_after": int(macs_after),
        "params_before": int(params_before), "params_after": int(params_after),
        "weights_before": sum(layer.numel for layer in layers_before),
        "weights_after": sum(layer.numel for layer in layers_after),
        "kept_before": sum(int(layer.mask.sum()) for layer in layers_before),
        "kept_after": sum(int(layer.mask.sum()) for layer in layers_after),
        "channels_removed": counts["unread"] + counts["zero"],
        "unread_channels": counts["unread"], "zero_channels": counts["zero"],
        "rounds": rounds, "zero_rule_used": use_zero,
        "removed": _channel_report(getattr(model, "fslt_structure", None) or {},
                                   getattr(work, "fslt_structure", None) or {}),
        "max_abs_diff": worst,
    }
