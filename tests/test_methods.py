"""Search methods beyond Edge-Popup (issue #18): multicoated supermasks, IteRand, sparsity schedules.

Each is checked against an independent statement of what it must do (written here with NumPy
sorts and plain formulas, not the package's selection), at every optimizer step of a short run."""
import contextlib
import copy
import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import timm_fslt
from timm_fslt.nn.iterand import pick_threshold
from timm_fslt.regen import rng
from timm_fslt.regen.init import random_weight

from helpers import outputs_across_kernel_paths, snapshot, trainable

torch.set_num_threads(1)
PRUNE, LOCK = 0.3, 0.3


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 4 * 4, 10))


def data(n=32):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def steps(model, n, opt=None, lr=0.5, each=None):
    """n SGD steps on a fixed batch; ``each(step)`` after every step's refresh (a forward)."""
    x, y = data()
    opt = opt or torch.optim.SGD(trainable(model), lr=lr, momentum=0.9)
    for _ in range(n):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if each is not None:
            model(x)
            each(timm_fslt.get_group(model).search_step)
    return opt


def free_order(layer, tensor):
    return tensor.reshape(-1)[layer.frozen.reshape(-1) == 0]


def top_k_positions(scores_by_layer, k):
    """Indices (into the concatenation) of the k largest |s|, ties to the lower index (NumPy)."""
    flat = np.concatenate([np.abs(s) for s in scores_by_layer]) if scores_by_layer else np.zeros(0)
    order = np.lexsort((np.arange(flat.size), -flat.astype(np.float64)))
    out = np.zeros(flat.size, dtype=bool)
    out[order[:k]] = True
    return out


def kept_count(sparsity, layers):
    """How many free weights a global selection at ``sparsity`` keeps (the method's own rule)."""
    total = sum(layer.frozen.numel() for layer in layers)
    locked = sum(int((layer.frozen == 1).sum()) for layer in layers)
    free = sum(int((layer.frozen == 0).sum()) for layer in layers)
    return min(max(math.floor((1.0 - sparsity) * total + 0.5) - locked, 0), free)


def check_frozen(group):
    for layer in group.layers:
        assert not layer.mask[layer.frozen == -1].any() and layer.mask[layer.frozen == 1].all()


# -- the default ------------------------------------------------------------------------------

def test_edge_popup_by_name_is_the_default_bit_for_bit():
    a = timm_fslt.freeze(net(), prune=PRUNE, lock=LOCK)
    b = timm_fslt.freeze(net(), prune=PRUNE, lock=LOCK, method="edge_popup")
    assert timm_fslt.get_group(a).method is None and timm_fslt.get_group(b).method is None
    steps(a, 5)
    steps(b, 5)
    for la, lb in zip(timm_fslt.get_group(a).layers, timm_fslt.get_group(b).layers):
        assert torch.equal(la.mask, lb.mask) and torch.equal(la.scores, lb.scores)
    assert list(a.state_dict()) == list(b.state_dict())
    fields = timm_fslt.get_config(a).to_dict()
    assert not {"method", "coat_sparsities", "rerand_period", "rerand_rate", "sparsity_schedule",
                "schedule_steps"} & set(fields)


# -- multicoated ------------------------------------------------------------------------------

COATS = (0.45, 0.55, 0.65)


@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_multicoated_levels_nest_and_match_an_independent_selection_every_step(scope):
    model = timm_fslt.freeze(net(), prune=PRUNE, lock=LOCK, method="multicoated", coat_sparsities=COATS,
                             scope=scope)
    group = timm_fslt.get_group(model)
    assert group.sparsity == COATS[0]
    seen = []

    def check(_):
        check_frozen(group)
        layers = group.layers
        scores = [layer.scores.detach().reshape(-1).numpy() for layer in layers]
        sizes = [s.size for s in scores]
        for j, sparsity in enumerate(COATS, start=1):
            if scope == "global":
                want = np.split(top_k_positions(scores, kept_count(sparsity, layers)), np.cumsum(sizes)[:-1])
            else:
                want = [top_k_positions([s], kept_count(sparsity, [layer])) for s, layer in zip(scores, layers)]
            for layer, w in zip(layers, want):
                got = free_order(layer, layer.level).numpy() >= j
                assert np.array_equal(got, w), (j, layer.layer_name)
        for layer in layers:
            level = layer.level
            assert (level[layer.frozen == 1] == len(COATS)).all() and (level[layer.frozen == -1] == 0).all()
            assert torch.equal(level >= 1, layer.mask)  # the mask is the densest coat
        seen.append(sum(int((layer.level == 2).sum()) for layer in layers))

    steps(model, 6, each=check)
    assert len(seen) == 6


def test_multicoated_weight_and_straight_through_gradient():
    model = timm_fslt.freeze(net(), prune=PRUNE, lock=LOCK, method="multicoated", coat_sparsities=COATS,
                             scale="static")
    steps(model, 2)
    x, y = data()
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    conv = model[2]
    layer = timm_fslt.get_group(model).layers[1]
    w = conv.parametrizations.weight.original
    scale = 1.0 / math.sqrt(1.0 - COATS[0])
    assert torch.equal(conv.weight, w * layer.level.to(w.dtype) * torch.tensor(scale, dtype=torch.float32))
    # dL/ds = C * dL/dW_eff * W * scale * sign(s), at the free weights: W_eff's gradient from autograd
    w_eff = (w * layer.level.to(w.dtype) * scale).detach().requires_grad_(True)
    out = model[:2](x)
    out = F.relu(F.conv2d(out, w_eff))
    out = model[5](model[4](out))
    F.cross_entropy(out, y).backward()
    want = len(COATS) * free_order(layer, w_eff.grad * w * scale) * torch.sign(layer.scores.detach().reshape(-1))
    torch.testing.assert_close(layer.scores.grad.reshape(-1), want, rtol=1e-5, atol=1e-7)


def test_multicoated_model_copies_materializes_and_traces():
    model = timm_fslt.freeze(net(), prune=PRUNE, lock=LOCK, method="multicoated", coat_sparsities=COATS)
    out, x = _copies_agree(model)
    with torch.no_grad():
        traced = torch.jit.trace(model, x)
        assert torch.equal(traced(x), out)


def _copies_agree(model):
    """Three steps, then a deep copy and ``materialize`` give the model's eval outputs exactly:
    returns (outputs, inputs)."""
    steps(model, 3)
    model.eval()
    x, _ = data(4)
    with torch.no_grad():
        out = model(x)
        assert torch.equal(copy.deepcopy(model)(x), out)
        assert torch.equal(timm_fslt.materialize(model)(x), out)
    return out, x


# -- IteRand ----------------------------------------------------------------------------------

def test_iterand_redraws_only_free_left_out_weights_from_the_rounds_stream():
    period, rate = 2, 0.5
    model = timm_fslt.freeze(net(), prune=PRUNE, lock=LOCK, method="iterand", rerand_period=period,
                             rerand_rate=rate, seed=3)
    group = timm_fslt.get_group(model)
    originals = [model[i].parametrizations.weight.original.clone() for i in (0, 2, 5)]
    previous = [layer.rerand_round.clone() for layer in group.layers]
    before_masks = [layer.mask.clone() for layer in group.layers]
    rounds_seen = set()

    def check(step):
        check_frozen(group)
        for i, (layer, conv) in enumerate(zip(group.layers, (model[0], model[2], model[5]))):
            rounds = layer.rerand_round
            changed = (rounds != previous[i]).nonzero().squeeze(1)
            if step % period:
                assert changed.numel() == 0
            else:
                r = step // period
                assert (rounds[changed] == r).all()
                positions = (layer.frozen.reshape(-1) == 0).nonzero().squeeze(1)
                # the round picks among the free weights this step's mask leaves out, by the pick stream
                left_out = ~free_order(layer, layer.mask)
                key = rng.stream_key(3, layer.layer_name, f"iterand/pick/{r}")
                picked = (rng.hash32(key, positions) < pick_threshold(rate)) & left_out
                assert torch.equal(rounds == r, picked)
                assert torch.equal(rounds[~picked], previous[i][~picked])
                rounds_seen.add(r)
            # the buffer never changes; the forward's weight is the seed's except at re-drawn entries
            w = conv.parametrizations.weight.original
            assert torch.equal(w, originals[i])
            effective = group.method.rerand.weight(layer, w, layer.free_index().index).reshape(-1)
            positions = (layer.frozen.reshape(-1) == 0).nonzero().squeeze(1)
            for r in set(rounds.tolist()) - {0}:
                at = positions[rounds == r]
                want = random_weight("kaiming_uniform", 3, layer.layer_name, tuple(w.shape), stream=f"iterand/{r}",
                                     positions=at)
                assert torch.equal(effective[at], want)
            untouched = torch.ones_like(effective, dtype=torch.bool)
            untouched[positions[rounds != 0]] = False
            assert torch.equal(effective[untouched], w.reshape(-1)[untouched])
            previous[i] = rounds.clone()

    steps(model, 6, each=check)
    assert rounds_seen == {1, 2, 3}
    assert any(bool((layer.rerand_round > 0).any()) for layer in group.layers)
    assert any(not torch.equal(m, layer.mask) for m, layer in zip(before_masks, group.layers))


def _train_state(model, opt):
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("kwargs", [
    dict(method="iterand", rerand_period=3, rerand_rate=0.3),
    dict(method="multicoated", coat_sparsities=COATS, sparsity_schedule=("linear", 0.35, 0.8), schedule_steps=9),
    dict(sparsity_schedule=("cosine", 0.3, 1.0), schedule_steps=9),
], ids=["iterand", "multicoated_schedule", "edge_popup_schedule"])
def test_resumed_mid_period_is_bit_identical(kwargs):
    straight = timm_fslt.freeze(net(), prune=PRUNE, lock=LOCK, **kwargs)
    steps(straight, 8)
    first = timm_fslt.freeze(net(), prune=PRUNE, lock=LOCK, **kwargs)
    opt = steps(first, 4)  # (4 is mid-period for period 3 and mid-schedule)
    state = _train_state(first, opt)
    resumed = timm_fslt.freeze(net(), prune=PRUNE, lock=LOCK, **kwargs)
    resumed.load_state_dict(state["model"])
    assert timm_fslt.get_group(resumed).search_step == 4
    opt2 = torch.optim.SGD(trainable(resumed), lr=0.5, momentum=0.9)
    opt2.load_state_dict(state["opt"])
    steps(resumed, 4, opt=opt2)
    x, _ = data(4)
    with torch.no_grad():
        assert torch.equal(resumed(x), straight(x))
    assert snapshot(resumed).keys() == snapshot(straight).keys()
    for k, v in snapshot(straight).items():
        assert torch.equal(v, snapshot(resumed)[k]), k


def test_iterand_tickets_copies_and_materialize_agree():
    model = timm_fslt.freeze(net(), prune=PRUNE, lock=LOCK, method="iterand", rerand_period=1, rerand_rate=1.0)
    _copies_agree(model)
    # rate 1: after each round every left-out free weight carries the round
    layer = timm_fslt.get_group(model).layers[0]
    assert int(layer.rerand_round.max()) == 3


# -- schedules --------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", ["linear", "cosine"])
def test_annealed_sparsity_follows_its_schedule_exactly(shape):
    start, until, total, final = 0.32, 0.5, 12, 0.6
    model = timm_fslt.freeze(net(), prune=PRUNE, lock=LOCK, sparsity=final,
                             sparsity_schedule=(shape, start, until), schedule_steps=total)
    group = timm_fslt.get_group(model)

    def expected(step):
        end = until * total
        if step >= end:
            return final
        t = step / end
        if shape == "cosine":
            t = (1 - math.cos(math.pi * t)) / 2
        return start + (final - start) * t

    assert sum(int(layer.mask.sum()) for layer in group.layers) == \
        kept_count(start, group.layers) + sum(int((layer.frozen == 1).sum()) for layer in group.layers)
    counts = []

    def check(step):
        check_frozen(group)
        kept = sum(int(free_order(layer, layer.mask).sum()) for layer in group.layers)
        assert kept == kept_count(expected(step), group.layers), step
        counts.append(kept)

    steps(model, 8, each=check)
    assert counts[0] > counts[-1] and counts[-1] == kept_count(final, group.layers)


def test_steps_of_an_optimizer_without_the_scores_do_not_count():
    model = timm_fslt.freeze(net(), prune=PRUNE, lock=LOCK, sparsity_schedule=("linear", 0.3, 1.0),
                             schedule_steps=10)
    other = nn.Linear(3, 3)
    opt = torch.optim.SGD(other.parameters(), lr=0.1)
    other(torch.ones(1, 3)).sum().backward()
    opt.step()
    opt.step()
    assert timm_fslt.get_group(model).search_step == 0
    steps(model, 2)
    assert timm_fslt.get_group(model).search_step == 2
    assert all(int(layer.search_step) == 2 for layer in timm_fslt.get_group(model).layers)


# -- bad input --------------------------------------------------------------------------------

BAD = [
    (dict(method="popup"), "method must be one of"),
    (dict(method="edge_popup", coat_sparsities=(0.5, 0.6)), "coat_sparsities is an option of method='multicoated'"),
    (dict(method="multicoated", rerand_period=10), "rerand_period is an option of method='iterand'"),
    (dict(method="iterand", coat_sparsities=(0.5,)), "coat_sparsities is an option"),
    (dict(method="multicoated", coat_sparsities=(0.6, 0.5)), "strictly increasing"),
    (dict(method="multicoated", coat_sparsities=(0.5, 0.5)), "strictly increasing"),
    (dict(method="multicoated", coat_sparsities=(0.2, 0.5)), r"\[prune, 1 - lock\]"),
    (dict(method="multicoated", coat_sparsities=(0.5, 0.8)), r"\[prune, 1 - lock\]"),
    (dict(method="multicoated", coat_sparsities=(0.5, 0.6), sparsity=0.4), "densest coat"),
    (dict(method="iterand", rerand_period=0), "rerand_period must be"),
    (dict(method="iterand", rerand_rate=0.0), r"rerand_rate must lie in \(0, 1\]"),
    (dict(method="iterand", rerand_rate=1.5), r"rerand_rate must lie in \(0, 1\]"),
    (dict(sparsity_schedule=("linear", 0.4, 1.5), schedule_steps=10), "ends outside the run"),
    (dict(sparsity_schedule=("linear", 0.4, 0.0), schedule_steps=10), "ends outside the run"),
    (dict(sparsity_schedule=("step", 0.4, 0.5), schedule_steps=10), "shape must be one of"),
    (dict(sparsity_schedule=("linear", 0.4, 0.5)), "needs schedule_steps"),
    (dict(sparsity_schedule=("linear", 0.4, 0.5), schedule_steps=0), "schedule_steps must be"),
    (dict(sparsity_schedule=("linear", 0.6, 0.5), schedule_steps=10), r"start must lie in \[prune, sparsity\]"),
    (dict(sparsity_schedule=("linear", 0.1, 0.5), schedule_steps=10), r"start must lie in \[prune, sparsity\]"),
    (dict(schedule_steps=10), "schedule_steps is the length of a sparsity_schedule"),
    (dict(sparsity_schedule="linear", schedule_steps=10), "sparsity_schedule must be"),
]


@pytest.mark.parametrize("kwargs, message", BAD)
def test_bad_method_options_are_refused_with_the_model_unchanged(kwargs, message):
    model = net()
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        timm_fslt.freeze(model, prune=PRUNE, lock=LOCK, sparsity=kwargs.pop("sparsity", 0.5), **kwargs)
    assert not timm_fslt.is_frozen(model)
    assert snapshot(model).keys() == before.keys() and all(torch.equal(v, before[k]) for k, v in snapshot(model).items())


def test_method_options_of_the_wrong_type_are_type_errors():
    with pytest.raises(TypeError, match="rerand_period must be an int"):
        timm_fslt.freeze(net(), prune=PRUNE, lock=LOCK, method="iterand", rerand_period=2.5)
    with pytest.raises(TypeError, match="coat_sparsities must be a sequence"):
        timm_fslt.freeze(net(), prune=PRUNE, lock=LOCK, method="multicoated", coat_sparsities=0.5)


def test_config_round_trips_through_json_lists():
    model = timm_fslt.freeze(net(), prune=PRUNE, lock=LOCK, method="multicoated", coat_sparsities=[0.5, 0.6],
                             sparsity_schedule=["linear", 0.4, 0.5], schedule_steps=10)
    fields = timm_fslt.get_config(model).to_dict()
    again = timm_fslt.FreezeConfig(**{k: (list(v) if isinstance(v, tuple) else v) for k, v in fields.items()})
    assert again == timm_fslt.get_config(model)
    assert again.coat_sparsities == (0.5, 0.6) and again.sparsity == 0.5


@pytest.mark.parametrize("kwargs", [
    dict(method="multicoated", scale="dynamic"),
    dict(method="iterand", rerand_period=2, rerand_rate=0.2),
    dict(sparsity_schedule=("linear", 0.4, 0.5), schedule_steps=6, scale="dynamic"),
], ids=["multicoated", "iterand", "schedule"])
def test_timm_resnet_paths_agree(kwargs):
    """A timm model: the CPU refresh (compiled passes) against the device path (sync-free), and
    channels_last (other convolution kernels: only the frozen semantics and materialize checked)."""
    timm = pytest.importorskip("timm")
    runs = []
    for device_path in (False, True, "channels_last"):
        model = timm_fslt.freeze(timm.create_model("resnet18", num_classes=10), prune=0.35, lock=0.35, **kwargs)
        group = timm_fslt.get_group(model)
        if device_path is True:
            group.sync_free = True
        elif device_path:
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(trainable(model), lr=0.1, momentum=0.9)
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)
        for _ in range(5):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            out = model(x)
            assert torch.equal(timm_fslt.materialize(model)(x), out)
        check_frozen(group)
        runs.append((out, [layer.mask.clone() for layer in group.layers], group))
    (out_a, masks_a, group_a), (out_b, masks_b, group_b), _ = runs
    assert all(torch.equal(a, b) for a, b in zip(masks_a, masks_b))
    assert group_a.search_step == group_b.search_step and torch.equal(out_a, out_b)


@pytest.mark.parametrize("method", ["multicoated", "iterand"])
def test_one_bit_tools_refuse_levels_and_redrawn_weights(method):
    model = timm_fslt.freeze(net(), prune=PRUNE, lock=LOCK, method=method)
    x, _ = data(2)
    if method == "multicoated":
        with pytest.raises(ValueError, match="recompute_masked_weights supports method='edge_popup' only"):
            with timm_fslt.recompute_masked_weights(model):
                pass
    with pytest.raises(ValueError, match="timm_fslt.compact supports method='edge_popup' only"):
        timm_fslt.compact(model, x)


@pytest.mark.parametrize("kwargs", [dict(method="iterand", rerand_period=1, rerand_rate=0.5),
                                    dict(sparsity_schedule=("linear", 0.35, 1.0), schedule_steps=4)])
def test_recomputed_products_of_iterand_and_schedules_give_the_same_gradients(kwargs):
    runs = []
    for recompute in (False, True):
        model = timm_fslt.freeze(net(), prune=PRUNE, lock=LOCK, **kwargs)
        steps(model, 3)
        x, y = data()
        model.zero_grad()
        with timm_fslt.recompute_masked_weights(model) if recompute else contextlib.nullcontext():
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        runs.append([layer.scores.grad.clone() for layer in timm_fslt.get_group(model).layers])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_gpu_check_method_comparison_runs_and_agrees_on_the_cpu():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).parent.parent / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check_methods", path)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    arch = {"timm": "mnist_cnn", "kwargs": {"width": 0.125, "img_size": 8}}
    assert gpu_check.method_mismatches(arch, (1, 8, 8), torch.device("cpu"), steps=2) == []


_CHILD = """
import hashlib, os, torch, torch.nn.functional as F
import timm_fslt
torch.manual_seed(0)
torch.set_num_threads(int(os.environ["THREADS"]))
digest = hashlib.sha256()
for kwargs in (dict(method="multicoated", coat_sparsities=(0.45, 0.55, 0.65), scale="dynamic"),
               dict(method="iterand", rerand_period=1, rerand_rate=0.5),
               dict(sparsity_schedule=("cosine", 0.3, 1.0), schedule_steps=4)):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3), torch.nn.ReLU(), torch.nn.Conv2d(32, 64, 3),
                              torch.nn.Flatten(), torch.nn.Linear(64 * 4 * 4, 10))
    model = timm_fslt.freeze(net, prune=0.3, lock=0.3, seed=9, **kwargs)
    group = timm_fslt.get_group(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0, momentum=0.9)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    for _ in range(4):
        F.cross_entropy(model(x), y).backward(); opt.step(); opt.zero_grad()
        group.refresh()
        for i, layer in zip((0, 2, 4), group.layers):
            digest.update(layer.mask.numpy().tobytes())
            if "level" in layer.__dict__:
                digest.update(layer.level.numpy().tobytes())
            if "rerand_round" in layer._buffers:
                w = model[i].parametrizations.weight.original
                digest.update(layer.rerand_round.numpy().tobytes())
                digest.update(group.method.rerand.weight(layer, w, layer.free_index().index).numpy().tobytes())
print(digest.hexdigest())
"""


def test_methods_give_the_same_bits_across_cpu_kernel_paths_and_thread_counts():
    assert len({out.strip() for out in outputs_across_kernel_paths(_CHILD)}) == 1
