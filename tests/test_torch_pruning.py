"""Frozen networks inside torch-pruning: DepGraph pruners, the structure record, importance, MACs."""
import copy
import functools
import json

import pytest
import timm
import torch
import torch_pruning as tp
from torch import nn

import timm_fslt
from timm_fslt.pruning.compact import restore_structure
from timm_fslt.pruning import torch_pruning as ftp
from timm_fslt.regen.init import random_weight
from timm_fslt.models.gin import gin


# -- model families (shared with test_compaction.py) ------------------------------------------
_ARCHS = {
    "timm_resnet18": lambda: timm.create_model("resnet18", channels=(8, 16, 32, 64), num_classes=10),
    "resnet18_cifar": lambda: timm.create_model("resnet18_cifar", width=0.25),
    "pyg_gin": lambda: gin(8, 4, hidden=16, num_layers=3),
}


@functools.lru_cache(maxsize=None)
def _pristine(arch, seed, items):
    return timm_fslt.freeze(_ARCHS[arch](), seed=seed, **dict(items))


def frozen(arch, seed=0, **freeze_kwargs):
    """A freshly frozen model (a copy of one frozen once per session: freezing costs more)."""
    kwargs = {"prune": 0.3, "lock": 0.3, **freeze_kwargs}
    return copy.deepcopy(_pristine(arch, seed, tuple(sorted(kwargs.items()))))


def timm_resnet(seed=0, **freeze_kwargs):
    return frozen("timm_resnet18", seed, **freeze_kwargs)


def cifar_resnet(seed=0, **freeze_kwargs):
    return frozen("resnet18_cifar", seed, **freeze_kwargs)


def small_gin(seed=0, **freeze_kwargs):
    return frozen("pyg_gin", seed, **freeze_kwargs)


def image(batch=2, size=16, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def graph(nodes=12, edges=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(nodes, 8, generator=g), torch.randint(0, nodes, (2, edges), generator=g)


FAMILIES = {
    "timm_resnet18": (timm_resnet, image, lambda m: m.fc),
    "resnet18_cifar": (cifar_resnet, image, lambda m: m.fc),
    "pyg_gin": (small_gin, graph, lambda m: [m.readout, m.convs[-1].nn[-1]]),
}


def run(model, inputs):
    return model(*inputs) if isinstance(inputs, tuple) else model(inputs)


def kill(layer, dim, channel):
    """Make one output (dim 0) or input (dim 1) channel of a frozen layer lose every kept weight,
    as a search that drove its scores to zero would (needs lock=0: locked weights stay kept)."""
    with torch.no_grad():
        supermask = layer.parametrizations.weight[0]
        scores = supermask.scores_like_weight()  # (scores hold the free weights only)
        scores.select(dim, channel).zero_()
        supermask.scores.copy_(scores[supermask.frozen == 0])


def frozen_layers(model):
    return dict(timm_fslt.iter_frozen(model))


def supermask(layer):
    return layer.parametrizations.weight[0]


def regenerated_weight(model, name):
    """The layer's random weight drawn again from the seed at its ORIGINAL shape, cut to the kept indices."""
    config = timm_fslt.get_config(model)
    entry = model.fslt_structure[name]
    full = random_weight(config.weight_init, config.seed, name, entry["source_shape"])
    for dim, kept in entry["kept"].items():
        full = full.index_select(int(dim), torch.tensor(kept))
    return full


def assert_group_consistent(model):
    """Every frozen tensor has the weight's shape, kinds and flags survive, masks meet the budget."""
    group = timm_fslt.get_group(model)
    state = model.state_dict()
    for name, layer in timm_fslt.iter_frozen(model):
        sm = supermask(layer)
        shape = tuple(layer.weight.shape)
        assert tuple(sm.frozen.shape) == tuple(sm.mask.shape) == shape
        assert tuple(sm.scores.shape) == (1, int((sm.frozen == 0).sum()))  # one per free weight, a row
        assert tuple(layer.parametrizations.weight.original.shape) == shape
        assert isinstance(sm.scores, nn.Parameter) and sm.scores.requires_grad
        assert f"{name}.parametrizations.weight.original" in dict(model.named_buffers())
        assert sm.frozen.dtype == torch.int8 and f"{name}.parametrizations.weight.0.mask" not in state
        counts = sm.counts()
        assert counts["numel"] == counts["pruned"] + counts["locked"] + counts["free"]
        assert not torch.any(sm.mask & (sm.frozen == -1)) and torch.all(sm.mask[sm.frozen == 1])
    assert sum(int(layer.mask.sum()) for layer in group.layers) == group.kept_target()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith("parametrizations.weight.0.scores") for n in trainable)


# -- DepGraph and MetaPruner on every family ----------------------------------------------------
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_metapruner_cuts_frozen_layers_consistently_and_records_the_cut(family):
    build, make_inputs, classifier = FAMILIES[family]
    model, inputs = build(), make_inputs()
    model.eval()  # BatchNorm statistics stay put; the graph tracing runs in eval mode anyway
    reference_shape = run(model, inputs).shape
    before = {n: tuple(l.weight.shape) for n, l in timm_fslt.iter_frozen(model)}
    scores_before = {n: supermask(l).scores_like_weight(float("nan")) for n, l in timm_fslt.iter_frozen(model)}
    pruner = tp.pruner.BasePruner(
        model, inputs, importance=ftp.SupermaskImportance(), pruning_ratio=0.25,
        ignored_layers=classifier(model) if isinstance(classifier(model), list) else [classifier(model)],
        **ftp.pruner_kwargs(model))
    pruner.step()

    out = run(model, inputs)
    assert out.shape == reference_shape
    after = {n: tuple(l.weight.shape) for n, l in timm_fslt.iter_frozen(model)}
    changed = {n for n in before if before[n] != after[n]}
    assert changed, "no frozen layer lost a channel"
    # structured pruning re-bases the ticket's sparsity on the weights that remain
    group = timm_fslt.get_group(model)
    assert group.kept_target() == round((1 - group.sparsity) * sum(l.numel for l in group.layers))
    assert_group_consistent(model)
    structure = json.loads(json.dumps(model.fslt_structure))  # JSON-serialisable as is
    assert changed <= set(structure)
    for name in changed:
        assert torch.equal(frozen_layers(model)[name].parametrizations.weight.original,
                           regenerated_weight(model, name))
        # every surviving free weight keeps its own score (cut like the weight, then free-ordered)
        expected = scores_before[name]
        for dim, kept in structure[name]["kept"].items():
            expected = expected.index_select(int(dim), torch.tensor(kept))
        sm = supermask(frozen_layers(model)[name])
        assert not expected[sm.frozen == 0].isnan().any()  # free before the cut, free after
        assert torch.equal(sm.free_scores.detach(), expected[sm.frozen == 0])
    out.float().pow(2).mean().backward()  # the search goes on in the smaller network
    assert all(supermask(l).scores.grad is not None for l in frozen_layers(model).values())


def test_plain_dependency_graph_accepts_the_pruners_and_prunes_a_group():
    model, inputs = small_gin(), graph()
    DG = tp.DependencyGraph().build_dependency(model, inputs, customized_pruners=ftp.pruners(model))
    layer = model.convs[0].nn[0]
    group = DG.get_pruning_group(layer, DG.get_pruner_of_module(layer).prune_out_channels, [1, 4])
    # the cut reaches the BatchNorm and the consuming Linear through the graph
    cut = {DG._module2name[dep.target.module] for dep, _ in group if isinstance(dep.target.module, nn.Module)
           and DG._module2name.get(dep.target.module)}
    assert {"convs.0.nn.0", "convs.0.nn.1", "convs.0.nn.3"} <= cut
    group.prune()
    assert layer.out_channels == 14 and model.convs[0].nn[1].num_features == 14
    assert model.convs[0].nn[3].in_channels == 14
    assert model.fslt_structure["convs.0.nn.0"]["kept"] == {"0": [0, 2, 3] + list(range(5, 16))}
    assert model.fslt_structure["convs.0.nn.1"]["kept"] == {"out": [0, 2, 3] + list(range(5, 16))}
    assert run(model, inputs).shape == (12, 4)
    assert_group_consistent(model)


def test_structure_composes_over_two_pruning_steps_and_regenerates_from_the_seed():
    model, inputs = timm_resnet(), image()
    pruner = tp.pruner.BasePruner(model, inputs, importance=ftp.SupermaskImportance("score"),
                                  pruning_ratio=0.5, iterative_steps=2, ignored_layers=[model.fc],
                                  **ftp.pruner_kwargs(model))
    pruner.step()
    pruner.step()
    kept = model.fslt_structure["layer1.0.conv1"]["kept"]["0"]
    assert len(kept) == 4 and kept == sorted(kept)  # 8 -> 6 -> 4, in original coordinates
    bn = model.fslt_structure["layer1.0.bn1"]
    assert bn["source_channels"] == {"out": 8} and bn["kept"]["out"] == kept

    fresh = restore_structure(timm_resnet(), json.loads(json.dumps(model.fslt_structure)))
    # (a copy of the same pristine model; regenerated_weight below redraws from the seed itself)
    cut, again = frozen_layers(model), frozen_layers(fresh)
    for name, layer in cut.items():
        assert torch.equal(layer.parametrizations.weight.original, again[name].parametrizations.weight.original)
        assert torch.equal(supermask(layer).frozen, supermask(again[name]).frozen)
        assert torch.equal(layer.parametrizations.weight.original, regenerated_weight(model, name))
    with torch.no_grad():  # the scores are what a ticket brings along (as mask bits)
        for name, layer in cut.items():
            supermask(again[name]).scores.copy_(supermask(layer).scores)
    model.eval(), fresh.eval()
    assert torch.equal(model(inputs), fresh(inputs))
    assert fresh.fslt_structure == model.fslt_structure


def test_depthwise_frozen_convs_follow_their_input_channels():
    def build():
        return timm_fslt.freeze(nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 4, 1, bias=False)), prune=0.3, lock=0.3)

    model, x = build(), image()
    DG = tp.DependencyGraph().build_dependency(model, x, customized_pruners=ftp.pruners(model))
    DG.get_pruning_group(model[0], DG.get_pruner_of_module(model[0]).prune_out_channels, [1, 6]).prune()
    kept = [0, 2, 3, 4, 5, 7]
    assert (model[3].in_channels, model[3].out_channels, model[3].groups) == (6, 6, 6)
    assert model.fslt_structure["3"]["kept"] == {"0": kept} and model.fslt_structure["6"]["kept"] == {"1": kept}
    assert model(x).shape == (2, 4, 16, 16)
    assert_group_consistent(model)
    fresh = restore_structure(build(), model.fslt_structure)
    assert torch.equal(fresh[3].parametrizations.weight.original, model[3].parametrizations.weight.original)


# -- importance ---------------------------------------------------------------------------------------
def test_supermask_importance_counts_kept_weights_of_producer_and_consumer():
    model = cifar_resnet(prune=0.5, lock=0.0, sparsity=0.8)
    conv1, conv2 = model.layer1[0].conv1, model.layer1[0].conv2
    kill(conv1, 0, 5)
    kill(conv2, 1, 5)
    timm_fslt.refresh_masks(model)
    DG = tp.DependencyGraph().build_dependency(model, image(), customized_pruners=ftp.pruners(model))
    group = DG.get_pruning_group(conv1, DG.get_pruner_of_module(conv1).prune_out_channels, list(range(16)))

    m1, m2 = supermask(conv1), supermask(conv2)
    kept = ftp.SupermaskImportance("kept")(group)
    expected = m1.mask.flatten(1).sum(1).float() + m2.mask.transpose(0, 1).flatten(1).sum(1).float()
    assert torch.equal(kept, expected)
    assert kept[5] == 0 and int(kept.argmin()) == 5

    dense1, dense2 = torch.zeros(m1.frozen.shape), torch.zeros(m2.frozen.shape)
    dense1[m1.frozen == 0] = m1.free_scores.detach().abs()  # scores of the free weights, row-major
    dense2[m2.frozen == 0] = m2.free_scores.detach().abs()
    score = ftp.SupermaskImportance("score")(group)
    expected = dense1.flatten(1).sum(1) + dense2.transpose(0, 1).flatten(1).sum(1)
    assert torch.allclose(score, expected)
    magnitude = ftp.SupermaskImportance("magnitude", normalizer="max")(group)
    assert magnitude.max() == 1 and magnitude[5] == 0


# -- operation counting -----------------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_frozen_layers_count_the_macs_of_the_equivalent_plain_layers(family):
    build, make_inputs, _ = FAMILIES[family]
    model, inputs = build(), make_inputs()
    plain = timm_fslt.materialize(model)
    macs, params = ftp.count_ops_and_params(model, inputs)
    assert (macs, params) == ftp.count_ops_and_params(plain, inputs)
    if family != "pyg_gin":  # torch-pruning counts every plain timm layer by itself
        assert (macs, params) == tp.utils.count_ops_and_params(plain, inputs)
    # torch-pruning alone matches hooks by exact type and misses every frozen layer
    assert tp.utils.count_ops_and_params(model, inputs)[0] < macs / 2
    # and forgets custom hooks after a call, so ours are set on every call
    assert ftp.count_ops_and_params(model, inputs)[0] == macs
    # per layer too: a frozen layer counts its weight, not its scores (which are fewer)
    _, _, _, frozen_params = ftp.count_ops_and_params(model, inputs, layer_wise=True)
    _, _, _, plain_params = ftp.count_ops_and_params(plain, inputs, layer_wise=True)
    plain_by_name = dict(plain.named_modules())
    for name, layer in timm_fslt.iter_frozen(model):
        assert supermask(layer).scores.numel() < layer.weight.numel()
        assert frozen_params[layer] == plain_params[plain_by_name[name]], name


# -- bad input ------------------------------------------------------------------------------------------
def test_pruners_refuse_a_model_that_is_not_frozen():
    with pytest.raises(ValueError, match="not frozen"):
        ftp.pruners(timm.create_model("resnet18", channels=(8, 16, 32, 64)))
    with pytest.raises(ValueError, match="not frozen"):
        ftp.pruner_kwargs(nn.Sequential(nn.Linear(3, 3)))


def test_pruners_refuse_a_frozen_layer_outside_the_models_group():
    model, other = small_gin(), small_gin(seed=1)
    model.readout = copy.deepcopy(other.readout)  # its FrozenSupermask belongs to the other model
    with pytest.raises(ValueError, match="not in the model's SupermaskGroup"):
        ftp.pruners(model)


def test_pruners_refuse_parameters_whose_cut_cannot_be_recorded():
    model = small_gin()
    model.gate = nn.Parameter(torch.ones(16))
    with pytest.raises(ValueError, match=r"\['gate'\] live outside conv, linear and norm"):
        ftp.pruners(model)


def test_pruners_refuse_grouped_frozen_convs():
    model = timm_fslt.freeze(nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.ReLU(), nn.Conv2d(8, 2, 1)))
    with pytest.raises(ValueError, match="'0' is a grouped convolution"):
        ftp.pruners(model)


def test_pruner_refuses_cuts_that_would_break_regeneration():
    model, other = small_gin(), small_gin(seed=1)
    pruner = ftp.pruners(model)[type(model.readout)]
    with pytest.raises(ValueError, match="not a module of the model"):
        pruner.prune_out_channels(other.readout, [0])
    with pytest.raises(ValueError, match="cannot remove all 4 channels"):
        pruner.prune_out_channels(model.readout, [0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"must lie in \[0, 16\)"):
        pruner.prune_in_channels(model.readout, [16])
    assert tuple(model.readout.weight.shape) == (4, 16) and getattr(model, "fslt_structure", None) is None


def test_importance_rejects_unknown_criteria():
    with pytest.raises(ValueError, match="criterion must be one of"):
        ftp.SupermaskImportance("gradient")
    with pytest.raises(ValueError, match="normalizer must be one of"):
        ftp.SupermaskImportance(normalizer="lamp")
