"""A ticket rebuilds the exact architecture (#14).

Every creation argument is recorded (``timm_fslt.create_model``) or read off a plain timm
model; before a ticket is written the record is built and compared with the model: every
tensor under every name (a shared module under each), every module, attribute and unsaved
buffer value. What cannot be read off is refused, naming the argument. Builders that need
real tensors at construction (PNA's degree histogram, lazy layers) save and load.
All at tiny sizes, one thread.
"""
import json
import time

import pytest
import timm
import torch
from torch import nn

import timm_fslt
from helpers import fit
from timm_fslt.errors import ArchitectureError, TicketError
from timm_fslt.ticket.architecture import build_architecture, build_for_check
from timm_fslt.ticket.rebuild_check import rebuild_problems


pytestmark = pytest.mark.usefixtures("one_thread")


def _frozen(model, seed=0):
    return timm_fslt.freeze(model, prune=0.3, lock=0.3, seed=seed)


def _round_trip(model, inputs, directory, target=None, loss_fn=None, **save):
    """One search step, save, load: the loaded model's outputs are bit-identical. Returns the
    config and the loaded model."""
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    model.train()
    out = model(*inputs)
    if target is None:
        target = torch.zeros(out.shape[0], dtype=torch.long)
    fit(model, inputs if len(inputs) > 1 else inputs[0], target, steps=1, lr=0.5, loss_fn=loss_fn)
    model.eval()
    with torch.no_grad():
        out = model(*inputs)
    timm_fslt.save_ticket(model, directory, **save)
    loaded = timm_fslt.load_ticket(directory)
    with torch.no_grad():
        assert torch.equal(loaded(*inputs), out)
    document = json.loads((directory / "config.json").read_text())
    config = document["timm_fslt"]
    # format 4: timm's keys describe the same network as our record
    name = config["architecture"].get("timm") or "timm_fslt-builder/" + config["architecture"]["builder"]
    assert document["architecture"] == name
    assert document.get("model_args", {}) == config["architecture"]["kwargs"]
    return config, loaded


def _buffers(model):
    return {name: buffer for name, buffer in model.named_buffers(remove_duplicate=False)
            if "parametrizations" not in name and not name.endswith("num_batches_tracked")}


# -- every creation argument is recorded or read off the model -------------------------------

SMALL = dict(img_size=64, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))


@pytest.mark.parametrize("name, kwargs", [
    ("swinv2_tiny_window16_256", SMALL),
    ("swinv2_cr_tiny_224", SMALL),
    ("test_vit_relpos", dict(img_size=64)),
])
def test_plain_timm_model_keeps_its_img_size_and_every_other_argument(name, kwargs, tmp_path):
    # Before: save_ticket inferred name(num_classes=10, in_chans=3), and the model reloaded at 256/224/160 px.
    model = _frozen(timm.create_model(name, num_classes=10, **kwargs))
    config, loaded = _round_trip(model, torch.randn(2, 3, 64, 64), tmp_path / "t")
    recorded = config["architecture"]
    assert recorded["timm"] == name
    assert recorded["kwargs"] == {**json.loads(json.dumps(kwargs)), "num_classes": 10, "in_chans": 3}
    # The size-dependent unsaved buffers (relative_position_index, relative_coords_table, attn_mask) are the model's.
    mine, theirs = _buffers(model), _buffers(loaded)
    assert mine.keys() == theirs.keys() and any("relative" in n or "attn_mask" in n for n in mine)
    assert all(torch.equal(mine[n], theirs[n]) for n in mine)


def test_without_timms_record_img_size_is_read_from_the_model(tmp_path):
    # timm before 1.0.2x records no creation arguments: img_size comes from patch_embed.img_size.
    model = timm.create_model("test_vit_relpos", num_classes=10, img_size=64)
    del model._model_args, model._traits
    config, _ = _round_trip(_frozen(model), torch.randn(2, 3, 64, 64), tmp_path / "t")
    assert config["architecture"] == {"timm": "test_vit_relpos",
                                      "kwargs": {"num_classes": 10, "in_chans": 3, "img_size": 64}}


def test_an_argument_that_cannot_be_read_off_is_refused_and_named(tmp_path):
    model = timm.create_model("test_vit_relpos", num_classes=10, img_size=64, depth=1)
    del model._model_args, model._traits  # as timm before 1.0.2x: depth=1 shows nowhere but in the tensors
    _frozen(model)
    with pytest.raises(ArchitectureError, match=r"cannot infer the architecture unambiguously: timm's pretrained_cfg "
                                                r"names timm test_vit_relpos\(num_classes=10, in_chans=3, img_size=64\), "
                                                r"but it has tensors the model does not have: 'blocks\.1\..*; "
                                                r"it was built with an argument the record lacks \(one of patch_size, "
                                                r"global_pool, embed_dim, depth, .*\); pass architecture=\{'timm'.*"
                                                r"timm_fslt\.create_model"):
        timm_fslt.save_ticket(model, tmp_path / "t")
    assert not (tmp_path / "t").exists()


def test_a_record_missing_img_size_is_refused_by_the_unsaved_buffers(tmp_path):
    # The old check compared masked layers and stored state only: this record passed it.
    model = _frozen(timm.create_model("test_vit_relpos", num_classes=10, img_size=64))
    with pytest.raises(ArchitectureError, match=r"architecture= timm test_vit_relpos\(num_classes=10\) does not "
                                                r"rebuild this model: its 'blocks\.0\.attn\.rel_pos\.relative_position"
                                                r"_index' has shape \(10000,\), the model's \(256,\)"):
        timm_fslt.save_ticket(model, tmp_path / "t", architecture={"timm": "test_vit_relpos",
                                                                   "kwargs": {"num_classes": 10}})


def test_a_model_changed_after_creation_is_refused_until_the_record_says_so(tmp_path):
    model = timm_fslt.create_model("test_vit", num_classes=10, img_size=32, depth=1)
    model.set_input_size(img_size=64)
    _frozen(model)
    with pytest.raises(ArchitectureError, match=r"model\.fslt_architecture timm test_vit\(num_classes=10, img_size=32, "
                                                r"depth=1\) does not rebuild this model: its 'pos_embed' has shape "
                                                r"\(1, 5, 64\), the model's \(1, 17, 64\).*set_input_size"):
        timm_fslt.save_ticket(model, tmp_path / "t")
    arch = {"timm": "test_vit", "kwargs": {"num_classes": 10, "img_size": 64, "depth": 1}}
    config, _ = _round_trip(model, torch.randn(2, 3, 64, 64), tmp_path / "t", architecture=arch)
    assert config["architecture"] == arch
    # A plain timm model records the change itself (timm's traits): it saves without help.
    plain = timm.create_model("test_vit", num_classes=10, img_size=32, depth=1)
    plain.set_input_size(img_size=64)
    config, _ = _round_trip(_frozen(plain), torch.randn(2, 3, 64, 64), tmp_path / "plain")
    assert config["architecture"]["kwargs"]["img_size"] in (64, [64, 64])


def test_drop_rates_are_recorded_and_never_guessed(tmp_path):
    model = timm.create_model("test_vit", num_classes=10, img_size=32, depth=2, drop_path_rate=0.1)
    config, _ = _round_trip(_frozen(model), torch.randn(2, 3, 32, 32), tmp_path / "t")
    assert config["architecture"]["kwargs"]["drop_path_rate"] == 0.1
    old = timm.create_model("test_vit", num_classes=10, img_size=32, depth=2, drop_path_rate=0.1)
    del old._model_args, old._traits
    with pytest.raises(ArchitectureError, match=r"cannot infer the architecture unambiguously"):
        timm_fslt.save_ticket(_frozen(old), tmp_path / "old")


def test_a_creation_argument_that_is_not_json_is_named(tmp_path):
    model = _frozen(timm.create_model("test_vit", num_classes=10, img_size=32, depth=1, act_layer=nn.GELU))
    with pytest.raises(ArchitectureError, match=r"cannot record how this test_vit was built: its creation argument "
                                                r"act_layer=<class 'torch\.nn\.modules\.activation\.GELU'> is not JSON"):
        timm_fslt.save_ticket(model, tmp_path / "t")
    recorded = _frozen(timm_fslt.create_model("test_vit", num_classes=10, img_size=32, depth=1, act_layer=nn.GELU))
    with pytest.raises(TicketError, match=r"model\.fslt_architecture\['kwargs'\]\['act_layer'\] must be "
                                          r"JSON-serialisable"):
        timm_fslt.save_ticket(recorded, tmp_path / "t")
    # By its name it is JSON, and the ticket records it.
    named = _frozen(timm_fslt.create_model("test_vit", num_classes=10, img_size=32, depth=1, act_layer="gelu"))
    config, _ = _round_trip(named, torch.randn(2, 3, 32, 32), tmp_path / "t")
    assert config["architecture"]["kwargs"]["act_layer"] == "gelu"


@pytest.mark.parametrize("in_chans", [3, 1])
def test_tresnet_in_chans_is_the_models_not_its_first_convs(in_chans, tmp_path):
    # TResNet's space-to-depth stem: its first conv sees 16 x in_chans channels (the old inference guessed 48).
    model = timm.create_model("tresnet_m", num_classes=10, in_chans=in_chans, layers=[1, 1, 1, 1], width_factor=0.25)
    assert model.get_submodule(model.pretrained_cfg["first_conv"]).in_channels == 16 * in_chans
    config, _ = _round_trip(_frozen(model), torch.randn(2, in_chans, 64, 64), tmp_path / "t")
    assert config["architecture"]["kwargs"]["in_chans"] == in_chans


# -- shared modules ------------------------------------------------------------------------

def test_coat_shares_its_position_encodings_and_round_trips(tmp_path):
    # coat's cpe/crpe modules are shared between blocks: one module object under several names.
    model = timm.create_model("coat_tiny", num_classes=10, img_size=64, embed_dims=(16, 16, 16, 16),
                              serial_depths=(2, 1, 1, 1), parallel_depth=1, num_heads=8)
    assert model.serial_blocks1[0].cpe is model.serial_blocks1[1].cpe
    _, loaded = _round_trip(_frozen(model), torch.randn(2, 3, 64, 64), tmp_path / "t")
    assert loaded.serial_blocks1[0].cpe is loaded.serial_blocks1[1].cpe is loaded.cpe1


class _Block(nn.Module):
    def __init__(self, width, window):
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        # Not saved with the model: a ticket rebuilds it from the architecture.
        self.register_buffer("index", torch.arange(width) % window, persistent=False)

    def forward(self, x):
        return self.conv(x)[:, self.index].relu()


class _SharedNet(nn.Module):
    def __init__(self, width=8, window=3, share=True):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.a = _Block(width, window)
        self.b = self.a if share else _Block(width, window)
        self.norm = nn.BatchNorm2d(width)
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        return self.head(self.norm(self.b(self.a(self.stem(x)))).mean((2, 3)))


timm_fslt.register_builder("test_arch_shared", _SharedNet, replace=True)


def test_a_hand_written_shared_module_round_trips_and_its_sharing_is_checked(tmp_path):
    model = _frozen(_SharedNet())
    arch = {"builder": "test_arch_shared", "kwargs": {}}
    _, loaded = _round_trip(model, torch.randn(2, 3, 8, 8), tmp_path / "t", architecture=arch)
    assert loaded.a is loaded.b
    with pytest.raises(ArchitectureError, match=r"architecture= builder test_arch_shared\(share=False\) does not "
                                                r"rebuild this model: in the model 'b' is the module 'a' \(shared\), "
                                                r"in the rebuilt one a module of its own"):
        timm_fslt.save_ticket(model, tmp_path / "t", architecture={"builder": "test_arch_shared",
                                                                   "kwargs": {"share": False}})


def test_an_unsaved_buffer_with_other_values_is_refused(tmp_path):
    # Same tensors, same shapes: only the values of the unsaved buffer 'a.index' differ.
    model = _frozen(_SharedNet(window=3))
    with pytest.raises(ArchitectureError, match=r"builder test_arch_shared\(window=4\) does not rebuild this model: "
                                                r"its buffer 'a\.index' holds other values than the model's"):
        timm_fslt.save_ticket(model, tmp_path / "t", architecture={"builder": "test_arch_shared",
                                                                   "kwargs": {"window": 4}})
    assert not (tmp_path / "t").exists()


# -- builders that need real tensors: PNA's degree histogram, lazy layers ------------------------

def _pna(deg=(0, 2, 5, 1), hidden=8):
    from torch_geometric.nn.models import PNA
    # PNAConv reads the histogram in its constructor: on the meta device that raises.
    return PNA(4, hidden, num_layers=2, out_channels=3, aggregators=["mean", "max"],
               scalers=["identity", "amplification"], deg=torch.tensor(deg))


timm_fslt.register_builder("test_arch_pna", _pna, replace=True)


def _graph():
    g = torch.Generator().manual_seed(0)
    edge_index = torch.randint(0, 12, (2, 30), generator=g)
    return torch.randn(12, 4, generator=g), edge_index


def test_pna_with_its_degree_histogram_as_a_builder_argument_saves_and_loads(tmp_path):
    arch = {"builder": "test_arch_pna", "kwargs": {"deg": [0, 3, 4, 2]}}
    with torch.device("meta"), pytest.raises(RuntimeError):
        _pna([0, 3, 4, 2])
    counted = build_for_check(arch)  # meta raises: built again on the CPU
    assert {p.device.type for p in counted.parameters()} == {"cpu"}
    model = _frozen(build_architecture(arch))
    x, edge_index = _graph()
    config, _ = _round_trip(model, (x, edge_index), tmp_path / "t", architecture=arch,
                            target=torch.zeros(12, dtype=torch.long))
    assert config["architecture"] == arch
    with pytest.raises(ArchitectureError, match=r"builder test_arch_pna\(deg=\[0, 3, 5, 2\]\) does not rebuild"):
        timm_fslt.save_ticket(model, tmp_path / "t2", architecture={"builder": "test_arch_pna",
                                                                    "kwargs": {"deg": [0, 3, 5, 2]}})


class _LazyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.LazyLinear(16)
        self.b = nn.LazyLinear(4)

    def forward(self, x):
        return self.b(self.a(x).relu())


def _lazy(in_features=6, forward=True):
    model = _LazyNet()
    if forward:  # the documented way: one forward on a dummy input initialises the lazy layers
        model(torch.zeros(1, in_features))
    return model


timm_fslt.register_builder("test_arch_lazy", _lazy, replace=True)


def test_a_builder_initialising_lazy_layers_by_a_forward_saves_and_loads(tmp_path):
    arch = {"builder": "test_arch_lazy", "kwargs": {"in_features": 6}}
    model = _frozen(build_architecture(arch))
    config, loaded = _round_trip(model, torch.randn(5, 6), tmp_path / "t", architecture=arch)
    assert loaded.a.weight.shape == (16, 6)
    with pytest.raises(ArchitectureError, match=r"builder test_arch_lazy\(in_features=6, forward=False\) does not "
                                                r"rebuild this model: its 'a\.weight' is an uninitialised lazy "
                                                r"parameter: the builder must run one forward"):
        timm_fslt.save_ticket(model, tmp_path / "t2", architecture={"builder": "test_arch_lazy",
                                                                    "kwargs": {"in_features": 6, "forward": False}})


def _fails(**kwargs):
    raise RuntimeError("no such network")


def _slow_and_meta_shy(seconds=0.6):
    time.sleep(seconds)
    if torch.empty(0).is_meta:
        raise RuntimeError("needs real tensors")
    return nn.Linear(2, 2)


timm_fslt.register_builder("test_arch_fails", _fails, replace=True)
timm_fslt.register_builder("test_arch_slow", _slow_and_meta_shy, replace=True)


def test_only_an_error_on_the_cpu_is_the_records_and_the_retry_shares_the_seconds():
    with pytest.raises(ArchitectureError, match=r"builder test_arch_fails\(\) could not be built: RuntimeError: "
                                                r"no such network"):
        build_for_check({"builder": "test_arch_fails"})
    assert isinstance(build_for_check({"builder": "test_arch_slow", "kwargs": {"seconds": 0.05}}), nn.Linear)
    # Each attempt alone stays under the limit; the retry on the CPU counts from the first.
    with pytest.raises(ArchitectureError, match=r"took more than max_build_seconds=1 s"):
        build_for_check({"builder": "test_arch_slow", "kwargs": {"seconds": 0.6}}, max_seconds=1.0)


# -- what a forward changes, and containers whose repr lists their entries ------------------------

class _RGCNStack(nn.Module):
    def __init__(self, aggr="mean"):
        super().__init__()
        from torch_geometric.nn import FastRGCNConv
        self.convs = nn.ModuleList([FastRGCNConv(4, 8, num_relations=2, aggr=aggr),
                                    FastRGCNConv(8, 3, num_relations=2, aggr=aggr)])

    def forward(self, x, edge_index, edge_type):
        return self.convs[1](self.convs[0](x, edge_index, edge_type).relu(), edge_index, edge_type)


timm_fslt.register_builder("test_arch_fast_rgcn", _RGCNStack, replace=True)


def test_a_kernel_switch_a_forward_flips_is_not_architecture(tmp_path):
    # FastRGCNConv.forward sets self.fuse = False (MessagePassing's fused-kernel switch): after one forward
    # the check refused "its convs.0.fuse is True, the model's False".
    x, edge_index = _graph()
    edge_type = torch.arange(edge_index.shape[1]) % 2
    model = _frozen(build_architecture({"builder": "test_arch_fast_rgcn", "kwargs": {}}))
    model(x, edge_index, edge_type)
    assert model.convs[0].fuse is False and _RGCNStack().convs[0].fuse is True
    _round_trip(model, (x, edge_index, edge_type), tmp_path / "t", target=torch.zeros(12, dtype=torch.long),
                architecture={"builder": "test_arch_fast_rgcn", "kwargs": {}})
    # Only that switch: another plain attribute of the same convs (same tensors, other aggr) is still refused.
    with pytest.raises(ArchitectureError, match=r"builder test_arch_fast_rgcn\(aggr='add'\) does not rebuild this "
                                                r"model: its convs\.0\.aggr is 'add', the model's 'mean'"):
        timm_fslt.save_ticket(model, tmp_path / "t2", architecture={"builder": "test_arch_fast_rgcn",
                                                                    "kwargs": {"aggr": "add"}})


_METADATA = (["a", "b"], [("a", "to", "b"), ("b", "to", "a")])


class _HeteroNet(nn.Module):
    def __init__(self, conv="HGTConv"):
        super().__init__()
        import torch_geometric.nn as G
        make = getattr(G, conv)
        self.convs = nn.ModuleList([make(4, 8, _METADATA, heads=2), make(8, 4, _METADATA, heads=2)])

    def forward(self, x_dict, edge_index_dict):
        x_dict = {k: v.relu() for k, v in self.convs[0](x_dict, edge_index_dict).items() if v is not None}
        out = self.convs[1](x_dict, edge_index_dict)
        return torch.cat([out["a"], out["b"]])


timm_fslt.register_builder("test_arch_hetero", _HeteroNet, replace=True)


def _hetero_graph():
    x, edge_index = _graph()
    first = edge_index[:, (edge_index[0] < 6) & (edge_index[1] < 6)]
    return {"a": x[:6], "b": x[6:]}, {("a", "to", "b"): first.clone(), ("b", "to", "a"): first.flip(0).clone()}


@pytest.mark.parametrize("conv, dicts", [("HGTConv", ("skip",)), ("HANConv", ("lin_src", "lin_dst"))])
def test_parameter_dicts_are_compared_by_their_entries_not_their_repr(conv, dicts, tmp_path):
    # HGTConv.skip (1-element Parameters) and HANConv.lin_src/lin_dst ((1, heads, C), masked by freeze) were
    # refused: the check took the ParameterDict's extra_repr (device, Parameter or Tensor) for configuration.
    model = _frozen(_HeteroNet(conv))
    arch = {"builder": "test_arch_hetero", "kwargs": {"conv": conv}}
    masked = [d for d in dicts if torch.nn.utils.parametrize.is_parametrized(model.convs[0].get_submodule(d))]
    assert masked == (["lin_src", "lin_dst"] if conv == "HANConv" else [])
    _round_trip(model, _hetero_graph(), tmp_path / "t", architecture=arch, target=torch.zeros(12, dtype=torch.long))
    # The entries still count, masked or not: a dict missing one, or with another entry shape, is refused.
    fewer, other = _HeteroNet(conv), _HeteroNet(conv)
    key = next(iter(fewer.convs[0].get_submodule(dicts[0]).keys()))
    del fewer.convs[0].get_submodule(dicts[0])[key]
    other.convs[1].get_submodule(dicts[-1])[key] = nn.Parameter(torch.zeros(1, 1, 1))
    shape = tuple(getattr(model.convs[1].get_submodule(dicts[-1]), key).shape)
    assert rebuild_problems(model, fewer, False, None) == [f"it has no tensor 'convs.0.{dicts[0]}.{key}' (the model has)"]
    assert rebuild_problems(model, other, False, None) == [
        f"its layer 'convs.1.{dicts[-1]}' has {key} shape (1, 1, 1), the model's has {shape}" if masked
        else f"its 'convs.1.{dicts[-1]}.{key}' has shape (1, 1, 1), the model's {shape}"]
