"""Every parameter's fate (issue #14): masked, regenerated from the seed, or stored -- and why.

The rule is ``timm_fslt.nn.placement``'s table; these tests pin it on real timm, torch and
PyG modules, check that the ViT, LSTM and GAT tickets hold mask bits only (no floating
state but norm running statistics), that the reference decoder (NumPy, none of our code)
rebuilds the masked and regenerated tensors bit for bit, and the refusals.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from torch import nn

import timm_fslt
from timm_fslt.nn.placement import kind_of, place_parameters
from timm_fslt.report import non_regenerable_state, state_reasons
from timm_fslt.ticket import read_config

DECODER = Path(timm_fslt.__file__).parent / "reference_decoder.py"


pytestmark = pytest.mark.usefixtures("one_thread")


def fates(model):
    return {p.name: (p.kind, p.fate) for p in place_parameters(model)}


def _search_step(model, x, lr=20.0):
    model.train()
    group = timm_fslt.get_group(model)
    before = [layer.mask.clone() for layer in group.layers]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    out = model(*x) if isinstance(x, tuple) else model(x)
    out.float().square().mean().backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        out = model(*x) if isinstance(x, tuple) else model(x)
    assert any(not torch.equal(a, layer.mask) for a, layer in zip(before, group.layers)), "no mask moved"
    return out


class _Kinds(nn.Module):
    """One parameter of every kind in the placement table."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.emb = nn.Embedding(5, 4)
        self.pos_embed = nn.Parameter(torch.zeros(1, 6, 4))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.attention_biases = nn.Parameter(torch.zeros(2, 6))
        self.att_src = nn.Parameter(torch.ones(1, 1, 4))
        self.q_bias = nn.Parameter(torch.ones(4))
        self.act = nn.PReLU()
        self.proj_weight = nn.Parameter(torch.ones(1, 4))
        self.gamma = nn.Parameter(torch.full((4,), 1e-5))
        self.raw = nn.Parameter(torch.ones(4, 4))
        self.rnn = nn.LSTM(4, 4)
        self.ln1 = nn.LayerNorm(1)
        self.sigma = nn.Parameter(torch.ones(3, 2))  # a kernel width (GMMConv): 2-D, but a scale


def test_the_placement_table_on_one_module_of_every_kind():
    got = fates(_Kinds())
    assert got == {
        "conv.weight": ("weight", "masked"), "conv.bias": ("bias", "constant"),
        "bn.weight": ("norm", "constant"), "bn.bias": ("norm", "constant"),
        "emb.weight": ("table", "regenerated"),
        "pos_embed": ("table", "regenerated"), "cls_token": ("table", "regenerated"),
        "attention_biases": ("table", "regenerated"),
        "att_src": ("weight", "masked"), "q_bias": ("bias", "constant"),
        "act.weight": ("prelu", "constant"), "proj_weight": ("weight", "masked"),
        "gamma": ("gain", "constant"), "raw": ("weight", "masked"),
        "rnn.weight_ih_l0": ("weight", "masked"), "rnn.weight_hh_l0": ("weight", "masked"),
        "rnn.bias_ih_l0": ("bias", "constant"), "rnn.bias_hh_l0": ("bias", "constant"),
        "ln1.weight": ("norm", "constant"), "ln1.bias": ("norm", "constant"),
        "sigma": ("gain", "constant"),
    }


def test_constants_follow_the_policies_and_nothing_is_left_dead():
    m = timm_fslt.freeze(_Kinds(), prune=0.3, lock=0.3)
    assert torch.equal(m.gamma, torch.ones(4))  # a layer scale of 1e-5 would switch its branch off
    assert torch.equal(m.ln1.bias, torch.ones(1))  # LayerNorm(1) outputs its bias alone: 1, not 0
    assert torch.equal(m.act.weight, torch.full((1,), 0.25))
    assert torch.equal(m.q_bias, torch.zeros(4)) and torch.equal(m.rnn.bias_ih_l0, torch.zeros(16))
    assert m.pos_embed.abs().sum() > 0 and abs(float(m.pos_embed.std()) - 0.02) < 0.015
    assert not any(p.requires_grad for n, p in m.named_parameters() if not n.endswith("scores"))
    m = timm_fslt.freeze(_Kinds(), prune=0.3, lock=0.3, batchnorm="affine", bias="train")
    trained = {n for n, p in m.named_parameters() if p.requires_grad and not n.endswith("scores")}
    assert trained == {"conv.bias", "bn.weight", "bn.bias", "q_bias", "gamma", "rnn.bias_ih_l0",
                       "rnn.bias_hh_l0", "ln1.weight", "ln1.bias", "sigma"}
    assert set(state_reasons(m)) >= trained


def test_the_seed_regenerates_tables_identically_and_another_seed_differs():
    a = timm_fslt.freeze(_Kinds(), prune=0.3, lock=0.3, seed=4)
    b = timm_fslt.freeze(_Kinds(), prune=0.3, lock=0.3, seed=4)
    c = timm_fslt.freeze(_Kinds(), prune=0.3, lock=0.3, seed=5)
    assert torch.equal(a.pos_embed, b.pos_embed) and torch.equal(a.emb.weight, b.emb.weight)
    assert not torch.equal(a.pos_embed, c.pos_embed)
    assert abs(float(a.emb.weight.std()) - 1.0) < 0.6  # embeddings: N(0, 1), as torch initialises them


def test_include_and_exclude_name_modules_or_parameters():
    m = timm.create_model("test_convnext", num_classes=10)
    got = {p.name: p.fate for p in place_parameters(m, exclude=["stages.0.blocks.0.gamma", "head.fc"])}
    assert got["stages.0.blocks.0.gamma"] == "kept" and got["stages.1.blocks.0.gamma"] == "constant"
    assert got["head.fc.weight"] == "kept" and got["head.fc.bias"] == "kept"  # a layer left alone
    got = {p.name: p.fate for p in place_parameters(m, include=["stages.*", "stages.0.blocks.0.gamma"])}
    assert got["stages.0.blocks.0.gamma"] == "masked"  # named as a parameter: masked whatever its kind
    assert got["stem.0.weight"] == "kept" and got["stages.1.blocks.0.norm.weight"] == "constant"


def test_a_parameter_that_cannot_be_placed_is_named_and_the_model_is_unchanged():
    model = _Kinds()
    model.steps = nn.Parameter(torch.zeros(3, dtype=torch.int64), requires_grad=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"parameter 'steps' .*int64.* exclude=\['steps'\].*include"):
        timm_fslt.freeze(model, prune=0.3, lock=0.3)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not timm_fslt.is_frozen(model)
    timm_fslt.freeze(model, prune=0.3, lock=0.3, exclude=["steps"])
    assert state_reasons(model) == {"bn.running_mean": "norm running statistics (no seed rebuilds them)",
                                    "bn.running_var": "norm running statistics (no seed rebuilds them)",
                                    "steps": "kept as built (exclude)"}


def _roundtrip(model, x, tmp_path, architecture):
    out = _search_step(model, x)
    plain = timm_fslt.materialize(model)
    with torch.no_grad():
        assert torch.equal(plain(*x) if isinstance(x, tuple) else plain(x), out)
    stored = {k: v for k, v in non_regenerable_state(model).items()
              if v.is_floating_point() and not k.endswith(("running_mean", "running_var"))}
    assert stored == {}, f"floating state beyond norm statistics: {sorted(stored)}"
    timm_fslt.save_ticket(model, tmp_path / "t", architecture=architecture)
    loaded = timm_fslt.load_ticket(tmp_path / "t")
    with torch.no_grad():
        assert torch.equal(loaded(*x) if isinstance(x, tuple) else loaded(x), out)
    return tmp_path / "t"


VIT = {"timm": "vit_tiny_patch16_224", "kwargs": {"num_classes": 10, "img_size": 32, "patch_size": 8, "depth": 2}}


def test_a_vit_ticket_is_mask_bits_only_and_the_reference_decoder_rebuilds_it(tmp_path):
    model = timm_fslt.freeze(timm.create_model(VIT["timm"], **VIT["kwargs"]), prune=0.35, lock=0.35, seed=2)
    got = fates(timm.create_model(VIT["timm"], **VIT["kwargs"]))
    assert got["pos_embed"] == got["cls_token"] == ("table", "regenerated")
    directory = _roundtrip(model, torch.randn(2, 3, 32, 32), tmp_path, VIT)
    config = read_config(directory)
    assert config["state"]["tensors"] == {}  # a ViT has no running statistics: the ticket is its mask bits
    assert {"pos_embed", "cls_token"} <= set(config["regenerated"]["tensors"])
    out = tmp_path / "w.npz"
    r = subprocess.run([sys.executable, str(DECODER), str(directory), "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    arrays = np.load(out)
    plain = timm_fslt.materialize(timm_fslt.load_ticket(directory)).state_dict()
    for key in list(config["regenerated"]["tensors"]) + [f"{row['name']}.weight" for row in config["layers"]]:
        assert arrays[key].tobytes() == plain[key].numpy().tobytes(), key


class _Seq(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(6, 8, bidirectional=True, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def test_an_lstm_is_masked_and_its_ticket_reloads_bit_identically(tmp_path):
    timm_fslt.register_builder("test_placement_lstm", _Seq, replace=True)
    model = timm_fslt.freeze(_Seq(), prune=0.35, lock=0.35, seed=1)
    names = [layer.layer_name for layer in timm_fslt.get_group(model).layers]
    assert names == ["rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.weight_ih_l0_reverse",
                     "rnn.weight_hh_l0_reverse", "head"]
    directory = _roundtrip(model, torch.randn(4, 5, 6), tmp_path, {"builder": "test_placement_lstm"})
    rows = read_config(directory)["layers"]
    assert rows[0]["module"] == "rnn" and rows[0]["param"] == "weight_ih_l0" and "param" not in rows[-1]
    out = tmp_path / "w.npz"
    r = subprocess.run([sys.executable, str(DECODER), str(directory), "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    plain = timm_fslt.materialize(timm_fslt.load_ticket(directory)).state_dict()
    arrays = np.load(out)
    assert arrays["rnn.weight_hh_l0"].tobytes() == plain["rnn.weight_hh_l0"].numpy().tobytes()
    assert arrays["head.weight"].tobytes() == plain["head.weight"].numpy().tobytes()


def _gat():
    from torch_geometric.nn.models import GAT
    return GAT(8, 16, 2, 4, heads=2)


def test_gat_attention_vectors_are_masked_and_its_conv_biases_regenerate(tmp_path):
    pytest.importorskip("torch_geometric")
    timm_fslt.register_builder("test_placement_gat", _gat, replace=True)
    torch.manual_seed(0)
    x, edges = torch.randn(10, 8), torch.randint(0, 10, (2, 30))
    model = _gat()
    got = fates(model)
    assert got["convs.0.att_src"] == got["convs.0.att_dst"] == ("weight", "masked")
    assert got["convs.0.bias"] == ("bias", "constant")  # a conv-level bias follows bias= too
    timm_fslt.freeze(model, prune=0.35, lock=0.35, seed=3)
    assert torch.equal(model.convs[0].bias, torch.zeros_like(model.convs[0].bias))
    _roundtrip(model, (x, edges), tmp_path, {"builder": "test_placement_gat"})


def test_shared_modules_are_decided_once_under_every_name():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
            self.b = self.a  # the same module under a second name (as coat's cpe/crpe)

        def forward(self, x):
            return self.b(self.a(x))
    model = timm_fslt.freeze(Shared(), prune=0.3, lock=0.3)
    assert len(timm_fslt.get_group(model).layers) == 1
    assert set(non_regenerable_state(model)) == {"a.1.running_mean", "a.1.running_var",
                                                 "b.1.running_mean", "b.1.running_var"}


def test_a_layer_replaced_after_freeze_is_refused_at_forward_and_save(tmp_path):
    model = timm_fslt.freeze(timm.create_model("resnet18", num_classes=10), prune=0.3, lock=0.3)
    x = torch.randn(2, 3, 32, 32)
    model(x)
    model.reset_classifier(5)
    with pytest.raises(RuntimeError, match=r"layer 'fc' \(Linear\) was added or replaced after timm_fslt.freeze"
                                           r".*then call timm_fslt.freeze"):
        model(x)
    with pytest.raises(timm_fslt.TicketError, match="layer 'fc'"):
        timm_fslt.save_ticket(model, tmp_path / "t")
    assert not (tmp_path / "t").exists()


def test_parameters_of_masked_layers_that_scale_them_follow_batchnorm():
    m = timm.create_model("test_nfnet", num_classes=10)
    assert kind_of(m.stem.conv1, "gain", m.stem.conv1.gain) == "gain"
    timm_fslt.freeze(m, prune=0.3, lock=0.3)
    gains = [mod.gain for mod in m.modules() if hasattr(mod, "gain") and isinstance(mod.gain, torch.Tensor)]
    assert gains and all(torch.equal(g, torch.ones_like(g)) and not g.requires_grad for g in gains)
    out = _search_step(m, torch.randn(2, 3, 32, 32), lr=50.0)
    assert torch.isfinite(out).all()
    # every masked layer now gets a score gradient (the zero-initialised gain of conv3 no longer blocks it)
    m.train()
    m(torch.randn(2, 3, 32, 32)).square().mean().backward()
    dead = [layer.layer_name for layer in timm_fslt.get_group(m).layers
            if layer.scores.grad is None or not layer.scores.grad.abs().sum() > 0]
    assert dead == []


def test_tickets_of_the_first_placement_rule_still_load_by_it():
    config = {"generator_version": 2, "freeze": dict(timm_fslt.FreezeConfig(prune=0.3, lock=0.3).to_dict())}
    del config["freeze"]["placement_version"]  # as written by 0.1 and 0.2
    freeze_config = timm_fslt.ticket.loading.ticket_freeze_config(config)
    assert freeze_config.placement_version == 1
    model = timm_fslt.freeze(_Kinds(), config=freeze_config)
    kept = state_reasons(model)
    assert "pos_embed" in kept and "gamma" in kept and "rnn.weight_ih_l0" in kept  # 0.2 stored them
    assert [layer.layer_name for layer in timm_fslt.get_group(model).layers] == ["conv"]


class _Basis(nn.Module):
    """A persistent buffer the constructor computes (as csatv2's DCT basis)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("basis", torch.linspace(-1, 1, 16).reshape(4, 4))
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x @ self.basis.T)


def test_architecture_buffers_are_stored_only_when_a_fresh_build_differs(tmp_path):
    timm_fslt.register_builder("test_placement_basis", _Basis, replace=True)
    arch = {"builder": "test_placement_basis"}
    x = torch.randn(5, 4)
    model = timm_fslt.freeze(_Basis(), prune=0.3, lock=0.3)
    assert state_reasons(model) == {"basis": "architecture buffer of _Basis"}
    timm_fslt.save_ticket(model, tmp_path / "same", architecture=arch)
    assert read_config(tmp_path / "same")["state"]["tensors"] == {}
    with torch.no_grad():
        assert torch.equal(timm_fslt.load_ticket(tmp_path / "same")(x), model(x))
    with torch.no_grad():
        model.basis.mul_(2)  # changed after it was built: the ticket must carry it
    timm_fslt.save_ticket(model, tmp_path / "changed", architecture=arch)
    assert set(read_config(tmp_path / "changed")["state"]["tensors"]) == {"basis"}
    with torch.no_grad():
        assert torch.equal(timm_fslt.load_ticket(tmp_path / "changed")(x), model(x))


def test_the_size_report_lists_every_stored_tensor_with_its_reason():
    model = timm_fslt.freeze(timm.create_model("resnet18", num_classes=10), prune=0.35, lock=0.35,
                             bias="train", exclude=["layer1.0.conv1"])
    report = timm_fslt.size_report(model)
    assert set(report.state_reasons) == set(report.state_tensors) == set(non_regenerable_state(model))
    assert report.state_reasons["fc.bias"] == "bias: bias='train'"
    assert report.state_reasons["layer1.0.conv1.weight"] == "kept as built (exclude)"
    summary = report.state_summary()
    assert "norm running statistics (no seed rebuilds them): 40 tensors, 307,200 bits" in summary


def test_structural_pruning_refuses_masked_tensors_it_cannot_cut():
    from timm_fslt.pruning.pruners import pruners
    model = timm_fslt.freeze(_Seq(), prune=0.3, lock=0.3)
    with pytest.raises(ValueError, match=r"masked tensors \['rnn.weight_ih_l0', .*cannot be pruned structurally"):
        pruners(model)


def test_an_edited_regenerated_record_is_refused(tmp_path):
    from timm_fslt.ticket.integrity import seal_config
    model = timm_fslt.freeze(timm.create_model(VIT["timm"], **VIT["kwargs"]), prune=0.35, lock=0.35, seed=2)
    timm_fslt.save_ticket(model, tmp_path / "t", architecture=VIT)
    path = tmp_path / "t" / "config.json"
    original = json.loads(path.read_text())
    edits = [("tensors", "pos_embed", "std", 0.5), ("tensors", "norm.weight", "value", 2.0), ("digest", None, None, "0" * 32)]
    for field, key, sub, value in edits:
        config = json.loads(json.dumps(original))
        own = config["timm_fslt"]  # format 4: our record under its own key, timm's at the top
        own.pop("integrity")
        if key is None:
            own["regenerated"][field] = value
        else:
            own["regenerated"][field][key][sub] = value
        path.write_text(json.dumps(seal_config(config), indent=2))  # resealed: only the digests can tell
        with pytest.raises(timm_fslt.TicketError, match="regenerat|another network"):
            timm_fslt.load_ticket(tmp_path / "t")
