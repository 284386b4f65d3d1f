"""The stored state of a ticket (format 3): one flat tensor per dtype, a lower-precision option,
old formats still read, hostile state files refused with a TicketError that says why."""
import copy
import hashlib
import json
import struct
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

import timm_fslt
from helpers import copy_dir
from timm_fslt.errors import TicketChecksumError, TicketError, TicketIntegrityWarning, TicketMismatchError
from timm_fslt.report import non_regenerable_state
from timm_fslt.ticket import read_config, read_ticket, seal_config, size_report_from_config
from timm_fslt.ticket.state_codec import decode_state, encode_state, round_state, stored_bits

FIXTURES = Path(__file__).resolve().parent / "fixtures"
ARCH = {"timm": "resnet18_cifar", "kwargs": {"num_classes": 10, "width": 0.0625}}


pytestmark = pytest.mark.usefixtures("one_thread")


def _searched_model(seed=0):
    """A CIFAR ResNet-18 at width 1/16 (20 BatchNorm layers), a few steps of search: moved statistics."""
    torch.manual_seed(seed)
    model = timm_fslt.create_model(ARCH["timm"], **ARCH["kwargs"])
    timm_fslt.freeze(model, prune=0.35, lock=0.35, seed=seed)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        x = torch.randn(16, 3, 16, 16) * 2 + 0.5
        F.cross_entropy(model(x), torch.randint(0, 10, (16,))).backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def _out(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.set_num_threads(1)
    model = _searched_model()
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    root = tmp_path_factory.mktemp("state")
    dirs = {dtype: timm_fslt.save_ticket(model, root / str(dtype), state_dtype=dtype)
            for dtype in (None, "bfloat16", "float16")}
    return SimpleNamespace(model=model, x=x, out=_out(model, x), dirs=dirs)


def _config(path):
    """The whole config.json (format 4: timm's keys, and ours under "timm_fslt")."""
    return json.loads((path / "config.json").read_text())


def _own(document):
    """timm_fslt's record in a format-4 config.json (edits to it change the document)."""
    return document["timm_fslt"]


def _reseal(path, config=None):
    """config.json (edited or not) made to agree with the tensor files' sizes and checksums, and resealed:
    the checks behind the seal must refuse what follows."""
    config = _config(path) if config is None else config
    for name in ("supermask.safetensors", "state.safetensors"):
        data = (path / name).read_bytes()
        _own(config)["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (path / "config.json").write_text(json.dumps(seal_config(config)))


def _header(path):
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return length, json.loads(data[8:8 + length])


def _write_state(path, tensors):
    (path / "state.safetensors").write_bytes(safetensors.torch.save(tensors, metadata={"format": "timm_fslt.state"}))


# -- round trips -------------------------------------------------------------------------------

def test_full_precision_state_loads_bit_identical(saved):
    loaded = timm_fslt.load_ticket(saved.dirs[None])
    assert torch.equal(_out(loaded, saved.x), saved.out)
    stored, now = non_regenerable_state(saved.model), non_regenerable_state(loaded)
    assert stored.keys() == now.keys() and all(torch.equal(stored[k], now[k]) for k in stored)


@pytest.mark.parametrize("state_dtype", ["bfloat16", "float16"])
def test_lower_precision_state_loads_as_the_model_with_its_state_rounded(saved, state_dtype):
    loaded = timm_fslt.load_ticket(saved.dirs[state_dtype])
    rounded = round_state(copy.deepcopy(saved.model), state_dtype)
    assert torch.equal(_out(loaded, saved.x), _out(rounded, saved.x))  # the promise, exactly
    assert not torch.equal(_out(loaded, saved.x), saved.out)  # (and the rounding did change something)
    for key, value in non_regenerable_state(loaded).items():
        assert value.dtype == non_regenerable_state(saved.model)[key].dtype  # cast back to the model's dtype
        if value.is_floating_point():
            assert torch.equal(value, value.to(getattr(torch, state_dtype)).to(value.dtype))
    # the supermask and the weights are untouched: the masked digests of the save still hold
    assert [row["masked_digest"] for row in _own(_config(saved.dirs[state_dtype]))["layers"]] == \
        [row["masked_digest"] for row in _own(_config(saved.dirs[None]))["layers"]]


def test_the_state_file_is_one_flat_tensor_per_dtype_with_a_small_header(saved):
    expected = non_regenerable_state(saved.model)
    for state_dtype, directory in saved.dirs.items():
        path = directory / "state.safetensors"
        stored = safetensors.torch.load_file(path)
        header_len, header = _header(path)
        floats = state_dtype or "float32"
        assert set(stored) == {str(v.dtype).replace("torch.", "") for v in expected.values()
                               if not v.is_floating_point()} | {floats}
        assert header_len < 300 < len(expected) * 50  # a few entries, whatever the number of tensors
        assert path.stat().st_size == 8 + header_len + sum(t.numel() * t.element_size() for t in stored.values())
        keys = sorted(k for k, v in expected.items() if v.is_floating_point())
        flat = torch.cat([expected[k].reshape(-1) for k in keys]).to(getattr(torch, floats))
        assert torch.equal(stored[floats], flat)  # sorted key order, rounded to nearest even
        state = _own(_config(directory))["state"]
        assert state["layout"] == "flat" and state["state_dtype"] == state_dtype
        assert list(state["tensors"]) == sorted(expected)


def test_size_accounting_matches_what_is_written(saved):
    state = non_regenerable_state(saved.model)
    full = timm_fslt.size_report(saved.model).state_bits
    for state_dtype, directory in saved.dirs.items():
        config = read_config(directory)
        payload = (directory / "state.safetensors").stat().st_size - 8 - _header(directory / "state.safetensors")[0]
        assert config["state"]["bits"] == 8 * payload == stored_bits(state, state_dtype)
        assert size_report_from_config(config).state_bits == config["state"]["bits"]
    assert stored_bits(state) == full
    floats = sum(v.numel() for v in state.values() if v.is_floating_point())
    assert full - stored_bits(state, "bfloat16") == 16 * floats


def test_the_codec_handles_any_dtype_and_shape_without_batch_counters():
    state = {"b.flag": torch.tensor([True, False]), "a.table": torch.randn(3, 2, dtype=torch.float64),
             "c.half": torch.randn(5).half(), "d.empty": torch.zeros(0, 4), "e.scalar": torch.tensor(2.5),
             "f.codes": torch.arange(6, dtype=torch.int8).reshape(2, 3), "g.bf": torch.randn(2).bfloat16()}
    record, data = encode_state(state)
    back = decode_state(record, safetensors.torch.load(data), "state.safetensors")
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) and back[k].dtype == state[k].dtype
                                               for k in state)
    record, data = encode_state(state, "bfloat16")
    assert set(safetensors.torch.load(data)) == {"bool", "bfloat16", "float16", "int8"}
    back = decode_state(record, safetensors.torch.load(data), "state.safetensors")
    assert torch.equal(back["a.table"], state["a.table"].bfloat16().double())  # wider: rounded, cast back
    assert torch.equal(back["c.half"], state["c.half"])  # float16 is not wider than bfloat16: kept
    assert record["bits"] == stored_bits(state, "bfloat16") == 8 * sum(
        t.numel() * t.element_size() for t in safetensors.torch.load(data).values())


def test_non_finite_state_is_stored_as_it_is(tmp_path):
    """Decision: state holds whatever the model holds (a diverged search can leave inf or NaN statistics);
    the ticket reproduces it, and the sha256 in config.json, not a value check, guards the bytes."""
    model = _searched_model(seed=1)
    model.bn1.running_var[0] = float("inf")
    model.bn1.running_mean[1] = float("nan")
    x = torch.randn(2, 3, 16, 16)
    for state_dtype in (None, "bfloat16"):
        loaded = timm_fslt.load_ticket(timm_fslt.save_ticket(model, tmp_path / str(state_dtype),
                                                             state_dtype=state_dtype))
        assert torch.isinf(loaded.bn1.running_var[0]) and torch.isnan(loaded.bn1.running_mean[1])
    assert torch.equal(_out(loaded, x).isnan(), _out(round_state(model, "bfloat16"), x).isnan())


# -- bad state_dtype -------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["bf16", "float32", "int8", 16, torch.float32, True])
def test_a_bad_state_dtype_is_named_with_the_allowed_values_and_nothing_is_written(saved, tmp_path, bad):
    target = tmp_path / "t"
    with pytest.raises(TicketError, match=r"state_dtype must be None .* or one of \['bfloat16', 'float16'\].*, got"):
        timm_fslt.save_ticket(saved.model, target, state_dtype=bad)
    assert not target.exists()
    assert isinstance(TicketError("x"), ValueError)


def test_float16_state_that_would_overflow_is_refused_and_nothing_is_written(tmp_path):
    model = _searched_model(seed=2)
    model.layer1[0].bn2.running_var[3] = 1e6
    with pytest.raises(TicketError, match=r"state_dtype='float16' cannot hold state tensor 'layer1.0.bn2.running_var'"
                                          r": its largest magnitude 1e\+06 overflows float16 .*use state_dtype="
                                          r"'bfloat16' or None"):
        timm_fslt.save_ticket(model, tmp_path / "t", state_dtype="float16")
    assert not (tmp_path / "t").exists()
    timm_fslt.save_ticket(model, tmp_path / "t", state_dtype="bfloat16")  # bfloat16 has float32's range


def test_push_to_hub_passes_state_dtype_and_refuses_it_for_a_saved_ticket(saved, monkeypatch):
    uploaded = {}

    def upload_folder(self, *, folder_path, **kwargs):
        uploaded.update({p.name: p.read_bytes() for p in Path(folder_path).iterdir()})

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, *a, **k: None)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    timm_fslt.push_to_hub(saved.model, "me/bn", state_dtype="bfloat16")
    assert uploaded["state.safetensors"] == (saved.dirs["bfloat16"] / "state.safetensors").read_bytes()
    assert "floats as bfloat16" in uploaded["README.md"].decode()
    with pytest.raises(TicketError, match=r"state_dtype='bfloat16' applies when a frozen model is pushed"):
        timm_fslt.push_to_hub(saved.dirs[None], "me/bn", state_dtype="bfloat16")


# -- older formats ----------------------------------------------------------------------------------

def _ramp():
    return torch.linspace(-1.0, 1.0, 4 * 3 * 16 * 16, dtype=torch.float32).reshape(4, 3, 16, 16)


def _sha(t):
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


@pytest.mark.parametrize("without_batch_counters", [False, True])
def test_a_format_2_ticket_with_per_tensor_state_still_loads(without_batch_counters, monkeypatch):
    """tests/fixtures/ticket_v2_bn was written by the format-2 code (make_v2_state_ticket.py); its
    num_batches_tracked tensors load into the model's buffers also once they are no longer stored."""
    if without_batch_counters:
        import timm_fslt.ticket.io as io
        real = io.non_regenerable_state
        monkeypatch.setattr(io, "non_regenerable_state", lambda model: {
            k: v for k, v in real(model).items() if not k.endswith("num_batches_tracked")})
    expected = json.loads((FIXTURES / "expected_v2_bn.json").read_text())
    config = read_config(FIXTURES / "ticket_v2_bn")
    assert config["format_version"] == 2 and "layout" not in config["state"]
    model = timm_fslt.load_ticket(FIXTURES / "ticket_v2_bn")
    # The stored state is compared bit for bit below; the output on the ramp within float32 rounding:
    # its exact bytes depend on the CPU's convolution kernels (here, torch 2.14.1 on an AMD EPYC, they
    # differ from the recorded ones by at most 2.2e-8 -- also at the commit that wrote the fixture's test).
    out = _out(model, _ramp()).reshape(-1)
    torch.testing.assert_close(out, torch.tensor(expected["output"]), rtol=0, atol=1e-6)
    state = model.state_dict()
    assert {k: _sha(state[k]) for k in expected["state_sha256"]} == expected["state_sha256"]


def test_a_format_1_ticket_still_loads():
    with pytest.warns(TicketIntegrityWarning, match="ticket format 1"):
        model = timm_fslt.load_ticket(FIXTURES / "ticket_v1_kaiming_uniform")
    assert _out(model, torch.zeros(1, 1, 8, 8)).shape == (1, 10)


# -- hostile flat state files -------------------------------------------------------------------------

@pytest.fixture
def ticket(saved, tmp_path):
    return copy_dir(saved.dirs[None], tmp_path / "t")


def test_a_truncated_state_file_is_refused_before_it_is_parsed(ticket):
    data = (ticket / "state.safetensors").read_bytes()
    (ticket / "state.safetensors").write_bytes(data[:-7])
    with pytest.raises(TicketChecksumError, match=r"state.safetensors' is truncated or altered: it has"):
        timm_fslt.load_ticket(ticket)
    _reseal(ticket)  # sizes and checksums made to agree: the file itself is not valid
    with pytest.raises(TicketChecksumError, match=r"is not a valid safetensors file"):
        timm_fslt.load_ticket(ticket)


def test_a_recorded_file_size_past_the_declared_state_is_refused_unread(ticket):
    config = _config(ticket)
    _own(config)["files"]["state.safetensors"]["bytes"] += 10_000
    (ticket / "config.json").write_text(json.dumps(seal_config(config)))
    with pytest.raises(TicketChecksumError, match=r"records [\d,]+ bytes for state.safetensors, but the layers and "
                                                  r"state it declares fit in [\d,]+: the ticket was altered"):
        timm_fslt.load_ticket(ticket)


def test_a_state_file_with_fewer_values_than_declared_is_refused(ticket):
    flat = safetensors.torch.load_file(ticket / "state.safetensors")
    _write_state(ticket, {**flat, "float32": flat["float32"][:-1]})
    _reseal(ticket)
    with pytest.raises(TicketMismatchError, match=r"state.safetensors: 'float32' is \(\d+,\) torch.float32, but "
                                                  r"config.json's state record needs [\d,]+ elements of float32"):
        timm_fslt.load_ticket(ticket)


@pytest.mark.parametrize("edit,message", [
    (lambda f: {**f, "float64": torch.zeros(2, dtype=torch.float64)},
     r"holds the tensors \['float32', 'float64'.*\] but config.json's state record stores dtypes \['float32'"),
    (lambda f: {**f, "float32": f["float32"].half()}, r"'float32' is \(\d+,\) torch.float16"),
    (lambda f: {**f, "float32": f["float32"].reshape(1, -1)}, r"'float32' is \(1, \d+\) torch.float32"),
])
def test_a_state_file_whose_tensors_do_not_match_the_record_is_refused(ticket, edit, message):
    _write_state(ticket, edit(safetensors.torch.load_file(ticket / "state.safetensors")))
    _reseal(ticket)
    with pytest.raises(TicketMismatchError, match=message):
        timm_fslt.load_ticket(ticket)


def test_a_key_list_that_does_not_fit_the_model_is_refused(ticket):
    config = _config(ticket)
    tensors = _own(config)["state"]["tensors"]
    tensors["bn9.running_mean"] = tensors.pop("bn1.running_mean")  # same size, another name
    _reseal(ticket, config)
    with pytest.raises(TicketMismatchError, match=r"state.safetensors does not fit the rebuilt model: missing "
                                                  r"\['bn1.running_mean'\], unexpected \['bn9.running_mean'\]"):
        timm_fslt.load_ticket(ticket)
    config = _config(ticket)
    _own(config)["state"]["tensors"].pop("bn9.running_mean")
    _own(config)["state"]["bits"] -= 32 * _own(config)["state"]["tensors"]["bn1.running_var"]["shape"][0]
    _reseal(ticket, config)
    with pytest.raises(TicketMismatchError, match=r"needs [\d,]+ elements of float32"):
        timm_fslt.load_ticket(ticket)


def test_shapes_moved_between_tensors_are_refused_by_the_model(ticket):
    config = _config(ticket)
    tensors = _own(config)["state"]["tensors"]
    tensors["bn1.running_mean"]["shape"] = [tensors["bn1.running_mean"]["shape"][0] + 1]
    tensors["bn1.running_var"]["shape"] = [tensors["bn1.running_var"]["shape"][0] - 1]
    _reseal(ticket, config)  # same total: the file fits, the model does not
    with pytest.raises(TicketMismatchError, match=r"'bn1.running_mean' is \(\d+,\) torch.float32, the rebuilt "
                                                  r"model's is \(\d+,\)"):
        timm_fslt.load_ticket(ticket)


@pytest.mark.parametrize("edit,message", [
    (lambda s: s.update(bits=s["bits"] + 32), r"'bits' is \d+ but the tensors it lists hold [\d,]+ bits"),
    (lambda s: s.pop("layout"), r"'layout' must be 'flat' in format 4, got None"),
    (lambda s: s.update(layout="per-tensor"), r"'layout' must be 'flat' in format 4, got 'per-tensor'"),
    (lambda s: s.update(state_dtype="float8"), r"'state_dtype' must be null or one of \['bfloat16', 'float16'\]"),
    (lambda s: s["tensors"]["bn1.running_mean"].update(dtype="complex64"), r"tensor 'bn1.running_mean' must have a shape and a dtype of"),
    (lambda s: s["tensors"]["bn1.running_mean"].update(stored="bfloat16"),
     r"tensor 'bn1.running_mean' must have a shape and a dtype of"),
])
def test_a_malformed_state_record_is_refused_even_when_resealed(ticket, edit, message):
    config = _config(ticket)
    edit(_own(config)["state"])
    _reseal(ticket, config)
    with pytest.raises(TicketError, match=r"config.json' has a malformed 'state' entry: " + message):
        timm_fslt.load_ticket(ticket)


def test_a_state_dtype_changed_in_the_record_does_not_fit_the_file(ticket):
    config = _config(ticket)
    _own(config)["state"]["state_dtype"] = "bfloat16"  # with 'bits' made to agree: the file is too large for it
    _own(config)["state"]["bits"] = sum((16 if t["dtype"] == "float32" else 64) * int(torch.Size(t["shape"]).numel())
                                  for t in _own(config)["state"]["tensors"].values())
    _reseal(ticket, config)
    with pytest.raises(TicketChecksumError, match=r"bytes for state.safetensors, but the layers and state it "
                                                  r"declares fit in"):
        timm_fslt.load_ticket(ticket)


def test_the_key_order_is_the_sorted_one_not_the_order_written_in_config_json(ticket, saved):
    config = _config(ticket)
    _own(config)["state"]["tensors"] = dict(reversed(list(_own(config)["state"]["tensors"].items())))
    (ticket / "config.json").write_text(json.dumps(config))  # not resealed: the seal is of canonical JSON
    assert torch.equal(_out(timm_fslt.load_ticket(ticket), saved.x), saved.out)


def test_read_ticket_returns_the_state_at_its_recorded_dtypes(saved):
    config, _, state = read_ticket(saved.dirs["bfloat16"])
    assert {k: str(v.dtype).replace("torch.", "") for k, v in state.items()} == {
        k: t["dtype"] for k, t in config["state"]["tensors"].items()}
