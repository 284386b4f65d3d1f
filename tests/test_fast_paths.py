"""The fast paths give exactly what the slow, obvious computations give.

Linear-time selection vs a full stable sort, the cached free index vs boolean
indexing, the sort-free frozen code vs a full argsort, the chunked generator vs
digests of the original generator, and autocast / torch.compile / channels_last
vs eager float32.  No timings here: those live in benchmarks/.
"""
import copy
import hashlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import timm_fslt
from timm_fslt.regen import init, pattern as freezing, rng, topk as threshold
from timm_fslt.regen.topk import keys_topk_mask, kth_largest

from helpers import masks, trainable
from regen_reference import reference_topk_mask, topk_mask


@pytest.fixture
def tiny_bracket(monkeypatch):
    """Force the sample-bracket path of the selection on small inputs."""
    monkeypatch.setattr(threshold, "_DIRECT", 64)
    monkeypatch.setattr(threshold, "_SAMPLE", 16)


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, groups=2),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 10))


def reference_group_masks(group):
    """Masks by boolean indexing and a full stable sort over the concatenated free |scores|."""
    frees = [layer.frozen == freezing.FREE for layer in group.layers]
    values = [layer.scores.detach().abs().float().reshape(-1) for layer in group.layers]  # free weights only
    if group.scope == "global":
        locked = sum(int((layer.frozen == freezing.LOCKED).sum()) for layer in group.layers)
        k = min(max(group.kept_target() - locked, 0), sum(v.numel() for v in values))
        selected = reference_topk_mask(torch.cat(values), k).split([v.numel() for v in values])
    else:
        selected = []
        for layer, v in zip(group.layers, values):
            locked = int((layer.frozen == freezing.LOCKED).sum())
            kept = freezing.round_half_up((1 - group.sparsity) * layer.numel)
            selected.append(reference_topk_mask(v, min(max(kept - locked, 0), v.numel())))
    out = []
    for layer, free, sel in zip(group.layers, frees, selected):
        mask = layer.frozen == freezing.LOCKED
        mask[free] = sel
        out.append(mask)
    return out


# -- selection ------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["random", "few_values", "sorted", "reversed", "constant"])
def test_bracketed_kth_largest_equals_kthvalue(tiny_bracket, case):
    g = torch.Generator().manual_seed(1)
    n = 5000
    keys = {"random": torch.randint(-2**31, 2**31 - 1, (n,), generator=g, dtype=torch.int32),
            "few_values": torch.randint(0, 3, (n,), generator=g, dtype=torch.int32),
            "sorted": torch.arange(n, dtype=torch.int32),
            "reversed": torch.arange(n, 0, -1, dtype=torch.int64),
            "constant": torch.full((n,), 7, dtype=torch.int32)}[case]
    for k in (1, 2, 100, n // 2, n - 100, n - 1, n):
        kth = torch.kthvalue(keys, n - k + 1).values
        assert kth_largest(keys, k) == (int(kth), int((keys > kth).sum()), int((keys == kth).sum()))


def test_misleading_sample_falls_back_to_an_exact_answer(tiny_bracket):
    # Every sampled position (stride 312) holds a huge key, so the bracket misses.
    n = 5000
    keys = torch.arange(n, dtype=torch.int32)
    keys[::n // threshold._SAMPLE] = 10**9
    k = n // 2
    assert threshold._bracketed(keys, k) is None
    kth = torch.kthvalue(keys, n - k + 1).values
    assert kth_largest(keys, k)[0] == int(kth)
    assert torch.equal(keys_topk_mask(keys, k), reference_topk_mask(keys, k))


def _special_values(dtype, n, g):
    v = torch.randn(n, generator=g, dtype=torch.float64)
    v[::5] = 0.0
    v[1::5] = -0.0
    v[2::11] = float("inf")
    v[3::13] = -float("inf")
    v[4::17] = float("nan")
    v[::19] = -v[::19].abs()
    return v.to(dtype)


@pytest.mark.parametrize("bracket", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_topk_mask_matches_stable_sort_with_signed_zeros_infs_and_nans(dtype, bracket, monkeypatch):
    if bracket:
        monkeypatch.setattr(threshold, "_DIRECT", 64)
        monkeypatch.setattr(threshold, "_SAMPLE", 16)
    g = torch.Generator().manual_seed(2)
    v = _special_values(dtype, 3000, g)
    for k in (0, 1, 17, 600, 1500, 2999, 3000):
        got = topk_mask(v, k)
        assert int(got.sum()) == k
        assert torch.equal(got, reference_topk_mask(v, k)), k


@pytest.mark.parametrize("values", ["magnitudes", "ties"])
def test_magnitude_keys_order_like_the_floats(values, tiny_bracket):
    g = torch.Generator().manual_seed(3)
    v = torch.randn(4000, generator=g).abs()
    if values == "ties":
        v = torch.randint(0, 4, (4000,), generator=g).float()
        v[::7] = float("nan")
    keys = threshold.magnitude_keys(v.clone())
    for k in (1, 999, 2000, 3999):
        assert torch.equal(keys_topk_mask(keys, k), reference_topk_mask(v, k))


# -- the group's selection --------------------------------------------------------------
@pytest.mark.parametrize("bracket", [False, True])
@pytest.mark.parametrize("scope", ["global", "layerwise"])
@pytest.mark.parametrize("distribution,prune,lock", [("epl", 0.35, 0.35), ("erk", 0.3, 0.3),
                                                     ("epl", 0.0, 0.0), ("epl", 0.5, 0.0)])
def test_group_masks_equal_a_full_sort_over_the_concatenated_free_scores(
        bracket, scope, distribution, prune, lock, monkeypatch):
    if bracket:
        monkeypatch.setattr(threshold, "_DIRECT", 64)
        monkeypatch.setattr(threshold, "_SAMPLE", 16)
    model = timm_fslt.freeze(small_net(), prune=prune, lock=lock, distribution=distribution, scope=scope)
    group = timm_fslt.get_group(model)
    assert all(torch.equal(a, b) for a, b in zip(masks(model), reference_group_masks(group)))
    # ties across layers: a handful of distinct score magnitudes everywhere
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for layer in group.layers:
            layer.scores.copy_((torch.randint(-2, 3, layer.scores.shape, generator=g) * 0.5).float())
    model(torch.randn(2, 3, 8, 8))
    assert all(torch.equal(a, b) for a, b in zip(masks(model), reference_group_masks(group)))
    # and after real optimizer steps
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    opt = torch.optim.SGD(trainable(model), lr=0.5, momentum=0.9)
    for _ in range(2):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    model(x)
    assert all(torch.equal(a, b) for a, b in zip(masks(model), reference_group_masks(group)))


def test_dense_source_layers_need_no_free_index():
    model = timm_fslt.freeze(small_net(), prune=0.0, lock=0.0)
    assert all(layer.free_index().index is None for layer in timm_fslt.get_group(model).layers)
    model = timm_fslt.freeze(small_net(), prune=0.2, lock=0.2)
    for layer in timm_fslt.get_group(model).layers:
        index = layer.free_index().index
        assert index.dtype == torch.int32  # half the memory of int64
        assert torch.equal(index.long(), (layer.frozen.reshape(-1) == freezing.FREE).nonzero().squeeze(1))


def test_free_index_follows_a_rewritten_or_replaced_frozen_code():
    model = timm_fslt.freeze(small_net(), prune=0.3, lock=0.3)
    group = timm_fslt.get_group(model)
    layer = group.layers[1]
    g = torch.Generator().manual_seed(5)
    # rewritten in place (as load_state_dict does)
    new_code = torch.randint(-1, 2, layer.frozen.shape, generator=g).to(torch.int8)
    layer.frozen.copy_(new_code)
    with pytest.raises(RuntimeError, match=r"layer '2': scores has shape .* free weights"):
        group.refresh(force=True)  # the scores no longer fit: a clear error, not a wrong mask
    n_free = int((new_code == freezing.FREE).sum())
    layer._parameters["scores"] = nn.Parameter(torch.randn(n_free, generator=g))
    group.refresh(force=True)
    assert all(torch.equal(a, b) for a, b in zip(masks(model), reference_group_masks(group)))
    # replaced by a smaller tensor (as a channel pruner does), with scores and mask to match
    keep = torch.arange(0, layer.frozen.shape[0], 2)
    dense_scores = layer.scores_like_weight().index_select(0, keep)
    layer._buffers["frozen"] = layer.frozen.index_select(0, keep).contiguous()
    layer._buffers["mask"] = layer.mask.index_select(0, keep).contiguous()
    layer._parameters["scores"] = nn.Parameter(dense_scores[layer.frozen == freezing.FREE])
    group.refresh(force=True)
    assert all(torch.equal(a, b) for a, b in zip(masks(model), reference_group_masks(group)))


def test_a_mask_written_from_outside_is_repaired_at_the_next_refresh():
    model = timm_fslt.freeze(small_net(), prune=0.3, lock=0.3)
    group = timm_fslt.get_group(model)
    before = masks(model)
    for layer in group.layers:
        layer.mask.fill_(True)  # pruned positions now wrongly kept
    group.refresh(force=True)
    assert all(torch.equal(a, b) for a, b in zip(before, masks(model)))


def test_masked_weight_forward_allocates_only_the_product():
    # W * mask * scale with one weight-sized allocation, the output.  A binary op
    # mixing float and bool (``weight * mask``) would first make a float copy of
    # the mask inside TensorIterator, a second weight-sized temporary.
    from torch.utils._python_dispatch import TorchDispatchMode

    class Log(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.calls.append((func, [a for a in args if isinstance(a, torch.Tensor)], out))
            return out

    for scale in (None, "dynamic"):
        model = timm_fslt.freeze(small_net(), prune=0.3, lock=0.3, scale=scale)
        conv = model[2]
        sm = conv.parametrizations.weight[0]
        w = conv.parametrizations.weight.original
        with Log() as log:
            out = conv.weight
        new = [func for func, tensors, res in log.calls if isinstance(res, torch.Tensor)
               and res.numel() == w.numel() and res.untyped_storage().data_ptr()
               not in {t.untyped_storage().data_ptr() for t in tensors}]  # not in place, not a view
        # (copy_ converting the mask into the product's memory is not a temporary: it writes the output)
        mixed = [func for func, tensors, _ in log.calls if func is not torch.ops.aten.copy_.default
                 and len({t.dtype for t in tensors if t.dim() > 0}) > 1]
        assert len(new) == 1 and not mixed, log.calls
        torch.testing.assert_close(out, w * sm.mask * sm.scale, rtol=0, atol=0)
        del out, log  # nothing holds the product now: the next one is written into the same memory (CPU)
        with Log() as log:
            again = conv.weight
        assert not [func for func, tensors, res in log.calls if isinstance(res, torch.Tensor)
                    and res.numel() == w.numel() and res.untyped_storage().data_ptr()
                    not in {t.untyped_storage().data_ptr() for t in tensors}], log.calls
        torch.testing.assert_close(again, w * sm.mask * sm.scale, rtol=0, atol=0)


@pytest.mark.parametrize("bad", [float("inf"), -float("inf"), float("nan"), -float("nan")])
def test_the_finite_check_on_score_bits_catches_every_nonfinite_value(bad):
    model = timm_fslt.freeze(small_net(), prune=0.3, lock=0.3)
    layer = timm_fslt.get_group(model).layers[-1]
    with torch.no_grad():
        layer.free_scores[-1] = bad
    with pytest.raises(FloatingPointError, match=r"layer\(s\) 6"):
        model(torch.randn(2, 3, 8, 8))
    with torch.no_grad():
        layer.free_scores[-1] = torch.finfo(torch.float32).max
    model(torch.randn(2, 3, 8, 8))  # the largest finite score is fine


# -- the frozen code and the generator ---------------------------------------------------
def test_sort_free_frozen_code_equals_full_argsort_even_with_hash_ties(monkeypatch):
    # Make the hash low-entropy so many positions tie and ties straddle every cut.
    # (the torch path, whose hashes this patches; the compiled kernels' ties: tests/test_native.py)
    monkeypatch.setenv("TIMM_FSLT_KERNELS", "torch")
    monkeypatch.setattr(rng, "_hash_range",
                        lambda key, a, b, device: (torch.arange(a, b, dtype=torch.int64) * 7919 + key[0]) % 5)
    for shape, n_pruned, n_locked in [((40, 50), 700, 500), ((2000,), 1, 0), ((2000,), 0, 1999),
                                      ((3, 3, 3, 3), 20, 61), ((1000,), 400, 0)]:
        n = math.prod(shape)
        order = torch.argsort(rng.bits(0, "l", "freeze", n) * n + torch.arange(n))
        expected = torch.zeros(n, dtype=torch.int8)
        expected[order[:n_pruned]] = freezing.PRUNED
        expected[order[n_pruned:n_pruned + n_locked]] = freezing.LOCKED
        assert torch.equal(freezing.frozen_code(0, "l", shape, n_pruned, n_locked).reshape(-1), expected)


def _digest(t):
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]


def test_every_bit_of_long_streams_matches_the_original_generator():
    # Digests computed with the first (unchunked, out-of-place) implementation: the
    # speed-ups may not move one bit of a stored ticket's regenerated tensors.
    assert _digest(rng.bits(11, "blocks.0.conv", "weight", 300_001)) == "3811910eeeb8deea"
    assert _digest(rng.uniform(11, "blocks.0.conv", "weight", 300_001)) == "6511b34b646da21a"
    # (The version-1 normal stream's digest is not pinned: it goes through torch's float64
    # sqrt, which is not correctly rounded on every CPU -- on an Intel Xeon ~1% of its values
    # differ in the last bit -- so no digest of it holds everywhere; the test below bounds it.)
    # Version 2 computes the uniform and signed-constant weights as one exact integer times
    # the same constant, so both versions give the original bits.
    expected = {"kaiming_uniform": "b29b33fe16f23882", "signed_kaiming_constant": "4cd8265b00456b1c"}
    for kind, digest in expected.items():
        for version in (1, 2):
            weight = init.random_weight(kind, 4, "layer3.1.conv2", (96, 48, 3, 3), generator_version=version)
            assert _digest(weight) == digest, (kind, version)
    assert _digest(freezing.frozen_code(3, "features.3", (300, 700), 70000, 50000)) == "7bd6f7b0f0600587"
    assert _digest(freezing.frozen_code(3, "features.3", (300, 700), 0, 123)) == "84e11b68f3d3b654"
    assert _digest(freezing.frozen_code(3, "features.3", (300, 700), 210000, 0)) == "b03e25a7626a81c0"
    assert _digest(freezing.frozen_code(3, "features.3", (5, 7), 17, 18)) == "8d5f38ee0660fef1"


def _v1_normal_py(h_r: int, h_t: int) -> float:
    """Version 1's Box-Muller in Python floats (IEEE + - * /, correctly rounded sqrt): the
    same operations in the same order as rng._normal_v1, minus torch's sqrt."""
    def horner(z, coeffs):
        acc = z * coeffs[-1] + coeffs[-2]
        for c in reversed(coeffs[:-2]):
            acc = acc * z + c
        return acc
    u = (h_r + 0.5) * (1.0 / 4294967296.0)
    m, e = math.frexp(u)
    if m < rng._SQRT_HALF:
        m, e = m + m, e - 1
    z = (m - 1.0) / (m + 1.0)
    ln = float(e) * rng._LN2 + horner(z * z, rng._ATANH_COEFFS) * z * 2.0
    radius = math.sqrt(ln * -2.0)
    quadrant = h_t >> 30
    a = ((h_t & 0x3FFFFFFF) + 0.5) * (1.0 / 1073741824.0) * rng._HALF_PI
    a2 = a * a
    out = a * horner(a2, rng._SIN_COEFFS) if quadrant & 1 else horner(a2, rng._COS_COEFFS)
    if (quadrant ^ (quadrant >> 1)) & 1:
        out = -out
    return radius * out


def test_version_1_normal_is_within_2_ulp_of_its_correctly_rounded_evaluation():
    # What holds on every CPU: torch's float64 sqrt is within 1 ulp of the correctly
    # rounded one, so the product radius * cos is within 2 ulp of the Python evaluation.
    positions = torch.arange(0, 300_001, 149)
    got = rng.normal(11, "blocks.0.conv", "score", 300_001, positions=positions, version=1)
    h_r = rng.bits(11, "blocks.0.conv", "score/0", 300_001, positions=positions).tolist()
    h_t = rng.bits(11, "blocks.0.conv", "score/1", 300_001, positions=positions).tolist()
    ref = torch.tensor([_v1_normal_py(a, b) for a, b in zip(h_r, h_t)], dtype=torch.float64)
    assert (torch.sign(got) == torch.sign(ref)).all()
    ulps = (got.abs().view(torch.int64) - ref.abs().view(torch.int64)).abs()
    assert int(ulps.max()) <= 2
    assert float((ulps == 0).double().mean()) > 0.9  # (100% where sqrt is correctly rounded)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_weights_are_the_float64_values_rounded_via_float32(dtype):
    # float64 -> float32 -> dtype, each round-to-nearest-even (what torch's own float64 ->
    # bfloat16/float16 conversion does too; version 2 makes the float32 step explicit)
    view = torch.int16 if dtype != torch.float32 else torch.int32
    for version in (1, 2):
        for kind in init.WEIGHT_INITS:
            wide = init.random_weight(kind, 1, "conv", (16, 8, 3, 3), dtype=torch.float64,
                                        generator_version=version)
            narrow = init.random_weight(kind, 1, "conv", (16, 8, 3, 3), dtype=dtype, generator_version=version)
            assert narrow.dtype == dtype
            assert torch.equal(narrow.view(view), wide.to(torch.float32).to(dtype).view(view))
            assert torch.equal(narrow.view(view), wide.to(dtype).view(view))


# -- autocast, torch.compile, channels_last --------------------------------------------
def test_autocast_bf16_gives_the_same_masks_and_close_outputs():
    model = timm_fslt.freeze(small_net(), prune=0.3, lock=0.3, scale="dynamic")
    twin = copy.deepcopy(model)
    x = torch.randn(4, 3, 8, 8)
    ref = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        timm_fslt.get_group(twin).refresh(force=True)
        out = twin(x)
    assert out.dtype == torch.bfloat16
    assert all(torch.equal(a, b) for a, b in zip(masks(model), masks(twin)))
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)
    F.cross_entropy(out.float(), torch.zeros(4, dtype=torch.long)).backward()
    for layer in timm_fslt.get_group(twin).layers:
        assert layer.scores.grad is not None and layer.scores.grad.dtype == torch.float32


def test_compile_has_no_graph_break_per_layer_and_trains_like_eager():
    model = timm_fslt.freeze(small_net(), prune=0.3, lock=0.3, scale="static")
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count <= 1, explained.break_reasons  # at most the refresh hook
    eager, compiled = copy.deepcopy(model), copy.deepcopy(model)
    run = torch.compile(compiled, backend="aot_eager")
    opts = [torch.optim.SGD(trainable(m), lr=1.0, momentum=0.9) for m in (eager, compiled)]
    for _ in range(2):
        for net, opt in zip((eager, run), opts):
            F.cross_entropy(net(x), y).backward()
            opt.step()
            opt.zero_grad()
    torch.testing.assert_close(run(x), eager(x))
    assert all(torch.equal(a, b) for a, b in zip(masks(eager), masks(compiled)))
    assert any(not torch.equal(a, b) for a, b in zip(masks(model), masks(compiled)))  # masks did move


def test_channels_last_gives_the_same_outputs_and_masks():
    model = timm_fslt.freeze(small_net(), prune=0.3, lock=0.3)
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    layer = cl[0].parametrizations.weight[0]
    weight = cl[0].parametrizations.weight.original
    assert not weight.is_contiguous() and not layer.mask.is_contiguous()  # really channels_last
    assert layer.scores.dim() == 2 and layer.scores.shape[0] == 1  # (one row of free scores: no memory format)
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(cl(x.contiguous(memory_format=torch.channels_last)), model(x))
    # the backward gathers the strided weight gradient at the free positions in row-major order
    cl(x.contiguous(memory_format=torch.channels_last)).square().sum().backward()
    model(x).square().sum().backward()
    for a, b in zip(timm_fslt.get_group(model).layers, timm_fslt.get_group(cl).layers):
        torch.testing.assert_close(b.scores.grad, a.scores.grad)
    # new scores on both: the strided gather and mask write select exactly the same weights
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for a, b in zip(timm_fslt.get_group(model).layers, timm_fslt.get_group(cl).layers):
            a.scores.copy_(torch.randn(a.scores.shape, generator=g))
            b.scores.copy_(a.scores)
    torch.testing.assert_close(cl(x.contiguous(memory_format=torch.channels_last)), model(x))
    assert all(torch.equal(a, b) for a, b in zip(masks(model), masks(cl)))
    assert all(torch.equal(a, b) for a, b in zip(masks(cl), reference_group_masks(timm_fslt.get_group(cl))))
