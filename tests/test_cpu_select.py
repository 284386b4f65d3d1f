"""The CPU refresh's compiled selection and mask write (``regen/cpu_select.py``, ``nn/cpu_refresh.py``).

Checked against a full stable sort of the score magnitudes (``regen_reference``, no code of the
selection shared), and against the generic torch refresh over training steps, for every scope and
scale, with the band both hit and missed, ties at the threshold, non-finite scores, and across
thread counts and ATen CPU kernel paths.
"""
import copy
import random
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import timm_fslt
from timm_fslt.regen import cpu_select, native

from helpers import assert_trains_alike, masks, outputs_across_kernel_paths, trainable
from regen_reference import reference_topk_mask

pytestmark = pytest.mark.skipif(native.kernels() is None, reason="the compiled kernels are off")

CONFIGS = [(scope, scale) for scope in ("global", "layerwise") for scale in (None, "static", "dynamic")]


def _scores(rng, kind, n):
    if kind == "normal":
        return torch.randn(n, generator=rng)
    if kind == "ties":  # a few values, both signs: long runs of equal magnitudes at every threshold
        return (torch.randint(-3, 4, (n,), generator=rng) * 0.25).float()
    if kind == "subnormal":
        return torch.randn(n, generator=rng) * 1e-40
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, float("inf"), -float("inf"), float("nan")])
    return special[torch.randint(0, 7, (n,), generator=rng)]


def _select(parts, ks, scope_global, state, check_finite=True, kept_bits=None):
    """Masks (free entries only: every position is free here) from the compiled path.  ``kept_bits``:
    a list carried from call to call (the same sizes), so later calls write only the changed bits."""
    if kept_bits is not None and not kept_bits:
        kept_bits += [(np.zeros(p.numel(), dtype=np.uint8), np.empty(p.numel(), dtype=np.uint8)) for p in parts]
    current = kept_bits is not None and getattr(kept_bits, "written", False)
    memory = kept_bits or [(np.zeros(p.numel(), dtype=np.uint8), np.empty(p.numel(), dtype=np.uint8)) for p in parts]
    layers = [(p.view(torch.int32).numpy(), mask, np.arange(p.numel(), dtype=np.int32), None, (sel, current))
              for p, (mask, sel) in zip(parts, memory)]
    n = len(parts)
    segments = [(0, n, ks[0])] if scope_global else [(i, i + 1, k) for i, k in enumerate(ks)]
    kept = cpu_select.select_and_write(layers, segments, state, check_finite)
    if kept_bits is not None and kept is not None:
        kept_bits.written = True
    return kept, [torch.from_numpy(mask.copy().view(bool)) for _, mask, _, _, _ in layers]


class Carried(list):
    written = False


@pytest.mark.parametrize("kind", ["normal", "ties", "subnormal", "special"])
@pytest.mark.parametrize("scope_global", [True, False])
def test_selection_equals_a_stable_sort(kind, scope_global):
    rng, pick = torch.Generator().manual_seed(7), random.Random(8)
    state = cpu_select.BandState()
    for _ in range(12):
        sizes = [pick.choice([0, 1, 2, 50, 3000, 40_000, 70_000]) for _ in range(pick.randint(1, 4))]
        parts = [_scores(rng, kind, m) for m in sizes]
        total = sum(sizes)
        ks = [pick.randint(0, total)] if scope_global else [pick.randint(0, m) for m in sizes]
        carried = Carried()
        for step in range(3):  # the same segments again, the scores moved a little: the band is used,
            # and only the bits that changed are written
            kept, got = _select(parts, ks, scope_global, state, check_finite=False, kept_bits=carried)
            magnitudes = [p.abs() for p in parts]
            if scope_global:
                expected = reference_topk_mask(torch.cat(magnitudes), ks[0]).split(sizes)
            else:
                expected = [reference_topk_mask(mag, k) for mag, k in zip(magnitudes, ks)]
            for g, e in zip(got, expected):
                assert torch.equal(g, e), (kind, sizes, ks, step)
            assert kept == [int(e.sum()) for e in expected]
            parts = [p * (1 + 1e-4 * torch.randn(p.shape, generator=rng)) if kind == "normal" else p for p in parts]
    assert state.hits > 0 and (kind != "normal" or state.misses > 0)


def test_the_band_is_hit_after_small_steps_and_missed_after_a_large_one():
    rng = torch.Generator().manual_seed(3)
    parts = [torch.randn(200_000, generator=rng), torch.randn(100_000, generator=rng) * 3]
    state = cpu_select.BandState()
    _select(parts, [150_000], True, state)
    assert (state.hits, state.misses) == (0, 1)  # no band yet: found over the whole segment
    for _ in range(3):
        parts = [p + 1e-3 * torch.randn(p.shape, generator=rng) for p in parts]
        _, got = _select(parts, [150_000], True, state)
    assert (state.hits, state.misses) == (3, 1)
    parts = [p * 10 if i == 0 else p for i, p in enumerate(parts)]  # the threshold jumps far outside
    _, got = _select(parts, [150_000], True, state)
    assert (state.hits, state.misses) == (3, 2)
    expected = reference_topk_mask(torch.cat([p.abs() for p in parts]), 150_000).split([200_000, 100_000])
    assert all(torch.equal(g, e) for g, e in zip(got, expected))


def test_non_finite_scores_write_nothing():
    parts = [torch.randn(5000), torch.randn(30_000)]
    parts[1][123] = float("nan")
    layers = [(p.view(torch.int32).numpy(), np.full(p.numel(), 7, dtype=np.uint8),
               np.arange(p.numel(), dtype=np.int32), None, (np.empty(p.numel(), dtype=np.uint8), False))
              for p in parts]
    assert cpu_select.select_and_write(layers, [(0, 2, 1000)], cpu_select.BandState(), True) is None
    assert all((mask == 7).all() for _, mask, _, _, _ in layers)
    parts[1][123] = -float("inf")
    assert cpu_select.select_and_write(layers, [(0, 2, 1000)], cpu_select.BandState(), True) is None


def small_net():
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 64, 3, padding=1),
                         nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(256, 10))


@pytest.mark.parametrize("scope,scale", CONFIGS)
def test_training_gives_the_generic_refresh_masks_scales_and_gradients(scope, scale):
    torch.set_num_threads(1)
    base = timm_fslt.freeze(small_net(), prune=0.3, lock=0.3, scope=scope, scale=scale, seed=5)
    twin = copy.deepcopy(base)
    timm_fslt.get_group(twin).compiled_refresh = False
    first = masks(base)
    assert_trains_alike(base, twin, torch.randn(6, 3, 8, 8), torch.randint(0, 10, (6,)), steps=5, lr=1.0)
    group = timm_fslt.get_group(base)
    assert group.band_state.hits + group.band_state.misses >= 5  # the compiled path ran every refresh
    assert "_bands" not in timm_fslt.get_group(twin).__dict__  # and the generic one never did
    assert any(not torch.equal(a, b) for a, b in zip(first, masks(base)))  # the masks did move


def test_a_mask_written_by_someone_else_is_rebuilt():
    model = timm_fslt.freeze(small_net(), prune=0.3, lock=0.3, seed=2)
    group = timm_fslt.get_group(model)
    expected = masks(model)
    layer = group.layers[1]
    version = layer.mask._version
    with torch.no_grad():
        layer.mask.fill_(True)
    group.refresh(force=True)
    assert layer.mask._version > version + 1  # written (and its version counter bumped)
    assert all(torch.equal(a, b) for a, b in zip(masks(model), expected))


def test_layouts_the_compiled_path_does_not_take_fall_back():
    torch.set_num_threads(1)
    model = timm_fslt.freeze(small_net(), prune=0.3, lock=0.3, seed=4)
    twin = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 8, 8)
    for m in (model, twin):
        F.cross_entropy(m(x), torch.tensor([1, 2])).backward()
        with torch.no_grad():
            for p in trainable(m):
                p.sub_(p.grad)
        m(x)
    assert not timm_fslt.get_group(twin).layers[1].mask.is_contiguous()
    assert timm_fslt.get_group(twin).band_state.hits + timm_fslt.get_group(twin).band_state.misses == 0
    assert all(torch.equal(a, b) for a, b in zip(masks(model), masks(twin)))


_CHILD = textwrap.dedent("""
    import copy, hashlib, torch, torch.nn.functional as F
    import timm_fslt
    torch.manual_seed(0)
    torch.set_num_threads(int(__import__("os").environ["THREADS"]))
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3), torch.nn.ReLU(), torch.nn.Conv2d(64, 256, 3),
                              torch.nn.Flatten(), torch.nn.LazyLinear(10))
    net(torch.randn(1, 3, 8, 8))
    model = timm_fslt.freeze(net, prune=0.3, lock=0.3, seed=9)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0, momentum=0.9)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    digest = hashlib.sha256()
    for _ in range(4):
        F.cross_entropy(model(x), y).backward(); opt.step(); opt.zero_grad()
        timm_fslt.get_group(model).refresh()
        for layer in timm_fslt.get_group(model).layers:
            digest.update(layer.mask.numpy().tobytes())
    print(digest.hexdigest(), timm_fslt.get_group(model).band_state.hits)
""")


def test_masks_are_the_same_across_cpu_kernel_paths_and_thread_counts():
    seen = set()
    for out in outputs_across_kernel_paths(_CHILD):
        digest, hits = out.split()
        assert int(hits) >= 1
        seen.add(digest)
    assert len(seen) == 1


def _effective(layer, module):
    """``W * mask * scale`` computed afresh, the reference for a layer's kept product."""
    weight = module.parametrizations.weight.original
    out = weight * layer.mask.to(weight.dtype)
    return out if layer.group.scale_mode is None else out * layer.scale


@pytest.mark.parametrize("scale", [None, "static", "dynamic"])
def test_the_kept_product_follows_the_mask(scale, monkeypatch):
    from timm_fslt.nn import functional
    torch.set_num_threads(1)
    base = timm_fslt.freeze(small_net(), prune=0.3, lock=0.3, scale=scale, seed=6)
    twin = copy.deepcopy(base)
    timm_fslt.get_group(twin).keep_products = False
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 10, (6,))
    opts = [torch.optim.SGD(trainable(m), lr=1.0, momentum=0.9) for m in (base, twin)]
    made = []
    real = functional.masked_product
    monkeypatch.setattr(functional, "masked_product", lambda *a, **k: made.append(1) or real(*a, **k))
    modules = [m for m in base.modules() if hasattr(m, "parametrizations")]
    layers = timm_fslt.get_group(base).layers
    counts = []
    for _ in range(5):
        made.clear()
        outs = [model(x) for model in (base, twin)]
        counts.append(len(made))
        assert torch.equal(outs[0], outs[1])
        with torch.no_grad():
            for layer, module in zip(layers, modules):
                assert torch.equal(layer.__dict__["_product"], _effective(layer, module))
        for out, opt in zip(outs, opts):
            F.cross_entropy(out, y).backward()
            opt.step()
            opt.zero_grad()
    # products computed by the forwards (twin: one per layer, every step); base's: after the first
    # step none with a fixed scale (the refresh updated them), with dynamic scales those of the
    # layers whose scale changed
    n = len(layers)
    assert counts[0] == 2 * n
    assert all(c == n for c in counts[1:]) if scale != "dynamic" else all(n <= c <= 2 * n for c in counts[1:])


def test_a_kept_product_someone_wrote_or_holds_is_made_again():
    torch.set_num_threads(1)
    model = timm_fslt.freeze(small_net(), prune=0.3, lock=0.3, seed=6)
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 10, (6,))
    opt = torch.optim.SGD(trainable(model), lr=1.0, momentum=0.9)
    conv = model[2]
    layer = timm_fslt.get_group(model).layers[1]
    for _ in range(2):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        conv.weight.mul_(3.0)  # (the weight a forward returned is the kept memory: written by the user)
        assert not torch.equal(layer.__dict__["_product"], _effective(layer, conv))
        model(x)
        assert torch.equal(layer.__dict__["_product"], _effective(layer, conv))
    held = conv.weight  # kept by the caller across a step: its values never change
    before = held.clone()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad()
    model(x)
    assert torch.equal(held, before)
    with torch.no_grad():
        assert torch.equal(conv.weight, _effective(layer, conv))
