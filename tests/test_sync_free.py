"""A search step that never reads a value back from the device (issue #19), checked on the CPU.

The sync-free refresh (``SupermaskGroup.sync_free``, the default on GPUs) must give the masks,
scales and gradients of the synchronous CPU path bit for bit, and a whole step -- forward,
backward, optimizer step, the next refresh -- must run no operation that makes the host wait for
the device.  A ``TorchDispatchMode`` sees every ATen operation of the step and counts those.
Also here: the caches a compiled model reads follow ``.to()``-style moves, and the backward's
cached free weights give the same gradients as gathering them.
"""
import copy
import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import timm_fslt
from timm_fslt.nn.sync_free import scale_values
from timm_fslt.regen.topk import NAN_KEY_32, segment_sums, segments_topk_mask

from helpers import assert_trains_alike, masks, trainable
from regen_reference import reference_topk_mask

# Operations whose result the host must read (on a GPU: a stall until the stream catches up).
SYNCING = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique",
           "aten._unique2", "aten.unique_consecutive", "aten.bincount", "aten.histc", "aten.equal",
           "aten.is_nonzero", "aten.allclose", "aten.repeat_interleave"}


class Ops(TorchDispatchMode):
    """Every ATen operation run inside it, by name; boolean-mask indexing counted as syncing."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket._qualified_op_name.replace("::", ".")
        if name in ("aten.repeat_interleave",) and kwargs.get("output_size") is not None:
            name += "(sized)"  # the output size given: nothing to read back
        if name in ("aten.index", "aten.index_put", "aten.index_put_"):
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(t is not None and t.dtype == torch.bool for t in indices):
                name += "(bool)"
                self.names.append("aten.masked_select")  # what a boolean index costs: a nonzero
        self.names.append(name)
        return func(*args, **kwargs)

    def syncing(self):
        return [name for name in self.names if name in SYNCING]


def small_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, groups=2),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 10))


def step(model, opt, x, y):
    F.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad()


CONFIGS = [(scope, scale) for scope in ("global", "layerwise") for scale in (None, "static", "dynamic")]


# -- the selection ------------------------------------------------------------------------------
def _keys(rng, kind, n):
    if kind == "wide":
        return torch.randint(0, 2 ** 31 - 1, (n,), generator=rng, dtype=torch.int64).to(torch.int32)
    if kind == "ties":  # few distinct values: long runs of ties at every threshold
        return torch.randint(0, 3, (n,), generator=rng).to(torch.int32) * (1 << 20)
    if kind == "close":  # values differing in the last digit only
        return torch.randint(1000, 1010, (n,), generator=rng).to(torch.int32)
    choices = torch.tensor([0, 5, 0x3F800000, 0x7F800000, NAN_KEY_32], dtype=torch.int32)  # +inf, NaN
    return choices[torch.randint(0, 5, (n,), generator=rng)]


@pytest.mark.parametrize("kind", ["wide", "ties", "close", "nonfinite"])
def test_segmented_radix_select_equals_a_stable_sort_per_segment(kind):
    rng, pick = torch.Generator().manual_seed(1), random.Random(2)
    for _ in range(40):
        sizes = [pick.choice([0, 1, 2, 9, 300, 4000]) for _ in range(pick.randint(1, 5))]
        if not sum(sizes):
            continue
        parts = [_keys(rng, kind, m) for m in sizes]
        ks = [pick.randint(0, m) for m in sizes]
        mask, nonfinite = segments_topk_mask(torch.cat(parts), sizes, ks)
        # (the keys are ordered like the values they stand for: a stable sort of them is the reference)
        assert torch.equal(mask, torch.cat([reference_topk_mask(p, k) for p, k in zip(parts, ks)])), (sizes, ks)
        assert nonfinite.tolist() == [int((p >= 0x7F800000).sum()) for p in parts]
        assert segment_sums(mask, sizes).tolist() == ks


def test_segmented_select_refuses_bad_arguments():
    keys = torch.arange(10, dtype=torch.int32)
    with pytest.raises(ValueError, match="int32"):
        segments_topk_mask(keys.long(), [10], [3])
    with pytest.raises(ValueError, match="sizes must sum"):
        segments_topk_mask(keys, [4, 5], [1, 1])
    with pytest.raises(ValueError, match="k lie in"):
        segments_topk_mask(keys, [4, 6], [5, 1])


def test_scale_table_is_the_python_float_computation():
    for base, n_free, total in [(0, 20000, 30000), (17, 3000, 10001), (0, 4, 7), (999, 0, 1000), (0, 3, 0)]:
        table = torch.from_numpy(scale_values(base, n_free, total))
        expected = torch.empty(n_free + 1)
        for c in range(n_free + 1):  # what the synchronous path does for one count
            expected[c].fill_(1.0 / math.sqrt(max((base + c) / max(total, 1), 1e-12)))
        assert torch.equal(table, expected), (base, n_free, total)


# -- the whole step ------------------------------------------------------------------------------
@pytest.mark.parametrize("scope,scale", CONFIGS)
def test_sync_free_refresh_gives_the_same_masks_scales_and_gradients(scope, scale):
    torch.set_num_threads(1)
    base = timm_fslt.freeze(small_net(), prune=0.3, lock=0.3, scope=scope, scale=scale, seed=3)
    twin = copy.deepcopy(base)
    timm_fslt.get_group(twin).sync_free = True
    first = masks(base)
    assert_trains_alike(base, twin, torch.randn(6, 3, 8, 8), torch.randint(0, 10, (6,)), steps=4, lr=2.0)
    assert any(not torch.equal(a, b) for a, b in zip(first, masks(twin)))  # the masks did move


@pytest.mark.parametrize("scope,scale", CONFIGS)
def test_a_search_step_runs_no_syncing_operation(scope, scale):
    torch.set_num_threads(1)
    model = timm_fslt.freeze(small_net(), prune=0.3, lock=0.3, scope=scope, scale=scale, seed=4)
    group = timm_fslt.get_group(model)
    group.sync_free = True
    model._apply(lambda t: t.clone())  # as .to(device) does: every tensor replaced by a copy
    opt = torch.optim.SGD(trainable(model), lr=5.0, momentum=0.9)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    step(model, opt, x, y)  # (the first step after the move; the counts below are of a later one)
    before = masks(model)
    with Ops() as ops:
        step(model, opt, x, y)
        model(x)  # the refresh of the step's new scores
    assert ops.syncing() == [], sorted(set(ops.syncing()))
    assert any(not torch.equal(a, b) for a, b in zip(before, masks(model)))  # the masks did move


# Operations that make no kernel (a view or an alias of their input).
VIEWS = {"aten.view", "aten.unsqueeze", "aten.squeeze", "aten.detach", "aten.split_with_sizes", "aten.expand",
         "aten.slice", "aten.lift_fresh", "aten.alias", "aten._reshape_alias", "aten.t", "aten.as_strided",
         "aten.unbind", "aten.select", "aten.reshape", "aten._unsafe_view"}


def _step_kernels(model, params, x, y):
    opt = torch.optim.SGD(params, lr=5.0, momentum=0.9)
    step(model, opt, x, y)
    with Ops() as ops:
        step(model, opt, x, y)
    return sum(1 for name in ops.names if name not in VIEWS)


@pytest.mark.parametrize("scope,scale", CONFIGS)
def test_kernels_per_step_stay_within_the_budget(scope, scale, monkeypatch):
    """The README's budget (section "GPU hot path"): over dense weight training, at most 9 kernels
    per masked layer (11 with a scale) and 90 per step for the whole model's selection, counted on
    the path a GPU runs (cached free weights, torch ops in the backward; two of the kernels, the
    mask widening and the index conversion, are the CPU's only)."""
    from timm_fslt.regen import native
    monkeypatch.setattr(native, "free_gradient", lambda *args: None)  # (a numba pass: no ATen op to count)
    torch.set_num_threads(1)
    x, y = torch.randn(4, 16), torch.randint(0, 10, (4,))

    def net(depth):
        torch.manual_seed(0)
        return nn.Sequential(*[nn.Linear(16, 16) for _ in range(depth)])
    extra = {}
    for depth in (3, 6):
        model = timm_fslt.freeze(net(depth), prune=0.3, lock=0.3, scope=scope, scale=scale, bias="train")
        group = timm_fslt.get_group(model)
        group.sync_free = group.cache_free_weights = True
        dense = net(depth)
        extra[depth] = _step_kernels(model, trainable(model), x, y) - _step_kernels(dense, dense.parameters(), x, y)
    per_layer = (extra[6] - extra[3]) / 3
    assert per_layer <= (9 if scale is None else 11), extra
    assert extra[3] - 3 * per_layer <= 90, extra


def test_the_step_after_a_move_does_not_look_for_free_positions_again():
    model = timm_fslt.freeze(small_net(), prune=0.3, lock=0.3, seed=5)
    timm_fslt.get_group(model).sync_free = True
    layers = timm_fslt.get_group(model).layers
    indices = [layer._free.index for layer in layers]
    model._apply(lambda t: t.clone())
    with Ops() as ops:
        model(torch.randn(2, 3, 8, 8))
    assert ops.syncing() == []
    for layer, old in zip(layers, indices):
        assert layer._free.frozen is layer.frozen and layer._free.index is not old
        assert torch.equal(layer._free.index, old)
        assert torch.equal(layer._free.index.long(), (layer.frozen.reshape(-1) == 0).nonzero().squeeze(1))


def test_non_finite_scores_are_reported_at_the_next_refresh():
    model = timm_fslt.freeze(small_net(), prune=0.3, lock=0.3, seed=6)
    group = timm_fslt.get_group(model)
    group.sync_free = True
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        group.layers[1].scores[0, 3] = float("nan")
    model(x)  # selected without reading back: the count of non-finite scores travels home
    with torch.no_grad():
        group.layers[0].scores.mul_(1.0)  # (a write: the next forward refreshes)
    with pytest.raises(FloatingPointError, match=group.layers[1].layer_name):
        model(x)
    group.check_finite = False
    model(x)  # (the check can be turned off, as on the synchronous path)


# -- compiled code after a move; the backward's cached free weights ------------------------------
def test_compiled_training_after_a_move_trains_like_eager():
    model = timm_fslt.freeze(small_net(), prune=0.3, lock=0.3, scale="dynamic", seed=7)
    model._apply(lambda t: t.clone())  # (what accelerator.prepare's .to(device) does to the caches)
    eager, compiled = copy.deepcopy(model), model
    run = torch.compile(compiled, backend="aot_eager")
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    opts = [torch.optim.SGD(trainable(m), lr=1.0, momentum=0.9) for m in (eager, compiled)]
    torch._dynamo.reset()
    torch.testing.assert_close(run(x), eager(x))
    for layer in timm_fslt.get_group(compiled).layers:  # the index compiled code read is the moved one
        assert layer._free.frozen is layer.frozen and layer._free.index.device == layer.frozen.device
    for _ in range(2):
        for net, opt in zip((eager, run), opts):
            step(net, opt, x, y)
    torch.testing.assert_close(run(x), eager(x))
    assert all(torch.equal(a, b) for a, b in zip(masks(eager), masks(compiled)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cached_free_weights_give_the_same_gradients(dtype):
    base = timm_fslt.freeze(small_net().to(dtype), prune=0.4, lock=0.2, scale="static", seed=8)
    twin = copy.deepcopy(base)
    timm_fslt.get_group(twin).cache_free_weights = True
    x = torch.randn(3, 3, 8, 8, dtype=dtype)
    for model in (base, twin):
        model(x).square().sum().backward()
    for a, b in zip(timm_fslt.get_group(base).layers, timm_fslt.get_group(twin).layers):
        assert torch.equal(a.scores.grad, b.scores.grad)
        assert "_free_weight" not in a.__dict__ and "_free_weight" in b.__dict__
    # a new weight (here: written in place) is gathered again
    conv = twin[0]
    with torch.no_grad():
        conv.parametrizations.weight.original.mul_(2.0)
    cached = twin[0].parametrizations.weight[0].__dict__["_free_weight"][3]
    twin(x)
    assert torch.equal(twin[0].parametrizations.weight[0].__dict__["_free_weight"][3], cached * 2.0)


def test_kept_products_are_never_written_while_something_holds_them():
    """``keep_products`` (on by default on the CPU) writes W * mask into last step's memory only
    when no graph and no caller holds it: two forwards in one graph, a weight kept by the caller."""
    base = timm_fslt.freeze(small_net(), prune=0.3, lock=0.3, scale="dynamic", seed=9)
    twin = copy.deepcopy(base)
    timm_fslt.get_group(base).keep_products = False
    assert timm_fslt.get_group(twin).keeps_products(torch.zeros(1))  # (the CPU default)
    x1, x2, y = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8), torch.randint(0, 10, (3,))
    opts = [torch.optim.SGD(trainable(m), lr=3.0, momentum=0.9) for m in (base, twin)]
    held = []
    for _ in range(3):
        for model, opt in zip((base, twin), opts):
            loss = F.cross_entropy(model(x1), y) + F.cross_entropy(model(x2), y)  # two forwards, one graph
            loss.backward()
            opt.step()
            opt.zero_grad()
        held.append((twin[0].weight, twin[0].weight.clone()))  # a weight the caller keeps (refreshes twin)
        timm_fslt.refresh_masks(base)
        for a, b in zip(timm_fslt.get_group(base).layers, timm_fslt.get_group(twin).layers):
            assert torch.equal(a.mask, b.mask) and torch.equal(a.scores, b.scores)
    assert all(torch.equal(kept, copy_) for kept, copy_ in held)  # never overwritten
    layer = timm_fslt.get_group(twin).layers[2]
    first = layer.__dict__["_product"]
    twin(x1)
    twin(x1)  # (nothing holds the first forward's product: the second writes the same memory)
    assert layer.__dict__["_product"] is first


def test_compiled_model_follows_a_loaded_state_dict():
    """load_state_dict replaces scores and codes' values: the eager refresh before the compiled
    forward re-reads them (the state of another seed gives that seed's outputs)."""
    model = timm_fslt.freeze(small_net(), prune=0.3, lock=0.3, seed=10)
    other = timm_fslt.freeze(small_net(seed=1), prune=0.3, lock=0.3, seed=11)
    x = torch.randn(2, 3, 8, 8)
    run = torch.compile(model, backend="aot_eager")
    torch._dynamo.reset()
    run(x)
    model.load_state_dict(other.state_dict())
    torch.testing.assert_close(run(x), other(x), rtol=0, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(masks(model), masks(other)))


def test_the_sync_free_state_is_not_copied_with_the_model():
    """The group's device state (a pending non-finite count, the scale table; on CUDA a pinned copy
    and an event, which do not pickle) is made afresh in a copy instead of copied."""
    model = timm_fslt.freeze(small_net(), prune=0.3, lock=0.3, scope="global", scale="dynamic", seed=12)
    group = timm_fslt.get_group(model)
    group.sync_free = True
    timm_fslt.refresh_masks(model)
    assert {"_nonfinite", "_scale_table"} <= set(group.__dict__)
    twin = copy.deepcopy(model)  # (as timm's ModelEmaV2 does; torch pickles parametrized models only by state_dict)
    other = timm_fslt.get_group(twin)
    assert not {"_nonfinite", "_scale_table"} & set(other.__dict__)
    assert other.sync_free and all(torch.equal(a, b) for a, b in zip(masks(model), masks(twin)))
    timm_fslt.refresh_masks(twin)  # (made again on first use)
    assert {"_nonfinite", "_scale_table"} <= set(other.__dict__)
    assert all(torch.equal(a, b) for a, b in zip(masks(model), masks(twin)))
    assert all(torch.equal(a.scale, b.scale) for a, b in zip(group.layers, other.layers))
