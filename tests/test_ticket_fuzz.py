"""A hostile or corrupted ticket never crashes, hangs, runs code or eats memory.

Every mutation either loads (then the model works) or raises ``TicketError``.
Mutations that keep the checksums valid (the fuzzer re-signs config.json) reach
the deeper checks: safetensors headers, dtypes, shapes, layer names, structure.
"""
import hashlib
import json
import resource
import shutil
import struct
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, assume, given, settings, strategies as st

import timm_fslt
from helpers import copy_dir as _copy
from timm_fslt.errors import TicketError
from timm_fslt.ticket import seal_config

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def ticket(tmp_path_factory):
    torch.manual_seed(0)
    model = timm_fslt.create_model("resnet18_cifar", width=0.125)
    timm_fslt.freeze(model, prune=0.3, lock=0.3)
    model(torch.randn(2, 3, 32, 32))
    path = tmp_path_factory.mktemp("fuzz") / "ticket"
    timm_fslt.save_ticket(model, path)
    return path


def _resign(path: Path) -> None:
    """Make config.json's sizes and checksums agree with the (mutated) tensor files."""
    document = json.loads((path / "config.json").read_text())
    for name in ("supermask.safetensors", "state.safetensors"):
        data = (path / name).read_bytes()
        document["timm_fslt"]["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (path / "config.json").write_text(json.dumps(seal_config(document)))


def _set_architecture(document: dict, arch: dict) -> None:
    """Our record and timm's keys edited alike (format 4), as a rewrite that knows the format would."""
    document["timm_fslt"]["architecture"] = arch
    document["architecture"] = arch["timm"] if "timm" in arch else "timm_fslt-builder/" + arch["builder"]
    document["model_args"] = dict(arch["kwargs"])


def _load_or_ticket_error(path: Path) -> None:
    try:
        model = timm_fslt.load_ticket(path)
    except TicketError:
        return
    # it loaded (e.g. a flipped bit in a BatchNorm statistic): it must still be a working model
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


_FILES = ["config.json", "supermask.safetensors", "state.safetensors"]
# Each example that passes the checksums rebuilds a model (~1 s here), so the budgets are small;
# derandomize keeps CI reproducible, and a longer local run is FSLT_FUZZ_EXAMPLES=500.
import os
_N = int(os.environ.get("FSLT_FUZZ_EXAMPLES", "15"))
_settings = settings(max_examples=_N, deadline=60000, derandomize=True,
                     suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@_settings
@given(name=st.sampled_from(_FILES), cut=st.floats(0, 1, exclude_max=True), resign=st.booleans())
def test_truncated_files(ticket, tmp_path, name, cut, resign):
    path = _copy(ticket, tmp_path / "t")
    data = (path / name).read_bytes()
    (path / name).write_bytes(data[: int(len(data) * cut)])
    if resign and name != "config.json":
        _resign(path)
    with pytest.raises(TicketError):
        timm_fslt.load_ticket(path)


@_settings
@given(name=st.sampled_from(_FILES), flips=st.lists(st.integers(0, 10**9), min_size=1, max_size=8),
       resign=st.booleans())
def test_bit_flips(ticket, tmp_path, name, flips, resign):
    path = _copy(ticket, tmp_path / "t")
    data = bytearray((path / name).read_bytes())
    for f in flips:
        pos = f % (len(data) * 8)
        data[pos // 8] ^= 1 << (pos % 8)
    (path / name).write_bytes(bytes(data))
    if resign and name != "config.json":
        _resign(path)
    _load_or_ticket_error(path)


_json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30), st.sampled_from(["../../etc/passwd", "/abs/path", "a\x00b", "\u202e\U0001F600",
                                           "os:system", "builtins:eval", "subprocess:run"]),
    st.lists(st.integers(-5, 2**40), max_size=4), st.just({}), st.just([]))


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:6]):
            yield from _paths(v, prefix + (i,))


@_settings
@given(data=st.data())
def test_config_mutations(ticket, tmp_path, data):
    path = _copy(ticket, tmp_path / "t")
    config = json.loads((path / "config.json").read_text())
    paths = [p for p in _paths(config) if p]
    for _ in range(data.draw(st.integers(1, 3))):
        where = data.draw(st.sampled_from(paths))
        parent = config
        try:
            for key in where[:-1]:
                parent = parent[key]
            if data.draw(st.booleans()) and isinstance(parent, dict):
                parent.pop(where[-1], None)
            else:
                parent[where[-1]] = data.draw(_json_leaf)
        except (KeyError, IndexError, TypeError):
            continue
    (path / "config.json").write_text(json.dumps(config, allow_nan=True))
    _load_or_ticket_error(path)


def _rewrite_header(path: Path, name: str, edit) -> None:
    raw = (path / name).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    (path / name).write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])
    _resign(path)


@_settings
@given(name=st.sampled_from(["supermask.safetensors", "state.safetensors"]),
       dtype=st.sampled_from(["U8", "I8", "F16", "BF16", "F32", "F64", "I64", "BOOL", "XX"]),
       shape=st.lists(st.integers(0, 2**40), min_size=0, max_size=3),
       offsets=st.one_of(st.none(), st.tuples(st.integers(-5, 2**40), st.integers(-5, 2**40))))
def test_safetensors_header_lies_about_dtype_shape_and_size(ticket, tmp_path, name, dtype, shape, offsets):
    path = _copy(ticket, tmp_path / "t")

    def edit(header):
        key = next(k for k in header if k != "__metadata__")
        header[key]["dtype"] = dtype
        header[key]["shape"] = shape
        if offsets is not None:
            header[key]["data_offsets"] = list(offsets)

    _rewrite_header(path, name, edit)
    _load_or_ticket_error(path)


@pytest.mark.parametrize("builder", ["os:system", "subprocess:run", "builtins:eval", "shutil:rmtree"])
def test_a_ticket_cannot_make_the_loader_call_arbitrary_functions(ticket, tmp_path, builder, monkeypatch):
    import os
    import subprocess
    called = []
    monkeypatch.setattr(os, "system", lambda *a, **k: called.append(a))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: called.append(a))
    monkeypatch.setattr(shutil, "rmtree", lambda *a, **k: called.append(a))
    path = _copy(ticket, tmp_path / "t")
    config = json.loads((path / "config.json").read_text())
    _set_architecture(config, {"builder": builder, "kwargs": {}})
    (path / "config.json").write_text(json.dumps(seal_config(config)))  # resealed: the builder check refuses it
    with pytest.raises(TicketError, match="trust_builder=True"):
        timm_fslt.load_ticket(path)
    assert called == []


def test_huge_declared_architecture_is_refused_before_allocating(ticket, tmp_path):
    path = _copy(ticket, tmp_path / "t")
    config = json.loads((path / "config.json").read_text())
    arch = config["timm_fslt"]["architecture"]
    _set_architecture(config, {**arch, "kwargs": {**arch["kwargs"], "num_classes": 10**12}})
    config["num_classes"] = config["pretrained_cfg"]["num_classes"] = 10**12
    (path / "config.json").write_text(json.dumps(seal_config(config)))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(TicketError, match="parameters"):
        timm_fslt.load_ticket(path)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 1_000_000  # KiB: < 1 GB


def test_deeply_nested_or_oversized_config_is_a_ticket_error(ticket, tmp_path):
    path = _copy(ticket, tmp_path / "t")
    (path / "config.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(TicketError, match="config.json"):
        timm_fslt.load_ticket(path)
    (path / "config.json").write_bytes(b" " * (65 * 2**20))
    with pytest.raises(TicketError, match="bytes a ticket's config.json may have; it was not read"):
        timm_fslt.load_ticket(path)


# -- the entropy-coded supermask (format 5) ---------------------------------------------------------

@pytest.fixture(scope="module")
def coded(tmp_path_factory):
    """The fuzz model with per-layer score scales (a global threshold then keeps very different
    fractions per layer, so most layers are rANS records), saved with mask_coding="entropy"."""
    torch.manual_seed(0)
    model = timm_fslt.create_model("resnet18_cifar", width=0.125)
    timm_fslt.freeze(model, prune=0.3, lock=0.3)
    group = timm_fslt.get_group(model)
    with torch.no_grad():
        for i, layer in enumerate(group.layers):
            layer.scores.mul_(2.0 ** (i % 5 - 2))
    group.refresh()
    path = tmp_path_factory.mktemp("fuzz-coded") / "ticket"
    timm_fslt.save_ticket(model, path, mask_coding="entropy")
    own = json.loads((path / "config.json").read_text())["timm_fslt"]
    assert own["mask"]["coding"] == "entropy" and sum(m == "rans" for m, _ in own["mask"]["entropy_layers"]) >= 8
    model.eval()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return path, x, model(x)


def _payload_start(path: Path) -> int:
    return 8 + struct.unpack("<Q", (path / "supermask.safetensors").read_bytes()[:8])[0]


def _same_or_ticket_error(coded, path: Path) -> None:
    """A re-signed coded mask either loads as the very ticket that was saved, or is a TicketError:
    never a crash, a hang or another mask."""
    try:
        model = timm_fslt.load_ticket(path)
    except TicketError:
        return
    with torch.no_grad():
        assert torch.equal(model(coded[1]), coded[2])


def _flip_mask_payload_bits(saved, tmp_path, flips):
    """Flip the given bits (wrapped into the mask file's payload) of a copy of ``saved``'s ticket,
    re-sign it, and require the same outputs or a TicketError."""
    path = _copy(saved[0], tmp_path / "t")
    start = _payload_start(path)
    data = bytearray((path / "supermask.safetensors").read_bytes())
    for f in flips:
        pos = start * 8 + f % ((len(data) - start) * 8)
        data[pos // 8] ^= 1 << (pos % 8)
    (path / "supermask.safetensors").write_bytes(bytes(data))
    _resign(path)
    _same_or_ticket_error(saved, path)


@_settings
@given(flips=st.lists(st.integers(0, 10**9), min_size=1, max_size=8))
def test_bit_flips_in_a_coded_mask_resigned(coded, tmp_path, flips):
    _flip_mask_payload_bits(coded, tmp_path, flips)


@_settings
@given(cut=st.integers(1, 10**6), extra=st.binary(max_size=16))
def test_a_coded_mask_cut_or_padded_and_resealed_to_match(coded, tmp_path, cut, extra):
    """Payload and config rewritten together (sizes and checksums agree): the records must not."""
    path = _copy(coded[0], tmp_path / "t")
    start = _payload_start(path)
    original = (path / "supermask.safetensors").read_bytes()[start:]
    payload = original[:len(original) - 1 - cut % len(original)] + extra
    assume(payload != original)
    blob = safetensors.torch.save({"supermask": torch.frombuffer(bytearray(payload), dtype=torch.uint8)}
                                  if payload else {"supermask": torch.zeros(0, dtype=torch.uint8)},
                                  metadata={"format": "timm_fslt.supermask.entropy"})
    (path / "supermask.safetensors").write_bytes(blob)
    document = json.loads((path / "config.json").read_text())
    document["timm_fslt"]["mask"]["bytes"] = len(payload)
    (path / "config.json").write_text(json.dumps(seal_config(document)))
    _resign(path)
    with pytest.raises(TicketError):
        timm_fslt.load_ticket(path)


@_settings
@given(data=st.data())
def test_config_mutations_of_a_coded_ticket_mask_record(coded, tmp_path, data):
    path = _copy(coded[0], tmp_path / "t")
    document = json.loads((path / "config.json").read_text())
    mask = document["timm_fslt"]["mask"]
    key = data.draw(st.sampled_from(["coding", "bytes", "entropy_bytes", "entropy_layers", "bits",
                                     "entropy_layers.0", "entropy_layers.1.1", "format_version"]))
    value = data.draw(st.one_of(_json_leaf, st.sampled_from(["raw", "entropy", 4, 5, ["rans", 10**9],
                                                             ["constant", 3], ["raw", 1]])))
    if key == "format_version":
        document["timm_fslt"]["format_version"] = value
    elif key.startswith("entropy_layers."):
        parts = [int(p) for p in key.split(".")[1:]]
        target = mask["entropy_layers"]
        for p in parts[:-1]:
            target = target[p]
        target[parts[-1]] = value
    else:
        mask[key] = value
    if data.draw(st.booleans()):
        document = seal_config(document)
    (path / "config.json").write_text(json.dumps(document, allow_nan=True))
    _same_or_ticket_error(coded, path)


def test_the_untouched_coded_ticket_loads(coded):
    _same_or_ticket_error(coded, coded[0])
    assert isinstance(timm_fslt.load_ticket(coded[0]), torch.nn.Module)


def test_the_untouched_ticket_still_loads(ticket):
    model = timm_fslt.load_ticket(ticket)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


# -- a search method's ticket (format 6: symbols per free weight) --------------------------------------

@pytest.fixture(scope="module", params=["multicoated", "iterand"])
def method_coded(request, tmp_path_factory):
    """A small multicoated (3 coats) or IteRand (rounds re-drew kept weights) ticket, entropy-coded."""
    torch.manual_seed(0)
    model = timm_fslt.create_model("mnist_cnn", width=0.25, img_size=8)
    options = {"method": "multicoated", "coat_sparsities": (0.4, 0.5, 0.6)} if request.param == "multicoated" \
        else {"method": "iterand", "rerand_period": 1, "rerand_rate": 0.5}
    timm_fslt.freeze(model, prune=0.3, lock=0.3, seed=1, **options)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    for _ in range(4):
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    path = tmp_path_factory.mktemp(f"fuzz-{request.param}") / "ticket"
    timm_fslt.save_ticket(model, path, mask_coding="entropy")
    own = json.loads((path / "config.json").read_text())["timm_fslt"]
    assert own["format_version"] == 6 and own["mask"]["alphabet"] >= 3
    model.eval()
    with torch.no_grad():
        return path, x[:1], model(x[:1])


@_settings
@given(flips=st.lists(st.integers(0, 10**9), min_size=1, max_size=8))
def test_bit_flips_in_a_method_tickets_symbols_resigned(method_coded, tmp_path, flips):
    _flip_mask_payload_bits(method_coded, tmp_path, flips)


@_settings
@given(data=st.data())
def test_config_mutations_of_a_method_tickets_symbol_record(method_coded, tmp_path, data):
    path = _copy(method_coded[0], tmp_path / "t")
    document = json.loads((path / "config.json").read_text())
    own = document["timm_fslt"]
    key = data.draw(st.sampled_from(["alphabet", "symbols", "bits", "search_step", "method", "symbol_counts",
                                     "format_version", "coat_sparsities", "rerand_period"]))
    value = data.draw(st.one_of(_json_leaf, st.sampled_from([2, 3, 4, 5, 6, 255, 2**16, 2**16 + 1, -1, 0,
                                                             [[0, 1]], [0.4, 0.5], "edge_popup"])))
    if key == "symbol_counts":
        own["layers"][data.draw(st.integers(0, len(own["layers"]) - 1))][key] = value
    elif key == "format_version":
        own[key] = value
    elif key in ("coat_sparsities", "rerand_period"):
        own["freeze"][key] = value
    else:
        own["mask"][key] = value
    if data.draw(st.booleans()):
        document = seal_config(document)
    (path / "config.json").write_text(json.dumps(document, allow_nan=True))
    _same_or_ticket_error(method_coded, path)


def test_the_untouched_method_ticket_loads(method_coded):
    _same_or_ticket_error(method_coded, method_coded[0])
    assert torch.equal(timm_fslt.load_ticket(method_coded[0])(method_coded[1]), method_coded[2])
