"""A ticket from anywhere never runs code, never loads as another network, and never costs
more memory or time than its declared size; a save is never seen half done.

Hostile configs are written two ways: edited in place (the integrity record refuses them,
naming the field), and edited then resealed with ``seal_config`` as an attacker would (then
the checks behind the seal must refuse them: the builder registry, the regeneration
digests, the size bounds).
"""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import timm_fslt
from helpers import copy_dir as _copy
from timm_fslt import atomic
from timm_fslt.errors import (ArchitectureError, TicketChecksumError, TicketError, TicketIntegrityWarning,
                              TicketVersionError)
from timm_fslt.ticket import seal_config

REPO = Path(__file__).resolve().parents[1]
ARCH = {"timm": "resnet18_cifar", "kwargs": {"num_classes": 10, "width": 0.125}}


def _model(seed=3, **options):
    torch.manual_seed(0)
    model = timm_fslt.create_model("resnet18_cifar", num_classes=10, width=0.125)
    timm_fslt.freeze(model, prune=0.3, lock=0.3, seed=seed, **options)
    model(torch.randn(2, 3, 32, 32))
    return model


@pytest.fixture(scope="module")
def ticket(tmp_path_factory):
    model = _model()
    path = tmp_path_factory.mktemp("sec") / "ticket"
    # raw bits (format 4): the edits below rewrite it into older formats; coded masks: coded_ticket
    timm_fslt.save_ticket(model, path, metrics={"accuracy": 0.5}, mask_coding="raw")
    model.eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(x)
    return path, x, out


def _config(path: Path) -> dict:
    """The whole config.json (format 4: timm's keys, and ours under "timm_fslt")."""
    return json.loads((path / "config.json").read_text())


def _own(document: dict) -> dict:
    """timm_fslt's record in a format-4 config.json (edits to it change the document)."""
    return document["timm_fslt"]


def _set_architecture(document: dict, arch: dict) -> None:
    """An attacker who knows format 4 edits our record and timm's keys alike, so that they agree."""
    _own(document)["architecture"] = arch
    document["architecture"] = arch["timm"] if "timm" in arch else "timm_fslt-builder/" + arch["builder"]
    document["model_args"] = dict(arch["kwargs"])


def _write(path: Path, config: dict, reseal: bool) -> None:
    (path / "config.json").write_text(json.dumps(seal_config(config) if reseal else config))


# -- builders: nothing a ticket names runs -------------------------------------------------

def _hostile(sentinel: Path, victim: Path) -> list:
    shell = f"touch {sentinel}"
    return [
        ("timm_fslt.ticket:os.system", {"command": shell}),      # the walk that ran code in 0.1
        ("timm_fslt.train:shutil.rmtree", {"path": str(victim)}),
        ("timm_fslt.train:write_json_atomic", {"path": str(sentinel), "payload": 1}),
        ("timm_fslt.architecture:importlib.import_module", {"name": "antigravity"}),
        ("os:system", {"command": shell}),
        ("subprocess:run", {"args": ["touch", str(sentinel)]}),
        ("subprocess:getoutput", {"cmd": shell}),
        ("importlib:import_module", {"name": "this"}),
        ("builtins:exec", {"source": f"open({str(sentinel)!r}, 'w')"}),
        ("builtins:eval", {"source": f"open({str(sentinel)!r}, 'w')"}),
        ("shutil:rmtree", {"path": str(victim)}),
        ("timm_fslt.train:write_json_atomic", {"path": str(sentinel), "payload": {}}),
        ("pathlib:Path.touch", {}),
    ]


@pytest.mark.parametrize("reseal", [False, True], ids=["edited", "resealed"])
def test_hostile_builders_are_refused_and_nothing_runs(ticket, tmp_path, reseal):
    sentinel, victim = tmp_path / "SENTINEL", tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("x")
    for builder, kwargs in _hostile(sentinel, victim):
        path = _copy(ticket[0], tmp_path / "t")
        config = _config(path)
        _set_architecture(config, {"builder": builder, "kwargs": kwargs})
        _write(path, config, reseal)
        with pytest.raises(TicketError) as err:
            timm_fslt.load_ticket(path)
        if reseal:
            assert "trust_builder=True" in str(err.value) or "must be a name registered" in str(err.value), builder
        else:
            assert isinstance(err.value, TicketChecksumError) and "architecture.builder (added)" in str(err.value)
        assert not sentinel.exists(), builder
        assert (victim / "keep").exists(), builder
    assert "antigravity" not in sys.modules and "this" not in sys.modules


def test_trust_builder_imports_one_attribute_of_one_module_and_never_walks(ticket, tmp_path):
    sentinel = tmp_path / "SENTINEL"
    path = _copy(ticket[0], tmp_path / "t")
    config = _config(path)
    _set_architecture(config, {"builder": "timm_fslt.ticket:os.system", "kwargs": {"command": f"touch {sentinel}"}})
    _write(path, config, reseal=True)
    with pytest.raises(ArchitectureError, match=r"must be a name registered .* an import path 'pkg.module:function'"):
        timm_fslt.load_ticket(path, trust_builder=True)
    assert not sentinel.exists()


def test_a_registered_builder_loads_without_trust(tmp_path):
    calls = []

    def tiny(width: int = 4):
        calls.append(width)
        return torch.nn.Sequential(torch.nn.Conv2d(3, width, 3), torch.nn.Flatten(), torch.nn.Linear(width * 900, 2))

    timm_fslt.register_builder("test_tiny_net", tiny, replace=True)
    model = timm_fslt.freeze(tiny(4), prune=0.2, lock=0.2)
    timm_fslt.save_ticket(model, tmp_path / "t", architecture={"builder": "test_tiny_net", "kwargs": {"width": 4}})
    loaded = timm_fslt.load_ticket(tmp_path / "t")
    x = torch.randn(1, 3, 32, 32)
    model.eval()
    assert torch.equal(loaded(x), model(x)) and calls[-1] == 4
    with pytest.raises(ValueError, match=r"builder name 'test_tiny_net' is already registered to .*replace=True"):
        timm_fslt.register_builder("test_tiny_net", lambda: None)
    with pytest.raises(ValueError, match=r"name must be a builder name .* \(no ':'\), got 'os:system'"):
        timm_fslt.register_builder("os:system", tiny)
    with pytest.raises(TypeError, match=r"fn must be callable"):
        timm_fslt.register_builder("x", 3)


# -- integrity: every field, and the regenerated network --------------------------------------

def _leaves(value, path=()):
    """(path of keys and indices, value) of every leaf of a JSON value."""
    if isinstance(value, dict) and value:
        for key, item in value.items():
            yield from _leaves(item, path + (key,))
    elif isinstance(value, list) and value:
        for i, item in enumerate(value):
            yield from _leaves(item, path + (i,))
    else:
        yield path, value


def _set(config, path, value):
    target = config
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value


def _other(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2 + 0.125
    if isinstance(value, str):
        return value + "x"
    if value is None:
        return 0
    if isinstance(value, list):
        return value + [1]
    return {"x": 1}


def _field(config, path) -> str:
    """The field name the loader reports: ``freeze.seed``, ``layers[3]``, ``metrics.accuracy``."""
    top = config[path[0]]
    if len(path) == 1 or not top:
        return path[0]
    return f"{path[0]}[{path[1]}]" if isinstance(top, list) else f"{path[0]}.{path[1]}"


def test_every_single_field_edit_of_config_json_is_refused_naming_the_field(ticket, tmp_path):
    config = _config(ticket[0])
    leaves = [(k, v) for k, v in _leaves(config) if k[:2] != ("timm_fslt", "integrity")]
    assert len(leaves) > 100
    path = _copy(ticket[0], tmp_path / "t")
    for where, value in leaves:
        edited = json.loads(json.dumps(config))
        _set(edited, where, _other(value))
        _write(path, edited, reseal=False)
        if where == ("timm_fslt", "format_version") and _other(value) > timm_fslt.ticket.FORMAT_VERSION:
            # now claims a newer format, whose seal this release cannot read
            with pytest.raises(TicketVersionError, match="upgrade timm_fslt"):
                timm_fslt.ticket.read_config(path)
            continue
        with pytest.raises(TicketChecksumError, match="was edited after it was saved") as err:
            timm_fslt.ticket.read_config(path)
        assert _field(config, where) in str(err.value), (where, str(err.value))
    edited = json.loads(json.dumps(config))
    _own(edited)["integrity"]["config_sha256"] = "0" * 64
    _write(path, edited, reseal=False)
    with pytest.raises(TicketChecksumError, match="the integrity record itself"):
        timm_fslt.ticket.read_config(path)
    _own(edited).pop("integrity")
    _write(path, edited, reseal=False)
    with pytest.raises(TicketChecksumError, match="no valid 'integrity' record"):
        timm_fslt.ticket.read_config(path)


@pytest.mark.parametrize("field,value,refused", [
    ("seed", 4, True), ("weight_init", "signed_kaiming_constant", True), ("weight_init", "kaiming_normal", True),
    ("scale", "static", True), ("scale", "dynamic", True), ("prune", 0.31, True), ("lock", 0.2, True),
    ("distribution", "erk", True), ("sparsity", 0.4, True), ("scope", "layerwise", True),
    # these do not change the network: refused, or loaded with bit-identical outputs
    ("score_init", "kaiming_uniform", False), ("batchnorm", "keep", False), ("generator_version", 1, False),
])
def test_a_resealed_edit_never_loads_as_another_network(ticket, tmp_path, field, value, refused):
    path, x, out = ticket
    path = _copy(path, tmp_path / "t")
    config = _config(path)
    (_own(config) if field == "generator_version" else _own(config)["freeze"])[field] = value
    _write(path, config, reseal=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a v1 generator claim warns about its normal stream
            model = timm_fslt.load_ticket(path)
    except TicketError:
        return
    assert not refused, f"a resealed {field}={value!r} loaded"
    with torch.no_grad():
        assert torch.equal(model(x), out), f"{field}={value!r} loaded as another network"


def test_an_unedited_ticket_loads_bit_identically_and_can_be_pinned(ticket):
    path, x, out = ticket
    digest = _own(_config(path))["integrity"]["config_sha256"]
    model = timm_fslt.load_ticket(path, expected_sha256=digest)
    with torch.no_grad():
        assert torch.equal(model(x), out)
    with pytest.raises(TicketChecksumError, match=r"has config_sha256 '[0-9a-f]{64}', not the expected_sha256"):
        timm_fslt.load_ticket(path, expected_sha256="1" * 64)
    with pytest.raises(TicketError, match=r"expected_sha256 must be 64 lowercase hex digits"):
        timm_fslt.load_ticket(path, expected_sha256="abc")


def test_a_format_1_ticket_loads_with_a_warning_that_it_is_unsealed(ticket, tmp_path):
    path = _copy(ticket[0], tmp_path / "t")
    config = _own(_config(path))  # format 1: our record only, at the top
    config.pop("integrity")
    config["format_version"] = 1
    for row in config["layers"]:
        row.pop("regen_digest")
        row.pop("masked_digest")
    _write(path, config, reseal=False)
    with pytest.warns(TicketIntegrityWarning, match=r"ticket format 1\) and has no integrity record"):
        model = timm_fslt.load_ticket(path)
    with torch.no_grad():
        assert torch.equal(model(ticket[1]), ticket[2])


@pytest.mark.parametrize("text,message", [
    ('{"a": 1, "a": 2}', "duplicate key 'a'"),
    ('{"a": NaN}', "NaN is not a JSON number"),
    ('{"a": -Infinity}', "-Infinity is not a JSON number"),
])
def test_json_with_duplicate_keys_or_non_numbers_is_refused(ticket, tmp_path, text, message):
    path = _copy(ticket[0], tmp_path / "t")
    (path / "config.json").write_text(text)
    with pytest.raises(TicketError, match=message):
        timm_fslt.load_ticket(path)


def test_nan_metrics_or_state_bits_are_refused_even_when_resealed(ticket, tmp_path):
    path = _copy(ticket[0], tmp_path / "t")
    config = _config(path)
    _own(config)["state"]["bits"] = 1.5
    _write(path, config, reseal=True)
    with pytest.raises(TicketError, match=r"malformed 'state' entry: 'bits' must be an int"):
        timm_fslt.load_ticket(path)
    config = _config(_copy(ticket[0], path))
    _own(config)["metrics"] = {"accuracy": "high"}
    _write(path, config, reseal=True)
    with pytest.raises(TicketError, match=r"config.json': metrics\['accuracy'\] must be a finite number"):
        timm_fslt.load_ticket(path)


# -- bounded loading ---------------------------------------------------------------------------

_PEAK = """
import json, resource, sys, timm_fslt
results = {}
for name in sys.argv[1:]:
    try:
        timm_fslt.load_ticket(name)
        results[name] = "loaded"
    except timm_fslt.TicketError as err:
        results[name] = str(err)
print(json.dumps({"results": results, "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def test_oversized_and_symlinked_files_are_refused_in_bounded_memory(ticket, tmp_path):
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:  # sparse: 1.5 GiB that costs no disk
        f.truncate(3 * 2**29)
    cases = {}
    # 1. supermask.safetensors is a symlink to a huge file
    path = cases["symlink"] = _copy(ticket[0], tmp_path / "symlink")
    (path / "supermask.safetensors").unlink()
    os.symlink(big, path / "supermask.safetensors")
    # 2. a huge state file, with config.json resealed to claim that size
    path = cases["resealed"] = _copy(ticket[0], tmp_path / "resealed")
    shutil.copyfile(big, path / "state.safetensors")
    config = _config(path)
    _own(config)["files"]["state.safetensors"]["bytes"] = big.stat().st_size
    _write(path, config, reseal=True)
    # 3. a huge state file, config untouched
    path = cases["plain"] = _copy(ticket[0], tmp_path / "plain")
    os.truncate(path / "state.safetensors", 2**30)
    # 4. config.json itself a symlink
    path = cases["config-link"] = _copy(ticket[0], tmp_path / "config-link")
    shutil.move(path / "config.json", tmp_path / "elsewhere.json")
    os.symlink(tmp_path / "elsewhere.json", path / "config.json")
    def peak(*paths):
        run = subprocess.run([sys.executable, "-c", _PEAK, *map(str, paths)], capture_output=True, text=True,
                             cwd=REPO, timeout=300, env=dict(os.environ, OUTDATED_IGNORE="1"))
        assert run.returncode == 0, run.stderr[-3000:]
        return json.loads(run.stdout.strip().splitlines()[-1])

    baseline = peak(ticket[0])  # the same process loading the genuine ticket
    assert baseline["results"][str(ticket[0])] == "loaded"
    report = peak(*cases.values())
    messages = {k: report["results"][str(p)] for k, p in cases.items()}
    assert "is a symbolic link" in messages["symlink"]
    assert "but the layers and state it declares fit in" in messages["resealed"]
    assert "truncated or altered" in messages["plain"] and "it was not read" in messages["plain"]
    assert "is a symbolic link" in messages["config-link"]
    # reading any of these files would add 1 GB or more
    assert report["maxrss_kib"] < baseline["maxrss_kib"] + 200_000, (report, baseline)


@pytest.fixture(scope="module")
def coded_ticket(tmp_path_factory):
    model = _model()
    group = timm_fslt.get_group(model)
    with torch.no_grad():
        for i, layer in enumerate(group.layers):
            layer.scores.mul_(3.0 ** (i % 3 - 1))  # a global threshold then keeps other fractions per layer
    group.refresh()
    path = tmp_path_factory.mktemp("sec-coded") / "ticket"
    timm_fslt.save_ticket(model, path, mask_coding="entropy")
    return path


def _rewrite_mask(path: Path, payload: bytes, **mask_fields) -> None:
    """A new coded payload, with config.json's sizes and checksums made to agree and resealed."""
    import safetensors.torch
    blob = safetensors.torch.save({"supermask": torch.frombuffer(bytearray(payload), dtype=torch.uint8)},
                                  metadata={"format": "timm_fslt.supermask.entropy"})
    (path / "supermask.safetensors").write_bytes(blob)
    config = _config(path)
    _own(config)["mask"].update(bytes=len(payload), **mask_fields)
    _own(config)["files"]["supermask.safetensors"] = {"bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
    _write(path, config, reseal=True)


def test_a_hostile_coded_mask_is_refused_by_its_bounds_before_it_is_decoded(coded_ticket, tmp_path, monkeypatch):
    from timm_fslt import entropy
    own = _own(_config(coded_ticket))
    sizes = [row["free"] for row in own["layers"]]
    first = max(range(len(sizes)), key=sizes.__getitem__)
    # 1. the file claims more bytes than every layer's raw record could hold: refused before reading
    path = _copy(coded_ticket, tmp_path / "claims")
    config = _config(path)
    _own(config)["files"]["supermask.safetensors"]["bytes"] = 10**9
    _write(path, config, reseal=True)
    with pytest.raises(TicketChecksumError, match="but the layers and state it declares fit in"):
        timm_fslt.load_ticket(path)
    # 2. a rANS record promising 2**32 - 1 words: refused from its header, nothing decoded
    decoded = []
    real = entropy.rans_decode
    monkeypatch.setattr(entropy, "rans_decode", lambda *a: decoded.append(a) or real(*a))
    records = [entropy.encode(np.zeros(n, np.uint8), 2) for n in sizes]
    records[first] = (bytes([entropy.RANS, 2, 0, 0, 0, 1, 0]) + (2**23).to_bytes(4, "little") * 2
                      + (2**32 - 1).to_bytes(4, "little") + bytes(range(1, 61)))
    path = _copy(coded_ticket, tmp_path / "words")
    _rewrite_mask(path, b"".join(records), entropy_bytes=sum(map(len, records)),
                  entropy_layers=[[entropy.METHODS[r[0]], len(r)] for r in records])
    with pytest.raises(TicketChecksumError, match=rf"layer {first}'s record: its 4294967295 rANS words make it "
                                                  "larger than the raw record"):
        timm_fslt.load_ticket(path)
    assert decoded == []
    # 3. random words of a valid-looking header: decoding stops at the layer's own count, and the
    #    decoder must end exactly where the encoder started (or the digests refuse other bits)
    rng = np.random.default_rng(0)
    words = rng.integers(1, 2**32, sizes[first] // 64, dtype=np.uint64).astype("<u4").tobytes()
    records[first] = (bytes([entropy.RANS, 2, 0, 0, 0, 1, 0]) + (2**23).to_bytes(4, "little") * 2
                      + (len(words) // 4).to_bytes(4, "little") + words)
    path = _copy(coded_ticket, tmp_path / "random")
    _rewrite_mask(path, b"".join(records), entropy_bytes=sum(map(len, records)),
                  entropy_layers=[[entropy.METHODS[r[0]], len(r)] for r in records])
    start = time.monotonic()
    with pytest.raises(TicketError, match=r"does not decode|decodes to|digest"):
        timm_fslt.load_ticket(path)
    assert time.monotonic() - start < 30


def test_a_coded_mask_claimed_by_an_older_format_is_refused(coded_ticket, tmp_path):
    path = _copy(coded_ticket, tmp_path / "t")
    config = _config(path)
    _own(config)["format_version"] = 4
    _write(path, config, reseal=True)
    with pytest.raises(TicketError, match="an entropy-coded mask needs format_version 5, the ticket has 4"):
        timm_fslt.load_ticket(path)
    _own(config)["format_version"], _own(config)["mask"]["coding"] = 5, "raw"  # its payload is not raw bits
    _write(path, config, reseal=True)
    with pytest.raises(TicketError, match="raw-coded"):
        timm_fslt.load_ticket(path)


def test_a_huge_architecture_is_stopped_while_it_builds(ticket, tmp_path):
    path = _copy(ticket[0], tmp_path / "t")
    config = _config(path)
    _set_architecture(config, {"timm": "vit_tiny_patch16_224", "kwargs": {"depth": 30000}})
    _write(path, config, reseal=True)
    start = time.monotonic()
    with pytest.raises(ArchitectureError, match=r"has more parameters than max_params=500,000,000 .*stopped while "
                                                r"building"):
        timm_fslt.load_ticket(path)
    assert time.monotonic() - start < 60  # unbounded, depth=30000 takes minutes and many GB
    _set_architecture(config, {"timm": "vit_tiny_patch16_224", "kwargs": {"depth": 400}})
    _write(path, config, reseal=True)
    with pytest.raises(ArchitectureError, match=r"took more than max_build_seconds=0.2 s to build"):
        timm_fslt.load_ticket(path, max_params=10**12, max_build_seconds=0.2)
    with pytest.raises(TicketError, match=r"max_build_seconds must be a positive number of seconds, got 0"):
        timm_fslt.load_ticket(path, max_build_seconds=0)


def test_declared_sizes_past_max_params_are_refused_before_any_file_is_read(ticket, tmp_path, monkeypatch):
    path = _copy(ticket[0], tmp_path / "t")
    read = []
    real = timm_fslt.ticket.format._read_tensor_file
    monkeypatch.setattr(timm_fslt.ticket.format, "_read_tensor_file", lambda *a, **k: read.append(a) or real(*a, **k))
    with pytest.raises(ArchitectureError, match=r"declares [\d,]+ masked weights and [\d,]+ state elements, more "
                                                r"than max_params=1,000"):
        timm_fslt.load_ticket(path, max_params=1000)
    assert read == []


def test_a_missing_relative_path_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(TicketError, match=r"no ticket directory at 'runs/ticket' \(its parent folder 'runs' exists "
                                          r"here, so it is read as a local path; for a Hub repo write "
                                          r"'hf-hub:runs/ticket'\)"):
        timm_fslt.load_ticket("runs/ticket")
    with pytest.raises(TicketError, match=r"no ticket directory at './ticket', and it is not a Hub repo id"):
        timm_fslt.load_ticket("./ticket")
    with pytest.raises(TicketError, match=r"after 'hf-hub:' comes a Hub repo id 'user/name'"):
        timm_fslt.load_ticket("hf-hub:nothing")


# -- saving: no gap, no orphans, no race ----------------------------------------------------------

_SAVE = """
import sys, time, torch, timm_fslt
from timm_fslt import atomic
target, step, seed, mode, pause = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], float(sys.argv[5])
torch.set_num_threads(1)
if mode == "fallback":
    atomic.exchange = lambda a, b: False
def hook(name):
    if name == step:
        print("at", name, flush=True)
        time.sleep(pause)
atomic._STEP_HOOK = hook
torch.manual_seed(0)
model = timm_fslt.create_model("resnet18_cifar", num_classes=10, width=0.125)
timm_fslt.freeze(model, prune=0.3, lock=0.3, seed=seed)
model(torch.randn(2, 3, 32, 32))
print("saving", flush=True)
timm_fslt.save_ticket(model, target)
print("saved", flush=True)
"""


def _start_save(target: Path, step: str, seed: int, mode: str = "exchange", pause: float = 60) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _SAVE, str(target), step, str(seed), mode, str(pause)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OUTDATED_IGNORE="1"))


def _wait_for(proc: subprocess.Popen, line: str) -> None:
    for out in proc.stdout:
        if out.strip() == line:
            return
    raise AssertionError(f"the saver ended before {line!r}: {proc.stderr.read()[-3000:]}")


def _seed_of(path: Path) -> int:
    return timm_fslt.get_config(timm_fslt.load_ticket(path)).seed


@pytest.mark.slow
@pytest.mark.parametrize("mode,steps", [("exchange", ["locked", "written", "swapped", "cleaned"]),
                                        ("fallback", ["written", "swapped", "renamed"])])
def test_sigkill_at_every_step_of_a_save_leaves_a_loadable_ticket(ticket, tmp_path, mode, steps):
    target = _copy(ticket[0], tmp_path / "ticket")  # seed 3
    for step in steps:
        proc = _start_save(target, step, seed=5, mode=mode)
        try:
            _wait_for(proc, f"at {step}")
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            proc.kill()
        assert _seed_of(target) in (3, 5), (mode, step)  # the old or the new ticket, complete
    # a later save cleans up whatever the kills left behind
    timm_fslt.save_ticket(_model(seed=3), target)
    assert sorted(os.listdir(tmp_path)) == ["ticket"]
    assert _seed_of(target) == 3


@pytest.mark.slow
def test_two_concurrent_saves_to_one_path_both_finish_and_leave_one_complete_ticket(ticket, tmp_path):
    target = _copy(ticket[0], tmp_path / "ticket")
    first = _start_save(target, "written", seed=5, pause=4)  # holds the lock for 4 s mid-save
    second = None
    try:
        _wait_for(first, "at written")
        second = _start_save(target, "none", seed=7)
        _wait_for(second, "saving")
        _wait_for(first, "saved")
        assert second.poll() is None or second.returncode == 0
        _wait_for(second, "saved")
        assert first.wait(timeout=60) == 0 and second.wait(timeout=60) == 0
    finally:
        first.kill()
        if second is not None:
            second.kill()
    assert _seed_of(target) == 7  # the second save waited for the first, then replaced it
    assert sorted(os.listdir(tmp_path)) == ["ticket"]


def test_a_save_waiting_too_long_for_the_lock_is_refused_clearly(ticket, tmp_path, monkeypatch):
    target = _copy(ticket[0], tmp_path / "ticket")
    monkeypatch.setattr(atomic, "_LOCK_TIMEOUT", 0.3)
    with atomic.locked(target):
        # flock locks belong to the open file, so this second open in the same process conflicts
        with pytest.raises(TicketError, match=r"cannot save a ticket to .*another process has been writing into "
                                              r".* for over 0.3 s"):
            timm_fslt.save_ticket(_model(seed=9), target)
    assert _seed_of(target) == 3


def test_write_errors_name_the_path_and_keep_the_old_ticket(ticket, tmp_path, monkeypatch):
    target = _copy(ticket[0], tmp_path / "ticket")
    monkeypatch.setattr(atomic, "_write_file", lambda p, d: (_ for _ in ()).throw(PermissionError(13, "denied", str(p))))
    with pytest.raises(TicketError, match=rf"cannot save a ticket to '{target}': PermissionError: .*denied"):
        timm_fslt.save_ticket(_model(seed=9), target)
    assert _seed_of(target) == 3 and sorted(os.listdir(tmp_path)) == ["ticket"]


def test_a_crash_between_the_fallback_renames_is_recovered_by_the_next_load(ticket, tmp_path):
    target = _copy(ticket[0], tmp_path / "ticket")
    old = tmp_path / ".ticket.fslt-0123abcd.old"
    os.rename(target, old)  # what a SIGKILL between the two renames leaves
    assert _seed_of(target) == 3
    assert sorted(os.listdir(tmp_path)) == ["ticket"]


# -- search methods' tickets (format 6): symbols out of range never load as another network --------

def _method_ticket(directory: Path, coding: str, **options) -> Path:
    torch.manual_seed(0)
    model = timm_fslt.create_model("mnist_cnn", width=0.125, img_size=8)
    timm_fslt.freeze(model, prune=0.3, lock=0.3, seed=2, **options)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    for _ in range(5):
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return timm_fslt.save_ticket(model, directory, mask_coding=coding)


@pytest.fixture(scope="module")
def method_tickets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sec-methods")
    return {(name, coding): _method_ticket(root / f"{name}_{coding}", coding, **options)
            for name, options in (("multicoated", {"method": "multicoated", "coat_sparsities": (0.4, 0.5, 0.6)}),
                                  ("iterand", {"method": "iterand", "rerand_period": 1, "rerand_rate": 0.5}))
            for coding in ("raw", "entropy")}


def _rewrite_symbols(path: Path, symbols: np.ndarray, alphabet: int, coding: str, counts: bool = True) -> None:
    """The mask file rewritten with these symbols, config.json made to agree (sizes, checksums, and
    with ``counts`` the layers' symbol counts and kept counts) and resealed, as an attacker would."""
    import safetensors.torch
    from timm_fslt import entropy
    config = _config(path)
    own = _own(config)
    sizes = [row["free"] for row in own["layers"]]
    parts = np.split(symbols.astype(np.uint32), np.cumsum(sizes)[:-1])
    if coding == "raw":
        payload, fields = entropy.pack(symbols, alphabet), {}
    else:
        payload, records = entropy.encode_streams(parts, alphabet)
        fields = {"entropy_bytes": len(payload), "entropy_layers": [[r.method, r.bytes] for r in records]}
    blob = safetensors.torch.save({"supermask": torch.frombuffer(bytearray(payload), dtype=torch.uint8)},
                                  metadata={"format": "timm_fslt.supermask"})
    (path / "supermask.safetensors").write_bytes(blob)
    own["mask"].update(bytes=len(payload), alphabet=alphabet, bits=symbols.size * entropy.symbol_bits(alphabet),
                       **fields)
    if counts:
        for row, part in zip(own["layers"], parts):
            c = np.bincount(part.astype(np.int64))
            row["symbol_counts"] = [[int(v), int(c[v])] for v in np.flatnonzero(c)]
            row["kept"] = row["locked"] + int((part >= 1).sum())
    own["files"]["supermask.safetensors"] = {"bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
    _write(path, config, reseal=True)


def _symbols(path: Path) -> np.ndarray:
    from timm_fslt.ticket.format import read_ticket
    return read_ticket(path)[1].numpy().astype(np.int64)


@pytest.mark.parametrize("coding", ["raw", "entropy"])
def test_a_method_tickets_symbols_out_of_range_or_moved_are_refused_even_resealed(method_tickets, tmp_path, coding):
    source = method_tickets["multicoated", coding]
    symbols = _symbols(source)
    assert symbols.max() == 3 and timm_fslt.load_ticket(source) is not None
    # a level above the coats: the alphabet must grow, which a 3-coat ticket refuses
    bad = symbols.copy()
    bad[0] = 4
    target = _copy(source, tmp_path / "level")
    _rewrite_symbols(target, bad, 5, coding)
    with pytest.raises(TicketError, match="3-coat multicoated ticket has 4 symbols, not 5"):
        timm_fslt.load_ticket(target)
    # a level moved within the range: the coats then keep other counts than the configuration selects
    moved = symbols.copy()
    moved[np.flatnonzero(symbols == 3)[0]] = 2
    target = _copy(source, tmp_path / "moved")
    _rewrite_symbols(target, moved, 4, coding)
    with pytest.raises(TicketError, match="coat 3 keeps"):
        timm_fslt.load_ticket(target)
    # two levels swapped (the counts hold): the weights differ from the saved masked_digest
    swapped = symbols.copy()
    a, b = np.flatnonzero(symbols == 3)[0], np.flatnonzero(symbols == 0)[0]
    swapped[a], swapped[b] = 0, 3
    target = _copy(source, tmp_path / "swapped")
    _rewrite_symbols(target, swapped, 4, coding)
    with pytest.raises(TicketChecksumError, match="masked_digest"):
        timm_fslt.load_ticket(target)
    # the symbols rewritten, config.json's counts not: the decoded counts differ from the recorded ones
    target = _copy(source, tmp_path / "counts")
    _rewrite_symbols(target, swapped[::-1].copy(), 4, coding, counts=False)
    with pytest.raises(TicketError, match="symbol counts|kept free weights"):
        timm_fslt.load_ticket(target)


@pytest.mark.parametrize("coding", ["raw", "entropy"])
def test_an_iterand_round_out_of_range_or_a_wrong_round_is_refused(method_tickets, tmp_path, coding):
    source = method_tickets["iterand", coding]
    symbols = _symbols(source)
    own = _own(_config(source))
    steps, alphabet = own["mask"]["search_step"], own["mask"]["alphabet"]
    assert alphabet >= 3 and timm_fslt.load_ticket(source) is not None  # kept weights were re-drawn
    # a round later than the rounds the saved step count ran
    bad = symbols.copy()
    bad[np.flatnonzero(symbols >= 1)[0]] = steps + 2  # 1 + round (steps + 1)
    target = _copy(source, tmp_path / "late")
    _rewrite_symbols(target, bad, steps + 3, coding)
    with pytest.raises(TicketError, match=f"holds rounds up to {steps + 1}, but {steps} steps"):
        timm_fslt.load_ticket(target)
    # another (possible) round for a kept weight: another weight value, refused by the masked digest
    wrong = symbols.copy()
    where = np.flatnonzero(symbols >= 2)[0]
    wrong[where] = 1 if symbols[where] != 1 else 2
    target = _copy(source, tmp_path / "wrong")
    _rewrite_symbols(target, wrong, alphabet, coding)
    with pytest.raises(TicketChecksumError, match="masked_digest"):
        timm_fslt.load_ticket(target)


def test_a_method_ticket_truncated_or_claimed_by_an_older_format_is_refused(method_tickets, tmp_path):
    source = method_tickets["multicoated", "raw"]
    target = _copy(source, tmp_path / "cut")
    data = (target / "supermask.safetensors").read_bytes()
    (target / "supermask.safetensors").write_bytes(data[:-3])
    with pytest.raises(TicketChecksumError):
        timm_fslt.load_ticket(target)
    symbols = _symbols(source)  # cut and resealed to match: the payload no longer holds the symbols
    target = _copy(source, tmp_path / "cut-resealed")
    _rewrite_symbols(target, symbols, 4, "raw")
    config = _config(target)
    import safetensors.torch
    payload = safetensors.torch.load_file(target / "supermask.safetensors")["supermask"][:-2].contiguous()
    blob = safetensors.torch.save({"supermask": payload}, metadata={"format": "timm_fslt.supermask"})
    (target / "supermask.safetensors").write_bytes(blob)
    _own(config)["mask"]["bytes"] = payload.numel()
    _own(config)["files"]["supermask.safetensors"] = {"bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
    _write(target, config, reseal=True)
    with pytest.raises(TicketError, match="free weights"):
        timm_fslt.load_ticket(target)
    for version, message in ((5, "needs format_version 6, the ticket has 5"), (4, "needs format_version 6")):
        target = _copy(source, tmp_path / f"v{version}")
        config = _config(target)
        _own(config)["format_version"] = version
        _write(target, config, reseal=True)
        with pytest.raises(TicketError, match=message):
            timm_fslt.load_ticket(target)
    target = _copy(source, tmp_path / "no-alphabet")  # format 6 without its symbol fields
    config = _config(target)
    del _own(config)["mask"]["alphabet"]
    _write(target, config, reseal=True)
    with pytest.raises(TicketError, match="format 6 records no alphabet"):
        timm_fslt.load_ticket(target)
