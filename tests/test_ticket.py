"""Compact tickets on disk: exact file format, bit-exact regeneration, clear errors, atomic saves."""
import hashlib
import json
import math
import os
import pickle
import shutil
import struct
import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import safetensors.torch
import timm
import torch
from torch import nn

import timm_fslt
from timm_fslt import atomic
from timm_fslt.apps import cli
from timm_fslt import ticket as ticket_mod
from timm_fslt.errors import (ArchitectureError, TicketChecksumError, TicketError, TicketMismatchError,
                              TicketVersionError)
from timm_fslt.report import non_regenerable_state

from helpers import fit, masks

REPO = Path(__file__).resolve().parents[1]


def _eval_outputs(model, *inputs):
    model.eval()
    with torch.no_grad():
        return model(*inputs)


CONV6 = {"timm": "conv6", "kwargs": {"width": 0.25}}


@pytest.fixture(scope="module")
def conv6_ticket(tmp_path_factory):
    """Conv6 (width 1/4) with ERK counts, layerwise scope and dynamic scaling; architecture given explicitly."""
    torch.manual_seed(1)
    model = timm.create_model("conv6", width=0.25)
    timm_fslt.freeze(model, prune=0.5, lock=0.2, distribution="erk", scope="layerwise", scale="dynamic", seed=5)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    fit(model, x, y, steps=3, lr=0.1)
    out = _eval_outputs(model, x)
    directory = timm_fslt.save_ticket(model, tmp_path_factory.mktemp("conv6") / "ticket", architecture=CONV6)
    return SimpleNamespace(model=model, dir=directory, inputs=(x,), out=out)


@pytest.fixture(scope="module")
def gin_ticket(tmp_path_factory):
    """A small PyG GIN, rebuilt through its import path ``timm_fslt.models.gin:gin``."""
    torch.manual_seed(2)
    kwargs = {"in_channels": 16, "num_classes": 4, "hidden": 32, "num_layers": 3}
    model = timm_fslt.models.gin(**kwargs)
    timm_fslt.freeze(model, prune=0.2, lock=0.5, seed=7)
    x, edge_index = torch.randn(40, 16), torch.randint(0, 40, (2, 120))
    fit(model, (x, edge_index), torch.randint(0, 4, (40,)), steps=3, lr=0.1)
    out = _eval_outputs(model, x, edge_index)
    directory = timm_fslt.save_ticket(model, tmp_path_factory.mktemp("gin") / "ticket",
                                      architecture={"builder": "timm_fslt.models.gin:gin", "kwargs": kwargs})
    return SimpleNamespace(model=model, dir=directory, inputs=(x, edge_index), out=out)


@pytest.fixture(scope="module")
def conv6_initial_masks(conv6_ticket):
    """The masks the conv6 ticket's config gives before any search (from the initial scores)."""
    fresh = timm_fslt.freeze(timm.create_model("conv6", width=0.25), config=timm_fslt.get_config(conv6_ticket.model))
    return masks(fresh)


@pytest.fixture
def resnet(resnet_ticket):
    return SimpleNamespace(model=resnet_ticket.model, dir=resnet_ticket.dir, inputs=(resnet_ticket.x,),
                           out=resnet_ticket.out)


def _copy(ticket, tmp_path, name="ticket"):
    return Path(shutil.copytree(ticket.dir, tmp_path / name))


def _edit_config(directory, edit):
    """Edit config.json and reseal it, as a deliberate rewrite would: the checks behind the
    integrity record must still refuse it (unsealed edits: tests/test_ticket_security.py)."""
    path = directory / "config.json"
    document = json.loads(path.read_text())
    edit(document["timm_fslt"])  # format 4: our record
    _sync_timm_keys(document)
    path.write_text(json.dumps(ticket_mod.seal_config(document)))


def _sync_timm_keys(document):
    """timm's keys made to agree with an edited architecture record, as a rewrite that knows format 4
    would (a contradiction alone is refused: tests/test_timm_native.py)."""
    arch = document["timm_fslt"].get("architecture")
    if not isinstance(arch, dict) or not isinstance(arch.get("kwargs", {}), dict):
        return
    name = arch.get("timm") or ("timm_fslt-builder/" + str(arch.get("builder")))
    document["architecture"], document["model_args"] = name, dict(arch.get("kwargs", {}))
    if "num_classes" in document["model_args"]:
        document["num_classes"] = document["pretrained_cfg"]["num_classes"] = document["model_args"]["num_classes"]


def _header(path):
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return length, json.loads(data[8:8 + length])


# -- round trips ------------------------------------------------------------------------

_FRESH_LOAD = """
import sys, torch, safetensors.torch as st, timm_fslt
root = sys.argv[1]
inputs = st.load_file(root + "/inputs.safetensors")
out = {}
with torch.no_grad():
    for name in sys.argv[2:]:
        model = timm_fslt.load_ticket(root + "/" + name)
        assert not model.training
        out[name] = model(*[inputs[k] for k in sorted(inputs) if k.startswith(name + ".")])
st.save_file(out, root + "/outputs.safetensors")
"""


def test_tickets_loaded_in_a_fresh_process_give_bit_identical_outputs(resnet, conv6_ticket, gin_ticket,
                                                                      tmp_path):
    tickets = {"resnet18": resnet, "conv6": conv6_ticket, "gin": gin_ticket}
    inputs = {}
    for name, t in tickets.items():
        shutil.copytree(t.dir, tmp_path / name)
        inputs.update({f"{name}.{i}": v for i, v in enumerate(t.inputs)})
    safetensors.torch.save_file(inputs, tmp_path / "inputs.safetensors")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OUTDATED_IGNORE="1")
    run = subprocess.run([sys.executable, "-c", _FRESH_LOAD, str(tmp_path), *tickets], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    outputs = safetensors.torch.load_file(tmp_path / "outputs.safetensors")
    for name, t in tickets.items():
        assert torch.equal(outputs[name], t.out), name


def test_loaded_masks_equal_the_saved_ones_and_survive_a_forced_refresh(conv6_ticket, conv6_initial_masks):
    loaded = timm_fslt.load_ticket(conv6_ticket.dir)
    assert len(masks(loaded)) == 9  # six convs, three linears
    assert all(torch.equal(a, b) for a, b in zip(masks(loaded), masks(conv6_ticket.model)))
    timm_fslt.refresh_masks(loaded)
    assert all(torch.equal(a, b) for a, b in zip(masks(loaded), masks(conv6_ticket.model)))
    assert timm_fslt.get_config(loaded) == timm_fslt.get_config(conv6_ticket.model)
    # The searched masks differ from the initial ones, so equality means the stored bits were applied.
    assert not all(torch.equal(a, b) for a, b in zip(conv6_initial_masks, masks(loaded)))
    assert torch.equal(_eval_outputs(loaded, *conv6_ticket.inputs), conv6_ticket.out)


def test_a_loaded_ticket_keeps_searching_from_the_stored_mask(conv6_ticket):
    loaded = timm_fslt.load_ticket(conv6_ticket.dir).train()
    before = masks(loaded)
    x, y = conv6_ticket.inputs[0], torch.randint(0, 10, (8,))
    fit(loaded, x, y, steps=5, lr=1.0)
    assert any(not torch.equal(a, b) for a, b in zip(before, masks(loaded)))


def test_materialize_true_returns_a_plain_model_with_the_same_outputs(conv6_ticket):
    plain = timm_fslt.load_ticket(conv6_ticket.dir, materialize=True)
    assert not any(timm_fslt.nn.modules.is_frozen_layer(m) for m in plain.modules())
    assert isinstance(plain.fc.weight, nn.Parameter)
    assert torch.equal(_eval_outputs(plain, *conv6_ticket.inputs), conv6_ticket.out)


def test_architecture_is_inferred_from_timm_pretrained_cfg_when_unambiguous(tmp_path):
    # test_efficientnet: depthwise convs, squeeze-excite convs with biases, a timm classifier.
    model = timm.create_model("test_efficientnet", num_classes=5)
    timm_fslt.freeze(model, prune=0.3, lock=0.3, seed=2)
    x = torch.randn(2, 3, 32, 32)
    out = _eval_outputs(model, x)
    timm_fslt.save_ticket(model, tmp_path / "t")
    config = json.loads((tmp_path / "t" / "config.json").read_text())
    assert config["timm_fslt"]["architecture"] == {"timm": "test_efficientnet",
                                                   "kwargs": {"num_classes": 5, "in_chans": 3}}
    assert config["architecture"] == "test_efficientnet"  # timm's keys say the same
    assert config["model_args"] == {"num_classes": 5, "in_chans": 3}
    assert torch.equal(_eval_outputs(timm_fslt.load_ticket(tmp_path / "t"), x), out)


def test_create_model_records_the_timm_name_and_kwargs_but_not_download_options():
    model = timm_fslt.create_model("conv6", width=0.25, num_classes=3, pretrained=False)
    assert model.fslt_architecture == {"timm": "conv6", "kwargs": {"width": 0.25, "num_classes": 3}}
    assert model.fc.out_features == 3


# -- the file format ------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["resnet", "conv6_ticket", "gin_ticket"])
def test_a_raw_supermask_file_is_ceil_free_over_8_bytes_plus_its_header(which, request, tmp_path):
    t = request.getfixturevalue(which)
    free = timm_fslt.size_report(t.model).free
    raw = timm_fslt.save_ticket(t.model, tmp_path / "raw", architecture=ticket_mod.read_config(t.dir)["architecture"],
                                mask_coding="raw")
    path = raw / "supermask.safetensors"
    header_len, header = _header(path)
    assert path.stat().st_size == 8 + header_len + math.ceil(free / 8)
    assert header_len <= 128  # small and fixed: one tensor entry and one metadata string
    assert header["supermask"] == {"dtype": "U8", "shape": [math.ceil(free / 8)],
                                   "data_offsets": [0, math.ceil(free / 8)]}
    # The documented bit order: layers in order, free positions row-major, LSB first.
    packed = safetensors.torch.load_file(path)["supermask"]
    bits = ((packed.to(torch.int32).unsqueeze(1) >> torch.arange(8)) & 1).flatten()
    expected = torch.cat([layer.mask[layer.frozen == 0] for layer in timm_fslt.get_group(t.model).layers])
    assert torch.equal(bits[:free].bool(), expected) and not bits[free:].any()
    config = json.loads((raw / "config.json").read_text())["timm_fslt"]
    assert config["format_version"] == 4 and config["mask"]["coding"] == "raw"
    # the default ("auto") stores whichever is smaller, and says which
    saved = json.loads((t.dir / "config.json").read_text())["timm_fslt"]
    coded = saved["mask"]["entropy_bytes"]
    assert saved["mask"]["coding"] == ("entropy" if coded < math.ceil(free / 8) else "raw")
    assert saved["mask"]["bytes"] == min(coded, math.ceil(free / 8))
    assert saved["format_version"] == (5 if saved["mask"]["coding"] == "entropy" else 4)


def test_state_file_holds_exactly_the_non_regenerable_state_at_its_own_precision(resnet):
    # format 3: one flat tensor per dtype, the tensors in the sorted order of their keys, whose
    # shapes and dtypes are in config.json (timm_fslt/ticket/state_codec.py; tests/test_ticket_state.py)
    path = resnet.dir / "state.safetensors"
    stored = safetensors.torch.load_file(path)
    expected = non_regenerable_state(resnet.model)
    dtypes = {str(v.dtype).replace("torch.", "") for v in expected.values()}
    assert stored.keys() == dtypes and "float32" in dtypes  # BatchNorm statistics
    for name, flat in stored.items():
        keys = [k for k in sorted(expected) if str(expected[k].dtype) == f"torch.{name}"]
        assert torch.equal(flat, torch.cat([expected[k].reshape(-1) for k in keys]))
    header_len, _ = _header(path)
    assert path.stat().st_size == 8 + header_len + sum(v.numel() * v.element_size() for v in stored.values())
    config = json.loads((resnet.dir / "config.json").read_text())["timm_fslt"]
    assert config["state"]["tensors"] == {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
                                          for k, v in sorted(expected.items())}
    assert config["state"]["bits"] == timm_fslt.size_report(resnet.model).state_bits


def test_config_records_versions_architecture_freeze_arguments_layers_and_checksums(resnet):
    document = json.loads((resnet.dir / "config.json").read_text())
    config = document["timm_fslt"]
    assert config["format"] == "timm_fslt.ticket" and config["format_version"] == (
        5 if config["mask"]["coding"] == "entropy" else 4)  # a raw mask is still written as format 4
    assert config["generator_version"] == timm_fslt.GENERATOR_VERSION
    assert config["architecture"] == {"timm": "resnet18_cifar", "kwargs": {"num_classes": 10, "width": 0.125}}
    assert config["freeze"] == timm_fslt.get_config(resnet.model).to_dict()
    assert config["freeze"]["seed"] == 11 and config["structure"] is None
    report = timm_fslt.size_report(resnet.model)
    digests = ("regen_digest", "masked_digest", "dtype", "freeze_keys")
    assert [{k: v for k, v in row.items() if k not in digests} for row in config["layers"]] == [
        {"name": r.name, "shape": list(r.shape), "numel": r.numel, "pruned": r.pruned,
         "locked": r.locked, "free": r.free, "kept": r.kept} for r in report.layers]
    assert all(len(row["regen_digest"]) == len(row["masked_digest"]) == 32 for row in config["layers"])
    # the seal covers the whole document (timm's keys too) but the seal itself
    body = {**document, "timm_fslt": {k: v for k, v in config.items() if k != "integrity"}}
    assert config["integrity"]["config_sha256"] == hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()).hexdigest()
    assert config["mask"]["bits"] == report.free
    for name in ("supermask.safetensors", "state.safetensors"):
        data = (resnet.dir / name).read_bytes()
        assert config["files"][name] == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert config["metrics"] == {"accuracy": 0.625}
    assert sorted(os.listdir(resnet.dir)) == ["config.json", "state.safetensors", "supermask.safetensors"]


def test_size_report_from_config_matches_the_models_report(resnet):
    config = ticket_mod.read_config(resnet.dir)
    assert str(ticket_mod.size_report_from_config(config)) == str(timm_fslt.size_report(resnet.model))


def test_loading_never_unpickles(conv6_ticket, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a ticket must load without pickle")
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    assert torch.equal(_eval_outputs(timm_fslt.load_ticket(conv6_ticket.dir), *conv6_ticket.inputs),
                       conv6_ticket.out)


def test_a_compacted_structure_is_stored_and_restored_after_freezing_before_the_bits(
        conv6_ticket, conv6_initial_masks, tmp_path, monkeypatch):
    model = conv6_ticket.model
    monkeypatch.setattr(model, "fslt_structure", {"features.0": {"kept_out": [0, 1, 2]}}, raising=False)
    timm_fslt.save_ticket(model, tmp_path / "t", architecture=CONV6)
    assert json.loads((tmp_path / "t" / "config.json").read_text())["timm_fslt"]["structure"] == model.fslt_structure

    calls = []

    def restore_structure(rebuilt, structure):
        # Called on the frozen model before the stored bits are in: its masks keep the locked weights only
        # (loading selects nothing and draws no scores).
        calls.append((structure, masks(rebuilt), [layer.frozen == 1 for layer in timm_fslt.get_group(rebuilt).layers]))

    monkeypatch.setitem(sys.modules, "timm_fslt.pruning.compact",
                        types.SimpleNamespace(restore_structure=restore_structure))
    loaded = timm_fslt.load_ticket(tmp_path / "t")
    (structure, masks_then, locked), = calls
    assert structure == model.fslt_structure and loaded.fslt_structure == structure
    assert len(masks_then) == len(locked) == len(conv6_initial_masks)
    assert all(torch.equal(a, b) for a, b in zip(masks_then, locked))
    assert not all(torch.equal(a, b) for a, b in zip(masks_then, conv6_initial_masks))
    assert torch.equal(_eval_outputs(loaded, *conv6_ticket.inputs), conv6_ticket.out)


def test_a_ticket_compacted_by_timm_fslt_compact_round_trips_with_identical_outputs(tmp_path):
    from timm_fslt.pruning.compact import compact

    model = timm_fslt.freeze(timm_fslt.create_model("conv6", width=0.125), prune=0.97, lock=0.0, seed=3)
    x = torch.randn(2, 3, 32, 32)
    compacted, report = compact(model, x)
    assert report["channels_removed"] > 0  # dead channels exist at this sparsity
    timm_fslt.save_ticket(compacted, tmp_path / "t")
    config = json.loads((tmp_path / "t" / "config.json").read_text())["timm_fslt"]
    assert config["structure"] == compacted.fslt_structure
    free = timm_fslt.size_report(compacted).free
    assert free < timm_fslt.size_report(model).free
    assert config["files"]["supermask.safetensors"]["bytes"] == 8 + _header(tmp_path / "t" / "supermask.safetensors")[0] \
        + min(math.ceil(free / 8), config["mask"]["entropy_bytes"])
    loaded = timm_fslt.load_ticket(tmp_path / "t")
    assert loaded.fslt_structure == compacted.fslt_structure
    assert torch.equal(_eval_outputs(loaded, x), _eval_outputs(compacted, x))


# -- bad input: a clear error, nothing lost ------------------------------------------------------

def test_truncated_mask_file_is_reported(conv6_ticket, tmp_path):
    directory = _copy(conv6_ticket, tmp_path)
    path = directory / "supermask.safetensors"
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(TicketChecksumError, match=r"supermask.safetensors' is truncated or altered: it has"):
        timm_fslt.load_ticket(directory)


def test_bit_flipped_mask_file_fails_its_checksum(conv6_ticket, tmp_path):
    directory = _copy(conv6_ticket, tmp_path)
    path = directory / "supermask.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(TicketChecksumError, match=r"is corrupted: its sha256 checksum .* does not match"):
        timm_fslt.load_ticket(directory)


def test_bit_flipped_state_file_fails_its_checksum(resnet, tmp_path):
    directory = _copy(resnet, tmp_path)
    path = directory / "state.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(TicketChecksumError, match=r"state.safetensors' is corrupted"):
        timm_fslt.load_ticket(directory)


def test_a_newer_format_version_asks_to_upgrade(conv6_ticket, tmp_path):
    directory = _copy(conv6_ticket, tmp_path)
    _edit_config(directory, lambda c: c.update(format_version=ticket_mod.FORMAT_VERSION + 1))
    with pytest.raises(TicketVersionError, match=rf"ticket format version {ticket_mod.FORMAT_VERSION + 1}, "
                                                 r"newer .* upgrade timm_fslt"):
        timm_fslt.load_ticket(directory)


def test_a_generator_version_mismatch_is_refused(conv6_ticket, tmp_path):
    directory = _copy(conv6_ticket, tmp_path)
    _edit_config(directory, lambda c: c.update(generator_version=0))
    with pytest.raises(TicketVersionError, match=r"random generator version 0, but this timm_fslt has generator "
                                                 r"version \d+ \(and regenerates versions \[1, 2\]\)"):
        timm_fslt.load_ticket(directory)


def test_a_missing_architecture_is_reported(conv6_ticket, tmp_path):
    directory = _copy(conv6_ticket, tmp_path)
    _edit_config(directory, lambda c: c.pop("architecture"))
    with pytest.raises(ArchitectureError, match=r"architecture \(config.json\) is missing"):
        timm_fslt.load_ticket(directory)
    _edit_config(directory, lambda c: c.update(architecture={"kwargs": {"width": 0.25}}))
    with pytest.raises(ArchitectureError, match=r"needs exactly one of 'timm' .* or 'builder'"):
        timm_fslt.load_ticket(directory)


def test_an_unknown_timm_name_or_import_path_is_reported(conv6_ticket, gin_ticket, tmp_path):
    directory = _copy(conv6_ticket, tmp_path)
    _edit_config(directory, lambda c: c["architecture"].update(timm="conv7"))
    with pytest.raises(ArchitectureError, match=r"unknown timm model 'conv7'"):
        timm_fslt.load_ticket(directory)
    directory = _copy(gin_ticket, tmp_path, "gin")
    _edit_config(directory, lambda c: c["architecture"].update(builder="no_such_gin"))
    with pytest.raises(ArchitectureError, match=r"unknown builder 'no_such_gin' .*register_builder\('no_such_gin', "
                                                r"fn\) .* \(registered: \[.*'gin'.*\]\)"):
        timm_fslt.load_ticket(directory)
    _edit_config(directory, lambda c: c["architecture"].update(builder="timm_fslt.models.no_such:gin"))
    with pytest.raises(ArchitectureError, match=r"import path 'timm_fslt.models.no_such:gin': importing and calling "
                                                r"it runs code .* trust_builder=True"):
        timm_fslt.load_ticket(directory)
    with pytest.raises(ArchitectureError, match=r"cannot import module 'timm_fslt.models.no_such'"):
        timm_fslt.load_ticket(directory, trust_builder=True)
    _edit_config(directory, lambda c: c["architecture"].update(builder="timm_fslt.models.gin:no_such"))
    with pytest.raises(ArchitectureError, match=r"module 'timm_fslt.models.gin' has no 'no_such'"):
        timm_fslt.load_ticket(directory, trust_builder=True)
    _edit_config(directory, lambda c: c["architecture"].update(builder="timm_fslt/models/gin.py"))
    with pytest.raises(ArchitectureError, match=r"must be a name registered with timm_fslt.register_builder, or "
                                                r"\(for trust_builder=True\) an import path 'pkg.module:function'"):
        timm_fslt.load_ticket(directory)


def test_masks_whose_shapes_do_not_fit_the_rebuilt_model_are_refused(conv6_ticket, tmp_path):
    directory = _copy(conv6_ticket, tmp_path)
    _edit_config(directory, lambda c: c["architecture"]["kwargs"].update(num_classes=7))
    with pytest.raises(TicketMismatchError, match=r"layer 'fc': the ticket's mask has shape \(10, 64\) but the "
                                                  r"rebuilt layer's weight has shape \(7, 64\)"):
        timm_fslt.load_ticket(directory)


def test_masks_for_another_number_of_layers_are_refused(conv6_ticket, tmp_path):
    directory = _copy(conv6_ticket, tmp_path)
    _edit_config(directory, lambda c: c["freeze"].update(exclude=["fc"]))
    with pytest.raises(TicketMismatchError, match=r"masks for 9 layers but the model rebuilt from timm conv6"
                                                  r"\(width=0.25\) has 8 masked layers: layer count mismatch"):
        timm_fslt.load_ticket(directory)


def test_saving_into_a_non_empty_directory_that_is_not_a_ticket_is_refused(conv6_ticket, tmp_path):
    target = tmp_path / "results"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(TicketError, match=r"is not empty and does not hold a ticket \(it contains notes.txt\); "
                                          r".*overwrite=True"):
        timm_fslt.save_ticket(conv6_ticket.model, target, architecture=CONV6)
    assert (target / "notes.txt").read_text() == "keep me"
    assert os.listdir(tmp_path) == ["results"]
    timm_fslt.save_ticket(conv6_ticket.model, target, overwrite=True, architecture=CONV6)
    assert sorted(os.listdir(target)) == ["config.json", "state.safetensors", "supermask.safetensors"]


def test_saving_over_an_existing_ticket_replaces_it_with_identical_bytes(conv6_ticket, resnet, tmp_path):
    target = _copy(conv6_ticket, tmp_path)
    timm_fslt.save_ticket(resnet.model, target, metrics={"accuracy": 0.625})
    # Saving is deterministic: the same model gives the same bytes (and the same Hub blobs).
    for name in ("config.json", "supermask.safetensors", "state.safetensors"):
        assert (target / name).read_bytes() == (resnet.dir / name).read_bytes(), name
    assert os.listdir(tmp_path) == ["ticket"]


def test_a_crash_midway_through_saving_leaves_the_old_ticket_intact(conv6_ticket, resnet, tmp_path, monkeypatch):
    target = _copy(conv6_ticket, tmp_path)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    written = []
    real_write = atomic._write_file

    def write_then_crash(path, data):
        written.append(path.name)
        if len(written) == 2:
            raise OSError("No space left on device (simulated)")
        real_write(path, data)

    monkeypatch.setattr(atomic, "_write_file", write_then_crash)
    with pytest.raises(TicketError, match=r"cannot save a ticket to .*: OSError: No space left"):
        timm_fslt.save_ticket(resnet.model, target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert os.listdir(tmp_path) == ["ticket"]  # the temporary sibling is gone too


def test_a_failed_final_rename_puts_the_old_ticket_back(conv6_ticket, resnet, tmp_path, monkeypatch):
    # Where the file system cannot exchange two directories, the save falls back to two renames.
    target = _copy(conv6_ticket, tmp_path)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    real_rename = os.rename
    monkeypatch.setattr(atomic, "exchange", lambda a, b: False)

    def rename(src, dst):
        if str(src).endswith(".tmp"):
            raise OSError("rename failed (simulated)")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(TicketError, match=r"cannot save a ticket to .*rename failed .*previous ticket there is intact"):
        timm_fslt.save_ticket(resnet.model, target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert os.listdir(tmp_path) == ["ticket"]


def test_saving_a_model_that_is_not_frozen_is_refused(tmp_path):
    with pytest.raises(TicketError, match=r"model is not frozen: call timm_fslt.freeze"):
        timm_fslt.save_ticket(timm.create_model("conv6", width=0.25), tmp_path / "t")
    assert not (tmp_path / "t").exists()


def test_an_ambiguous_or_unknown_architecture_asks_for_architecture(tmp_path):
    # timm names conv6 but cannot know width=0.25, so inference must not guess.
    model = timm_fslt.freeze(timm.create_model("conv6", width=0.25), prune=0.3, lock=0.3)
    del model._model_args  # timm before 1.0.2x records no creation kwargs: then nothing says width=0.25
    with pytest.raises(ArchitectureError, match=r"cannot infer the architecture unambiguously: .* timm "
                                                r"conv6\(num_classes=10, in_chans=3\), but its layer 'features.0' "
                                                r"has weight shape \(64, 3, 3, 3\).*pass architecture="):
        timm_fslt.save_ticket(model, tmp_path / "t")
    plain = timm_fslt.freeze(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), prune=0.3, lock=0.3)
    with pytest.raises(ArchitectureError, match=r"cannot tell which architecture built this Sequential: pass "
                                                r"architecture="):
        timm_fslt.save_ticket(plain, tmp_path / "t")
    with pytest.raises(ArchitectureError, match=r"architecture= timm conv6\(width=0.5\) does not rebuild this "
                                                r"model: its layer 'features.0' has weight shape \(32, 3, 3, 3\)"):
        timm_fslt.save_ticket(model, tmp_path / "t", architecture={"timm": "conv6", "kwargs": {"width": 0.5}})
    assert not (tmp_path / "t").exists()


def test_bad_metrics_are_refused(conv6_ticket, tmp_path):
    with pytest.raises(TicketError, match=r"metrics\['accuracy'\] must be a finite number, got 'high'"):
        timm_fslt.save_ticket(conv6_ticket.model, tmp_path / "t", metrics={"accuracy": "high"})
    assert not (tmp_path / "t").exists()


def test_a_directory_without_config_is_not_a_ticket(tmp_path):
    with pytest.raises(TicketError, match=r"is not a ticket: it has no config.json"):
        timm_fslt.load_ticket(tmp_path)


# -- command line ------------------------------------------------------------------------------

def test_cli_info_prints_the_size_report_and_the_config(resnet, capsys):
    assert cli.main(["info", str(resnet.dir)]) == 0
    out = capsys.readouterr().out
    assert str(timm_fslt.size_report(resnet.model)) in out
    config_text = out.split("config.json:\n", 1)[1]
    assert json.loads(config_text) == json.loads(json.dumps(ticket_mod.read_config(resnet.dir)))
    assert cli.main(["info", str(resnet.dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["size_report"] == json.loads(json.dumps(timm_fslt.size_report(resnet.model).to_dict()))


def test_cli_info_on_a_corrupted_ticket_exits_1_with_the_reason(conv6_ticket, tmp_path, capsys):
    directory = _copy(conv6_ticket, tmp_path)
    path = directory / "state.safetensors"
    path.write_bytes(path.read_bytes() + b"\0")
    assert cli.main(["info", str(directory)]) == 1
    assert "state.safetensors' is truncated or altered" in capsys.readouterr().err


def test_cli_demo_passes_its_arguments_to_timm_fslt_demo(monkeypatch):
    seen = []
    monkeypatch.setitem(sys.modules, "timm_fslt.apps.demo",
                        types.SimpleNamespace(main=lambda argv: seen.append(argv) or 3))
    assert cli.main(["demo", "--steps", "2", "--help"]) == 3
    assert seen == [["--steps", "2", "--help"]]


def test_cli_demo_without_the_demo_module_exits_2(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "timm_fslt.apps.demo", None)  # import fails as if the module were absent
    assert cli.main(["demo"]) == 2
    assert "no module timm_fslt.apps.demo" in capsys.readouterr().err


def test_cli_usage_errors_return_2(capsys):
    assert cli.main([]) == 2
    assert cli.main(["push", "only-a-ticket"]) == 2
    assert "the following arguments are required: repo_id" in capsys.readouterr().err
    assert cli.main(["push", "t", "me/x", "--metric", "accuracy"]) == 2
    assert "expected NAME=NUMBER" in capsys.readouterr().err
