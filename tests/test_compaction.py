"""timm_fslt.compact: dead channels out, outputs and masks unchanged, regenerable from seed + structure."""
import copy
import json

import pytest
import torch

import timm_fslt
from timm_fslt.pruning.compact import compact, find_dead_channels, restore_structure
from timm_fslt.models.gin import gin
from test_torch_pruning import (
    cifar_resnet, frozen_layers, graph, image, kill, regenerated_weight, small_gin, supermask)


def kept_slice(tensor, entry):
    """The part of an original layer's tensor that the structure entry keeps."""
    for dim, kept in entry["kept"].items():
        tensor = tensor.index_select(int(dim), torch.tensor(kept))
    return tensor


def assert_same_outputs(model, compacted, inputs):
    model.eval(), compacted.eval()
    with torch.no_grad():
        a = model(*inputs) if isinstance(inputs, tuple) else model(inputs)
        b = compacted(*inputs) if isinstance(inputs, tuple) else compacted(inputs)
    assert a.shape == b.shape
    # removed channels contribute exact zeros; only the summation order of the rest may differ
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6 * max(1.0, a.abs().max().item()))


def assert_masks_unchanged(model, compacted):
    """The compacted ticket's masks are the original's at the kept coordinates, even after a refresh."""
    timm_fslt.refresh_masks(compacted)
    originals = frozen_layers(model)
    for name, layer in frozen_layers(compacted).items():
        entry = compacted.fslt_structure.get(name, {"kept": {}})
        assert torch.equal(supermask(layer).mask, kept_slice(supermask(originals[name]).mask, entry)), name


@pytest.fixture(scope="module")
def dead_resnet():
    """CIFAR ResNet-18 (width 1/4) whose search left three channels without kept weights.

    * layer1.0.conv2 reads nothing from input channel 3 -> rule "unread";
    * layer2.0.conv1 output 2 is empty and its BatchNorm maps 0 to 0 -> rule "zero";
    * layer1.1.conv1 output 5 is empty but its BatchNorm turns it into a nonzero
      constant that layer1.1.conv2 reads -> must stay.
    """
    model = cifar_resnet(prune=0.5, lock=0.0, sparsity=0.8)
    with torch.no_grad():  # BatchNorm statistics of live channels, as after a search
        model.train()
        model(image(batch=4, seed=1))
    kill(model.layer1[0].conv2, 1, 3)
    kill(model.layer1[1].conv1, 0, 5)
    kill(model.layer2[0].conv1, 0, 2)
    model.layer2[0].bn1.running_mean[2] = 0.0  # a channel dead all along keeps running mean 0
    timm_fslt.refresh_masks(model)
    model.eval()
    return model


def test_compact_removes_unread_and_zero_channels_with_identical_outputs(dead_resnet):
    model = dead_resnet
    before = copy.deepcopy(model.state_dict())
    assert find_dead_channels(model, image()) == {"layer1.0.conv1": {"unread": [3], "zero": []},
                                                  "layer2.0.conv1": {"unread": [], "zero": [2]}}
    compacted, report = compact(model, image())

    assert compacted.layer1[0].conv1.out_channels == 15 and compacted.layer1[0].bn1.num_features == 15
    assert compacted.layer1[0].conv2.in_channels == 15
    assert compacted.layer2[0].conv1.out_channels == 31 and compacted.layer2[0].conv2.in_channels == 31
    assert compacted.layer1[1].conv1.out_channels == 16  # its BatchNorm constant is read downstream
    assert compacted.fslt_structure["layer1.0.conv1"]["kept"] == {"0": [0, 1, 2] + list(range(4, 16))}
    assert compacted.fslt_structure["layer2.0.conv2"]["kept"] == {"1": [0, 1] + list(range(3, 32))}

    assert report["unread_channels"] == 1 and report["zero_channels"] == 1
    assert report["removed"] == {"layer1.0.conv1": {"0": 1}, "layer1.0.bn1": {"out": 1},
                                 "layer1.0.conv2": {"1": 1}, "layer2.0.conv1": {"0": 1},
                                 "layer2.0.bn1": {"out": 1}, "layer2.0.conv2": {"1": 1}}
    assert report["macs_after"] < report["macs_before"] and report["params_after"] < report["params_before"]
    # layer1.0.conv1's row 3 had kept weights nobody read, layer2.0.conv2's column 2 read only zeros
    lost = int(supermask(model.layer1[0].conv1).mask[3].sum() + supermask(model.layer2[0].conv2).mask[:, 2].sum())
    assert lost > 0 and report["kept_after"] == report["kept_before"] - lost

    assert_same_outputs(model, compacted, image(batch=3, size=16, seed=7))
    assert_masks_unchanged(model, compacted)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # original untouched


def test_compact_collapses_a_sparse_gin_and_keeps_its_outputs():
    model, inputs = small_gin(prune=0.9, lock=0.0, sparsity=0.95), graph()
    compacted, report = compact(model, inputs)
    # at 95% sparsity a 16-wide layer often leaves whole channels unread
    assert report["channels_removed"] > 10 and report["macs_after"] < report["macs_before"] / 2
    assert report["weights_after"] < report["weights_before"]
    assert_same_outputs(model, compacted, graph(nodes=30, edges=90, seed=5))
    assert_masks_unchanged(model, compacted)


@pytest.mark.parametrize("scope,scale", [("global", "static"), ("layerwise", "dynamic")])
def test_compaction_keeps_masks_and_scales_under_every_selection_rule(scope, scale):
    model, inputs = small_gin(prune=0.85, lock=0.05, sparsity=0.9, scope=scope, scale=scale), graph()
    compacted, report = compact(model, inputs)
    assert report["channels_removed"] > 0
    assert_masks_unchanged(model, compacted)
    originals = frozen_layers(model)
    for name, layer in frozen_layers(compacted).items():
        assert torch.equal(supermask(layer).scale, supermask(originals[name]).scale), name
    assert_same_outputs(model, compacted, inputs)


def test_compacted_ticket_regenerates_from_seed_and_structure():
    model, inputs = small_gin(prune=0.9, lock=0.0, sparsity=0.95, seed=5), graph()
    compacted, _ = compact(model, inputs)
    structure = json.loads(json.dumps(compacted.fslt_structure))  # what a ticket's config.json holds
    assert any(entry.get("removed_kept", 0) > 0 for entry in structure.values())  # budget carried over

    # a genuinely new model: built and frozen from the config, then cut as recorded
    fresh = timm_fslt.freeze(gin(8, 4, hidden=16, num_layers=3), config=timm_fslt.get_config(compacted))
    restore_structure(fresh, structure)
    cut, again = frozen_layers(compacted), frozen_layers(fresh)
    for name, layer in cut.items():
        assert torch.equal(again[name].parametrizations.weight.original, layer.parametrizations.weight.original)
        assert torch.equal(supermask(again[name]).frozen, supermask(layer).frozen)
        if name in structure:
            assert torch.equal(layer.parametrizations.weight.original, regenerated_weight(compacted, name))
    # the ticket's mask bits go in as scores; the restored budget gives back exactly these masks
    with torch.no_grad():
        for name, layer in cut.items():
            sm = supermask(layer)  # (scores: the free weights only)
            supermask(again[name]).scores.copy_(sm.mask[sm.frozen == 0].float())
        for name, buffer in compacted.named_buffers():
            if "running" in name:
                fresh.get_buffer(name).copy_(buffer)
    timm_fslt.refresh_masks(fresh)
    for name, layer in cut.items():
        assert torch.equal(supermask(again[name]).mask, supermask(layer).mask), name
    assert_same_outputs(compacted, fresh, inputs)
    assert fresh.fslt_structure == structure


def test_compacted_gin_ticket_saves_and_reloads_with_identical_outputs(tmp_path):
    # BatchNorm entries and the carried-over budget go through the real ticket files
    # (a Conv6 round trip, without either, is in test_ticket.py)
    model, inputs = small_gin(prune=0.9, lock=0.0, sparsity=0.95, seed=5), graph()
    with torch.no_grad():  # BatchNorm statistics a ticket must store
        model.train()
        model(*graph(seed=2))
    compacted, _ = compact(model, inputs)
    kwargs = {"in_channels": 8, "num_classes": 4, "hidden": 16, "num_layers": 3}
    directory = timm_fslt.save_ticket(compacted, tmp_path / "ticket",
                                      architecture={"builder": "timm_fslt.models.gin:gin", "kwargs": kwargs})
    loaded = timm_fslt.load_ticket(directory)
    assert loaded.fslt_structure == compacted.fslt_structure
    for name, layer in frozen_layers(compacted).items():
        assert torch.equal(supermask(frozen_layers(loaded)[name]).mask, supermask(layer).mask), name
    compacted.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(*inputs), compacted(*inputs))


# -- bad input ------------------------------------------------------------------------------------
def test_compact_and_restore_refuse_models_that_are_not_frozen():
    plain = gin(8, 4, hidden=16, num_layers=3)
    with pytest.raises(ValueError, match="not frozen"):
        compact(plain, graph())
    with pytest.raises(ValueError, match="not frozen"):
        restore_structure(plain, {"readout": {"type": "Linear", "frozen": True, "source_shape": [4, 16],
                                              "kept": {"1": [0, 1]}}})
    with pytest.raises(ValueError, match="max_rounds must be a positive int"):
        compact(small_gin(), graph(), max_rounds=0)


def test_restore_rejects_structures_that_do_not_fit_and_changes_nothing():
    model = small_gin()
    good = {"type": "Linear", "frozen": True, "source_shape": [4, 16], "kept": {"1": [0, 2, 5]},
            "removed_numel": 0, "removed_kept": 0}
    bn = {"type": "BatchNorm1d", "frozen": False, "source_channels": {"out": 16}, "kept": {"out": [0]}}
    cases = [
        ([], "must be a dict"),
        ({"head": good}, "does not have"),
        ({"readout": {**good, "source_shape": [4, 32]}}, "has weight shape"),
        ({"readout": {**good, "type": "Conv2d"}}, "is a Conv2d, the model has a Linear"),
        ({"readout": {**good, "kept": {"1": [5, 2]}}}, "increasing"),
        ({"readout": {**good, "kept": {"1": [0, 16]}}}, r"lie in \[0, 16\)"),
        ({"readout": {**good, "kept": {"2": [0]}}}, "holds no channels"),
        ({"readout": good, "norms.0": {**bn, "kept": {"in": [0]}}}, "unknown channel axis"),
        ({"readout": good, "norms.0": {**bn, "source_channels": {"out": 8}}}, "recorded on 8"),
    ]
    for structure, message in cases:
        with pytest.raises(ValueError, match=message):
            restore_structure(model, structure)
        assert tuple(model.readout.weight.shape) == (4, 16) and model.norms[0].num_features == 16
        assert getattr(model, "fslt_structure", None) is None

    restore_structure(model, {"readout": good})
    with pytest.raises(ValueError, match="already has channels removed"):
        restore_structure(model, {"readout": good})


def test_compact_raises_and_keeps_the_model_when_a_removal_would_change_outputs(monkeypatch):
    import timm_fslt.pruning.compact as compaction

    model, inputs = small_gin(), graph()
    # pretend channel 0 of every group is unread: the final output check must catch it
    monkeypatch.setattr(compaction, "_analyse", lambda group, *args: ({0}, set()))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="without changing the model's outputs"):
        compact(model, inputs, max_rounds=1)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
