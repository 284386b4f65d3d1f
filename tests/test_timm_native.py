"""Tickets timm can read (#15): config.json in timm's Hub schema (format 4), timm's model.safetensors
(``timm_weights=True``) loaded by plain timm without timm_fslt, ``local-dir:`` names, and the CIFAR
ResNet's pretrained loading.

Plain timm runs in subprocesses that never import timm_fslt (checked through ``sys.modules``); the
Hub is tests/hub_server.py, as in tests/test_hub.py.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import safetensors.torch
import timm
import torch

import timm_fslt
from timm_fslt.errors import TicketChecksumError, TicketError, TicketMismatchError
from timm_fslt.ticket import read_config, seal_config

from helpers import fit
from hub_server import HubServer, hub_env as _env, run_python as _run

REPO = Path(__file__).resolve().parents[1]
DECODER = REPO / "timm_fslt" / "reference_decoder.py"
TOKEN = "hf_test_token"
ARCH = "test_resnet"  # a real timm ResNet (BasicBlocks, BatchNorm), 0.37M parameters
KWARGS = {"num_classes": 10}
DATA_CONFIG = {"input_size": (3, 32, 32), "interpolation": "bilinear", "mean": (0.49, 0.48, 0.45),
               "std": (0.25, 0.24, 0.26), "crop_pct": 1.0, "crop_mode": "center"}


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    """A searched test_resnet ticket saved with and without timm's weights, its input and eval output."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = timm_fslt.create_model(ARCH, **KWARGS)
    timm_fslt.freeze(model, prune=0.3, lock=0.3, seed=5)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    fit(model, x, y, steps=2, lr=0.1)  # masks away from the initial scores, BatchNorm statistics updated
    model.eval()
    with torch.no_grad():
        out = model(x)
    root = tmp_path_factory.mktemp("native")
    plain = timm_fslt.save_ticket(model, root / "plain", data_config=DATA_CONFIG, metrics={"accuracy": 0.5})
    weights = timm_fslt.save_ticket(model, root / "weights", data_config=DATA_CONFIG, metrics={"accuracy": 0.5},
                                    timm_weights=True)
    io = root / "io.safetensors"
    safetensors.torch.save_file({"x": x, "out": out}, io)
    return SimpleNamespace(model=model, x=x, out=out, plain=plain, weights=weights, io=io, root=root)


def _document(directory):
    return json.loads((Path(directory) / "config.json").read_text())


def _write(directory, document, reseal=True):
    (Path(directory) / "config.json").write_text(json.dumps(seal_config(document) if reseal else document))


def _copy(src, dst):
    return Path(shutil.copytree(src, dst))


# -- config.json in timm's schema -------------------------------------------------------------------

def test_config_json_holds_timms_keys_and_ours_under_their_own_key(native):
    document = _document(native.plain)
    assert document["architecture"] == ARCH and isinstance(document["architecture"], str)
    assert document["num_classes"] == 10 and document["num_features"] == native.model.num_features
    assert document["model_args"] == KWARGS
    cfg = document["pretrained_cfg"]
    for key, value in DATA_CONFIG.items():
        assert cfg[key] == (list(value) if isinstance(value, tuple) else value), key
    assert cfg["num_classes"] == 10 and cfg["first_conv"] == "conv1.0" and cfg["classifier"] == "fc"
    assert not {"hf_hub_id", "url", "file", "tag"} & set(cfg)  # timm's checkpoint of the architecture: not ours
    own = document["timm_fslt"]
    assert own["format"] == "timm_fslt.ticket" and own["format_version"] == (
        5 if own["mask"]["coding"] == "entropy" else 4)  # format 5: an entropy-coded mask (mask_coding="auto")
    assert own["architecture"] == {"timm": ARCH, "kwargs": KWARGS}
    assert set(document) == {"architecture", "num_classes", "num_features", "global_pool", "model_args",
                             "pretrained_cfg", "timm_fslt"}


def test_plain_timm_builds_the_architecture_from_a_ticket_directory(native):
    built = timm.create_model(f"local-dir:{native.plain}")
    reference = timm.create_model(ARCH, **KWARGS)
    assert {k: v.shape for k, v in built.state_dict().items()} == {k: v.shape for k, v in
                                                                   reference.state_dict().items()}
    # timm's data config for the model is the one the ticket recorded
    assert timm.data.resolve_data_config(model=built) == {
        k: (list(v) if isinstance(v, tuple) else v) for k, v in DATA_CONFIG.items()}


def test_load_ticket_gives_the_loaded_model_the_tickets_data_config(native):
    loaded = timm_fslt.load_ticket(native.plain)
    with torch.no_grad():
        assert torch.equal(loaded(native.x), native.out)
    resolved = timm.data.resolve_data_config(model=loaded)
    assert resolved == {k: (list(v) if isinstance(v, tuple) else v) for k, v in DATA_CONFIG.items()}


def test_without_data_config_timms_own_resolution_is_recorded(native, tmp_path):
    timm_fslt.save_ticket(native.model, tmp_path / "t")
    expected = timm.data.resolve_data_config(model=timm.create_model(ARCH, **KWARGS))
    assert read_config(tmp_path / "t")["data_config"] == {k: list(v) if isinstance(v, tuple) else v
                                                         for k, v in expected.items()}


def test_our_own_registered_models_build_in_timm_after_importing_timm_fslt(resnet_ticket):
    built = timm.create_model(f"local-dir:{resnet_ticket.dir}")
    assert built.conv1.kernel_size == (3, 3) and sum(p.numel() for p in built.parameters()) == sum(
        p.numel() for p in timm.create_model("resnet18_cifar", num_classes=10, width=0.125).parameters())


def test_a_builder_ticket_names_no_timm_model(tmp_path):
    pytest.importorskip("torch_geometric")
    model = timm_fslt.ticket.architecture.build_architecture(
        {"builder": "gin", "kwargs": {"in_channels": 3, "num_classes": 2, "hidden": 8, "num_layers": 2}})
    timm_fslt.freeze(model, prune=0.3, lock=0.3)
    timm_fslt.save_ticket(model, tmp_path / "gin", architecture={
        "builder": "gin", "kwargs": {"in_channels": 3, "num_classes": 2, "hidden": 8, "num_layers": 2}})
    document = _document(tmp_path / "gin")
    assert document["architecture"] == "timm_fslt-builder/gin"
    assert document["model_args"] == {"in_channels": 3, "num_classes": 2, "hidden": 8, "num_layers": 2}
    assert document["pretrained_cfg"] == {}
    with pytest.raises(RuntimeError, match=r"Unknown model \(timm_fslt-builder/gin\)"):
        timm.create_model(f"local-dir:{tmp_path / 'gin'}")
    with pytest.raises(TicketError, match=r"timm_weights=True writes weights plain timm loads, but this ticket's "
                                          r"architecture is builder gin"):
        timm_fslt.save_ticket(model, tmp_path / "gin2", architecture={"builder": "gin", "kwargs": {
            "in_channels": 3, "num_classes": 2, "hidden": 8, "num_layers": 2}}, timm_weights=True)
    assert not (tmp_path / "gin2").exists()


# -- timm's keys must say what our record says --------------------------------------------------------

@pytest.mark.parametrize("edit,message", [
    (lambda d: d["model_args"].update(num_classes=7),
     r"timm's 'model_args' and the ticket's own architecture kwargs .* differ in num_classes \(timm 7, ours 10\)"),
    (lambda d: d["model_args"].update(depth=50), r"differ in depth \(timm 50, ours 'absent'\)"),
    (lambda d: d.pop("model_args"), r"differ in num_classes \(timm 'absent', ours 10\)"),
    (lambda d: d.update(architecture="resnet50"), r"timm's 'architecture' is 'resnet50' but the ticket's own record"),
    (lambda d: d.update(num_classes=1000), r"the class counts contradict each other"),
    (lambda d: d["pretrained_cfg"].update(num_classes=5), r"the class counts contradict each other"),
    (lambda d: d.update(labels=["a"]), r"top-level keys \['labels'\] that are neither timm's"),
    (lambda d: d.update(pretrained_cfg=[]), r"lacks a valid 'pretrained_cfg' entry"),
    (lambda d: d["pretrained_cfg"].update(crop_pct=-1), r"pretrained_cfg\['crop_pct'\] must be a number in"),
])
def test_a_resealed_edit_of_timms_keys_that_contradicts_ours_is_refused(native, tmp_path, edit, message):
    path = _copy(native.plain, tmp_path / "t")
    document = _document(path)
    edit(document)
    _write(path, document, reseal=True)
    with pytest.raises(TicketError, match=message) as err:
        timm_fslt.load_ticket(path)
    if "contradict" in message or "differ" in message or "'architecture'" in message:
        assert isinstance(err.value, TicketMismatchError)


@pytest.mark.parametrize("cfg,message", [
    # timm derives in_chans from pretrained_cfg's input_size when model_args lacks it
    ({"input_size": [1, 32, 32], "mean": [0.5], "std": [0.5]},
     r"the network plain timm builds from .* is not the one the ticket's record builds: conv1.0.weight is "
     r"\(16, 1, 3, 3\) in timm's, \(16, 3, 3, 3\) in ours"),
    # ... and img_size when fixed_input_size
    ({"fixed_input_size": True}, r"plain timm cannot build this ticket's config.json \(TypeError: .*img_size"),
])
def test_a_resealed_pretrained_cfg_that_makes_timm_build_another_network_is_refused(native, tmp_path, cfg, message):
    path = _copy(native.plain, tmp_path / "t")
    document = _document(path)
    document["pretrained_cfg"].update(cfg)
    _write(path, document, reseal=True)
    with pytest.raises(TicketMismatchError, match=message):
        timm_fslt.load_ticket(path)


def test_an_unsealed_edit_of_timms_keys_is_named_as_an_edit(native, tmp_path):
    path = _copy(native.plain, tmp_path / "t")
    document = _document(path)
    document["model_args"]["num_classes"] = 7
    _write(path, document, reseal=False)
    with pytest.raises(TicketChecksumError, match=r"edited field: model_args.num_classes \(changed\)"):
        timm_fslt.load_ticket(path)
    document = _document(native.plain)
    document["timm_fslt"]["freeze"]["seed"] = 6
    _write(path, document, reseal=False)
    with pytest.raises(TicketChecksumError, match=r"edited field: timm_fslt.freeze.seed \(changed\)"):
        timm_fslt.load_ticket(path)


def test_the_record_and_the_format_version_must_agree(native, tmp_path):
    path = _copy(native.plain, tmp_path / "t")
    document = _document(path)
    document["timm_fslt"]["format_version"] = 3
    _write(path, document)
    with pytest.raises(TicketError, match=r"has format_version 3 but keeps its record under 'timm_fslt'"):
        timm_fslt.load_ticket(path)
    flat = _document(native.plain)["timm_fslt"]
    flat.pop("integrity")
    _write(path, flat)
    with pytest.raises(TicketError, match=r"format_version [45] but its record is not under 'timm_fslt'"):
        timm_fslt.load_ticket(path)


def test_the_reference_decoder_reads_format_4_and_its_seal_covers_timms_keys(native, tmp_path):
    out = tmp_path / "w.npz"
    run = subprocess.run([sys.executable, str(DECODER), str(native.weights), "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    import numpy as np
    decoded = np.load(out)
    plain = timm_fslt.materialize(timm_fslt.load_ticket(native.weights)).state_dict()
    assert np.array_equal(decoded["conv1.0.weight"], plain["conv1.0.weight"].numpy())
    assert np.array_equal(decoded["fc.weight"], plain["fc.weight"].numpy())
    path = _copy(native.weights, tmp_path / "t")
    document = _document(path)
    document["model_args"]["num_classes"] = 7
    _write(path, document, reseal=False)
    run = subprocess.run([sys.executable, str(DECODER), str(path), "--out", str(out)], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2 and "integrity sha256 does not match" in run.stderr
    path = _copy(native.weights, tmp_path / "u")
    (path / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes()[:-1] + b"\1")
    run = subprocess.run([sys.executable, str(DECODER), str(path), "--out", str(out)], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2 and "model.safetensors: size or sha256 checksum differs" in run.stderr


# -- timm's weights ----------------------------------------------------------------------------------

def test_timm_weights_are_the_materialized_state_dict_listed_with_their_sha256(native):
    data = (native.weights / "model.safetensors").read_bytes()
    record = read_config(native.weights)["files"]["model.safetensors"]
    assert record == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    stored = safetensors.torch.load(data)
    expected = timm_fslt.materialize(native.model).state_dict()
    assert sorted(stored) == sorted(expected)
    assert all(torch.equal(stored[k], expected[k]) for k in expected)
    # the same tensor files as without timm's weights: the ticket is the same
    for name in ("supermask.safetensors", "state.safetensors"):
        assert (native.weights / name).read_bytes() == (native.plain / name).read_bytes()
    assert sorted(os.listdir(native.weights)) == ["config.json", "model.safetensors", "state.safetensors",
                                                  "supermask.safetensors"]


def test_load_ticket_neither_needs_nor_trusts_timms_weights(native, tmp_path):
    path = _copy(native.weights, tmp_path / "t")
    (path / "model.safetensors").write_bytes(b"not weights")  # never read: the seed rebuilds the weights
    with torch.no_grad():
        assert torch.equal(timm_fslt.load_ticket(path)(native.x), native.out)
    (path / "model.safetensors").unlink()
    with torch.no_grad():
        assert torch.equal(timm_fslt.load_ticket(path)(native.x), native.out)


_PLAIN_TIMM = """
import json, sys
import safetensors.torch as st, timm, torch
torch.set_num_threads(1)
name, io = sys.argv[1:]
model = timm.create_model(name, pretrained=True).eval()
data = st.load_file(io)
with torch.no_grad():
    out = model(data["x"])
print(json.dumps({"equal": bool(torch.equal(out, data["out"])), "timm_fslt": "timm_fslt" in sys.modules,
                  "max_diff": float((out - data["out"]).abs().max())}))
"""


def _plain_timm(name, io, env=None):
    env = dict(env or os.environ, OUTDATED_IGNORE="1")
    run = subprocess.run([sys.executable, "-c", _PLAIN_TIMM, name, str(io)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_plain_timm_without_timm_fslt_loads_a_local_ticket_with_identical_outputs(native):
    result = _plain_timm(f"local-dir:{native.weights}", native.io)
    assert result == {"equal": True, "timm_fslt": False, "max_diff": 0.0}


def test_bad_timm_weights_or_data_config_are_refused_and_nothing_is_written(native, tmp_path, monkeypatch):
    for kwargs, message in [
        ({"timm_weights": "yes"}, r"timm_weights must be True or False, got 'yes'"),
        ({"timm_weights": 1}, r"timm_weights must be True or False, got 1"),
        ({"data_config": [3, 32, 32]}, r"data_config must be a dict of timm data-config keys"),
        ({"data_config": {"img_size": 32}}, r"data_config has unknown keys \['img_size'\]; allowed: input_size"),
        ({"data_config": {"input_size": (32, 32)}}, r"data_config\['input_size'\] must be \(channels, height, "
                                                    r"width\)"),
        ({"data_config": {"interpolation": "cubic"}}, r"data_config\['interpolation'\] must be one of"),
        ({"data_config": {"input_size": (3, 32, 32), "mean": (0.5, 0.5)}}, r"data_config\['mean'\] has 2 values "
                                                                         r"but input_size has 3 channels"),
        ({"data_config": {"input_size": (1, 32, 32)}}, r"data_config does not fit the model: Requested 1 input "
                                                       r"channels, but the model accepts 3"),
    ]:
        with pytest.raises(TicketError, match=message):
            timm_fslt.save_ticket(native.model, tmp_path / "t", **kwargs)
        assert not (tmp_path / "t").exists()

    def no_network(*args, **kwargs):
        raise AssertionError("nothing may be uploaded")
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", no_network)
    with pytest.raises(TicketError, match=r"timm_weights must be True or False, got 'no'"):
        timm_fslt.push_to_hub(native.model, "me/t", timm_weights="no")
    with pytest.raises(TicketError, match=r"data_config applies when a frozen model is pushed"):
        timm_fslt.push_to_hub(native.plain, "me/t", data_config=DATA_CONFIG)
    damaged = _copy(native.weights, tmp_path / "damaged")
    (damaged / "model.safetensors").write_bytes(b"x")
    with pytest.raises(TicketChecksumError, match=r"model.safetensors' does not match the size and sha256"):
        timm_fslt.push_to_hub(damaged, "me/t")


def test_push_to_hub_of_a_model_with_timm_weights_uploads_them(native, monkeypatch):
    calls = {}
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kwargs: None)

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        calls["files"] = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
        return "commit-info"
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    assert timm_fslt.push_to_hub(native.model, "me/t", data_config=DATA_CONFIG, metrics={"accuracy": 0.5},
                                 timm_weights=True) == "commit-info"
    for name in ("config.json", "model.safetensors", "state.safetensors", "supermask.safetensors"):
        assert calls["files"][name] == (native.weights / name).read_bytes(), name


def test_a_compacted_ticket_has_no_timm_weights(conv6_model, tmp_path, monkeypatch):
    monkeypatch.setattr(conv6_model, "fslt_structure", {"features.0": {"kept_out": [0, 1, 2]}}, raising=False)
    with pytest.raises(TicketError, match=r"this ticket is compacted"):
        timm_fslt.save_ticket(conv6_model, tmp_path / "t", timm_weights=True)
    assert not (tmp_path / "t").exists()


@pytest.fixture
def conv6_model():
    torch.manual_seed(0)
    model = timm_fslt.create_model("conv6", width=0.25, num_classes=10)
    timm_fslt.freeze(model, prune=0.3, lock=0.3)
    return model


# -- the Hub ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hub():
    with HubServer(token=TOKEN, lifetime=300) as server:
        yield server


def test_fslt_push_timm_weights_lets_plain_timm_load_the_repo_with_identical_outputs(hub, native, tmp_path):
    env = dict(_env(hub, tmp_path / "hf"), HF_TOKEN=TOKEN)
    # a ticket saved without timm's weights: push rebuilds it from the seed to write them
    _run(["-m", "timm_fslt", "push", str(native.plain), "tester/native", "--timm-weights"], env)
    files = hub.files("tester/native")
    assert sorted(files) == ["README.md", "config.json", "model.safetensors", "state.safetensors",
                             "supermask.safetensors"]
    for name in ("supermask.safetensors", "state.safetensors"):
        assert files[name] == (native.weights / name).read_bytes(), name
    # timm's weights from the rebuilt ticket: the saved model's, but for BatchNorm's batch counters,
    # which a ticket does not store (they do not change an eval output)
    rebuilt, saved = safetensors.torch.load(files["model.safetensors"]), \
        safetensors.torch.load_file(native.weights / "model.safetensors")
    assert sorted(rebuilt) == sorted(saved)
    assert [k for k in saved if not torch.equal(rebuilt[k], saved[k])] == [
        k for k in saved if k.endswith("num_batches_tracked")]
    card = files["README.md"].decode()
    size = len(files["model.safetensors"])
    assert 'timm.create_model("hf-hub:tester/native", pretrained=True)' in card
    assert f"It costs {size:,} bytes" in card and "- `model.safetensors`: timm's standard weights file" in card

    result = _plain_timm("hf-hub:tester/native", native.io, _env(hub, tmp_path / "hf-timm"))
    assert result == {"equal": True, "timm_fslt": False, "max_diff": 0.0}

    # timm_fslt's own loader never downloads timm's weights
    start = len(hub.log)
    load = ("import sys, timm_fslt; timm_fslt.load_ticket(sys.argv[1]); "
            "print('loaded')")
    _run(["-c", load, "hf-hub:tester/native"], _env(hub, tmp_path / "hf-fslt"))
    commit = hub.repos["tester/native"].head.oid
    _run(["-c", load, f"hf-hub:tester/native@{commit}"], _env(hub, tmp_path / "hf-fslt-rev"))  # timm's @revision
    assert not any("model.safetensors" in path for _, path in hub.log[start:])
    assert any(commit in path for _, path in hub.log[start:])


def test_push_without_timm_weights_says_plain_timm_builds_the_architecture_only(hub, native, tmp_path):
    env = dict(_env(hub, tmp_path / "hf"), HF_TOKEN=TOKEN)
    _run(["-m", "timm_fslt", "push", str(native.plain), "tester/native-plain"], env)
    files = hub.files("tester/native-plain")
    assert "model.safetensors" not in files
    assert "This repo holds no `model.safetensors`" in files["README.md"].decode()
    build = ("import sys, timm; m = timm.create_model(sys.argv[1]); "
             "print(type(m).__name__, m.num_classes, 'timm_fslt' in sys.modules)")
    run = _run(["-c", build, "hf-hub:tester/native-plain"], _env(hub, tmp_path / "hf-timm"))
    assert run.stdout.split() == ["ResNet", "10", "False"]


# -- local-dir: names ---------------------------------------------------------------------------------

def test_load_ticket_reads_local_dir_names_like_timm(native, tmp_path):
    with torch.no_grad():
        assert torch.equal(timm_fslt.load_ticket(f"local-dir:{native.plain}")(native.x), native.out)
    missing = tmp_path / "no" / "such"
    with pytest.raises(TicketError, match=rf"no ticket directory at '{missing}' \(named by 'local-dir:{missing}'\): "
                                          r"it does not exist"):
        timm_fslt.load_ticket(f"local-dir:{missing}")
    (tmp_path / "file").write_text("x")
    with pytest.raises(TicketError, match=r"is a file; a ticket is a directory"):
        timm_fslt.load_ticket(f"local-dir:{tmp_path / 'file'}")
    with pytest.raises(TicketError, match=r"after 'local-dir:' comes a ticket directory's path"):
        timm_fslt.load_ticket("local-dir:")
    with pytest.raises(TicketError, match=r"the revision after '@' must be one name and agree with revision='v2'"):
        timm_fslt.load_ticket("hf-hub:user/ticket@v1", revision="v2")
    # a local-dir: name that reads like a repo id stays a path: nothing is sent to the Hub
    with pytest.raises(TicketError, match=r"no ticket directory at 'user/ticket'"):
        timm_fslt.load_ticket("local-dir:user/ticket")


# -- the registered CIFAR ResNet ----------------------------------------------------------------------

def test_resnet18_cifar_loads_pretrained_weights_like_any_timm_model(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("resnet18_cifar", width=0.25, num_classes=10).eval()
    with torch.no_grad():
        for module in source.modules():  # BatchNorm statistics that are not the defaults
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "weights.safetensors"
    safetensors.torch.save_file(source.state_dict(), path)
    loaded = timm.create_model("resnet18_cifar", width=0.25, num_classes=10, pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), source(x))
    assert loaded.conv1.kernel_size == (3, 3) and isinstance(loaded.maxpool, torch.nn.Identity)
    # features_only builds on the CIFAR stem too, and says its real reductions
    features = timm.create_model("resnet18_cifar", width=0.25, features_only=True)
    assert features.feature_info.reduction() == [1, 1, 2, 4, 8]
    assert [f.shape[-1] for f in features(x)] == [32, 32, 16, 8, 4]


def test_a_frozen_resnet18_cifar_ticket_with_timm_weights_loads_in_plain_timm(tmp_path):
    torch.manual_seed(0)
    model = timm_fslt.create_model("resnet18_cifar", num_classes=10, width=0.125)
    timm_fslt.freeze(model, prune=0.35, lock=0.35, seed=3)
    model.eval()
    timm_fslt.save_ticket(model, tmp_path / "t", timm_weights=True)
    loaded = timm.create_model(f"local-dir:{tmp_path / 't'}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
