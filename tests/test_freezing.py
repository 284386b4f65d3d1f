"""Exact pruned / locked / kept counts for every distribution and scope."""
import math

import pytest
import torch
from torch import nn

import timm_fslt
from timm_fslt.regen import pattern as freezing

from regen_reference import reference_topk_mask, topk_mask


def small_net():
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3, groups=2), nn.ReLU(),
                         nn.Flatten(), nn.LazyLinear(10))


def built_net():
    net = small_net()
    net(torch.zeros(1, 3, 8, 8))  # materialise the lazy layer
    return net


@pytest.mark.parametrize("distribution", freezing.DISTRIBUTIONS)
@pytest.mark.parametrize("scope", ["global", "layerwise"])
@pytest.mark.parametrize("prune,lock", [(0.0, 0.0), (0.5, 0.0), (0.35, 0.35), (0.2, 0.6), (0.45, 0.45)])
def test_counts_are_exact(distribution, scope, prune, lock):
    net = timm_fslt.freeze(built_net(), prune=prune, lock=lock, distribution=distribution, scope=scope)
    group = timm_fslt.get_group(net)
    shapes = [tuple(layer.frozen.shape) for layer in group.layers]
    expected = freezing.frozen_counts(shapes, prune, lock, distribution)
    total = sum(math.prod(s) for s in shapes)
    for layer, (n_pruned, n_locked) in zip(group.layers, expected):
        c = layer.counts()
        assert (c["pruned"], c["locked"]) == (n_pruned, n_locked)
        # frozen weights keep their fate: pruned never kept, locked always kept
        assert not layer.mask[layer.frozen == freezing.PRUNED].any()
        assert layer.mask[layer.frozen == freezing.LOCKED].all()
    report = timm_fslt.size_report(net)
    sparsity = (prune + 1 - lock) / 2
    if scope == "global":
        assert report.kept == freezing.round_half_up((1 - sparsity) * total)
    else:
        for layer in group.layers:
            c = layer.counts()
            want = freezing.round_half_up((1 - sparsity) * c["numel"])
            assert c["kept"] == min(max(want, c["locked"]), c["locked"] + c["free"])
    if distribution == "epl":
        assert abs(report.pruned - prune * total) <= len(shapes)
        assert abs(report.locked - lock * total) <= 2 * len(shapes)


@pytest.mark.parametrize("distribution", ["erk", "igq"])
def test_nonuniform_distributions_hit_the_overall_ratio_and_vary_per_layer(distribution):
    shapes = [(64, 3, 3, 3), (128, 64, 3, 3), (256, 128, 3, 3), (10, 4096)]
    counts = freezing.frozen_counts(shapes, 0.4, 0.3, distribution)
    total = sum(math.prod(s) for s in shapes)
    pruned = sum(c[0] for c in counts)
    frozen = sum(c[0] + c[1] for c in counts)
    assert abs(pruned / total - 0.4) < 0.01
    assert abs(frozen / total - 0.7) < 0.01
    fractions = [c[0] / math.prod(s) for c, s in zip(counts, shapes)]
    assert max(fractions) - min(fractions) > 0.1  # not just epl again
    assert fractions[0] < fractions[2]  # small layers are pruned less


def test_frozen_positions_are_a_uniform_exact_subset():
    code = freezing.frozen_code(0, "layer", (200, 50), 3000, 4000)
    assert int((code == -1).sum()) == 3000 and int((code == 1).sum()) == 4000
    # uniformly spread: each row gets about 30% pruned
    per_row = (code == -1).float().mean(1)
    assert abs(per_row.mean() - 0.3) < 1e-6 and per_row.std() < 0.1


def test_sparse_source_prunes_the_same_positions_as_frozen_source():
    a = freezing.frozen_code(1, "l", (64, 64), 1000, 0)
    b = freezing.frozen_code(1, "l", (64, 64), 1000, 1500)
    assert torch.equal(a == -1, b == -1)


@pytest.mark.parametrize("case", ["random", "ties", "all_equal", "extreme", "zeros_and_inf"])
@pytest.mark.parametrize("k", [0, 1, 7, 500, 999, 1000])
def test_topk_selection_equals_stable_sort_reference(case, k):
    g = torch.Generator().manual_seed(k)
    n = 1000
    if case == "random":
        v = torch.randn(n, generator=g)
    elif case == "ties":
        v = torch.randint(0, 5, (n,), generator=g).float()
    elif case == "all_equal":
        v = torch.full((n,), 0.25)
    elif case == "extreme":
        v = torch.randn(n, generator=g) * 1e30
        v[::7] = torch.finfo(torch.float32).tiny
    else:
        v = torch.zeros(n)
        v[::3] = float("inf")
    got = topk_mask(v, k)
    assert int(got.sum()) == k
    assert torch.equal(got, reference_topk_mask(v, k))


def test_kept_count_is_exact_when_all_scores_tie():
    net = timm_fslt.freeze(built_net(), prune=0.2, lock=0.2, sparsity=0.5)
    with torch.no_grad():
        for layer in timm_fslt.get_group(net).layers:
            layer.scores.fill_(1.0)
    net(torch.zeros(1, 3, 8, 8))
    report = timm_fslt.size_report(net)
    assert report.kept == freezing.round_half_up(0.5 * report.params)


def test_dense_source_and_sparse_source_special_cases():
    dense = timm_fslt.freeze(built_net(), prune=0.0, lock=0.0, sparsity=0.5)
    r = timm_fslt.size_report(dense)
    assert r.pruned == 0 and r.locked == 0 and r.free == r.params and r.mask_bits == r.params
    assert r.compression_vs_dense_source == pytest.approx(1.0)
    sparse = timm_fslt.freeze(built_net(), prune=0.5, lock=0.0)  # default sparsity = middle = 0.75
    r = timm_fslt.size_report(sparse)
    assert r.locked == 0 and r.sparsity == pytest.approx(0.75, abs=1e-3)
    assert r.mask_compression_vs_dense_source == pytest.approx(2.0, rel=0.01)


def test_seventy_percent_freezing_gives_three_point_three_x_fewer_mask_bits():
    import timm
    net = timm_fslt.freeze(timm.create_model("resnet18_cifar", width=0.25), prune=0.35, lock=0.35)
    r = timm_fslt.size_report(net)
    assert r.mask_compression_vs_dense_source == pytest.approx(1 / 0.3, rel=0.01)
    # BatchNorm running statistics are not regenerable and are counted
    assert r.state_bits > 0 and any("running_mean" in k for k in r.state_tensors)
    assert r.ticket_bits == r.free + r.state_bits
    text = str(r)
    assert "ticket size" in text and "layer1.0.conv1" in text
