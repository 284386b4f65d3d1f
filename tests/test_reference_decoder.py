"""timm_fslt/reference_decoder.py (stdlib + NumPy only) reproduces the package bit for bit."""
import hashlib
import importlib.util
import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import timm_fslt
from timm_fslt.regen import rng

DECODER = Path(timm_fslt.__file__).parent / "reference_decoder.py"
FIXTURES = Path(__file__).parent / "fixtures"
ARCH = {"timm": "mnist_cnn", "kwargs": {"width": 0.125, "img_size": 8}}
INITS = ("kaiming_uniform", "kaiming_normal", "signed_kaiming_constant")
SCALES = (None, "static", "dynamic")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}

# Runs the decoder file with torch unimportable, once per (ticket, output) pair.
_DRIVER = textwrap.dedent("""
    import json, runpy, sys
    sys.modules["torch"] = None  # any 'import torch' now raises ImportError
    codes, decoder = [], sys.argv[1]
    for ticket, out in json.loads(sys.argv[2]):
        sys.argv = [decoder, ticket, "--out", out]
        try:
            runpy.run_path(decoder, run_name="__main__")
            codes.append(0)
        except SystemExit as stop:
            codes.append(stop.code)
    assert "numpy" in sys.modules and sys.modules["torch"] is None
    assert not any(name.startswith("timm_fslt") for name in sys.modules), "the decoder imported the package"
    print("CODES", json.dumps(codes))
""")


def run_decoder(pairs):
    out = subprocess.run([sys.executable, "-c", _DRIVER, str(DECODER), json.dumps([[str(a), str(b)] for a, b in pairs])],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(next(x for x in out.stdout.splitlines() if x.startswith("CODES "))[6:]), out.stderr


def _searched_ticket(directory, weight_init, scale, dtype, seed):
    model = timm_fslt.create_model(ARCH["timm"], **ARCH["kwargs"]).to(dtype)
    timm_fslt.freeze(model, prune=0.2, lock=0.3, weight_init=weight_init, scale=scale, seed=seed)
    x = torch.linspace(-1, 1, 4 * 64).reshape(4, 1, 8, 8).to(dtype)
    y = torch.tensor([0, 3, 5, 9])
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=2.0, momentum=0.9)
    before = [layer.mask.clone() for layer in timm_fslt.get_group(model).layers]
    for _ in range(2):  # a couple of search steps, so the mask is not the initial one
        F.cross_entropy(model(x).float(), y).backward()
        opt.step()
        opt.zero_grad()
    model(x)
    after = [layer.mask for layer in timm_fslt.get_group(model).layers]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    timm_fslt.save_ticket(model, directory, architecture=ARCH)
    return directory


def _package_arrays(directory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = timm_fslt.load_ticket(directory)
    plain = timm_fslt.materialize(loaded).state_dict()
    out = {}
    for layer in timm_fslt.get_group(loaded).layers:
        weight = plain[layer.layer_name + ".weight"]
        out[layer.layer_name] = (weight.float() if weight.dtype == torch.bfloat16 else weight).numpy(), \
            layer.frozen.numpy(), layer.mask.numpy()
    return out


def _assert_same(npz_path, directory, dtype_name):
    got = np.load(npz_path)
    expected = _package_arrays(directory)
    regenerated = _record(json.loads((Path(directory) / "config.json").read_text())).get(
        "regenerated", {}).get("tensors", {})
    assert sorted(got.files) == sorted([f"{n}.{part}" for n in expected for part in ("weight", "frozen", "mask")]
                                       + list(regenerated))
    plain = timm_fslt.materialize(timm_fslt.load_ticket(directory)).state_dict()
    for key in regenerated:  # the constants (norms, biases) the ticket does not store
        value = plain[key].float() if plain[key].dtype == torch.bfloat16 else plain[key]
        assert got[key].tobytes() == value.numpy().tobytes(), key
    for name, (weight, frozen, mask) in expected.items():
        w = got[f"{name}.weight"]
        assert w.dtype == (np.float32 if dtype_name == "bfloat16" else weight.dtype) and w.shape == weight.shape
        assert w.tobytes() == weight.tobytes(), name  # bit for bit, signed zeros included
        assert got[f"{name}.frozen"].dtype == np.int8 and np.array_equal(got[f"{name}.frozen"], frozen)
        assert got[f"{name}.mask"].dtype == np.bool_ and np.array_equal(got[f"{name}.mask"], mask)
        if dtype_name == "bfloat16":  # exact bfloat16 values: the low 16 bits are zero
            assert not (w.view(np.uint32) & 0xFFFF).any()


def test_decoder_reproduces_materialize_for_every_init_scale_and_dtype(tmp_path):
    cases, pairs = [], []
    seed = 0
    for dtype_name, dtype in DTYPES.items():
        for weight_init in INITS:
            for scale in SCALES:
                seed += 1
                d = _searched_ticket(tmp_path / f"{dtype_name}-{weight_init}-{scale}", weight_init, scale, dtype, seed)
                cases.append((d, dtype_name))
                pairs.append((d, tmp_path / f"{d.name}.npz"))
    d = _searched_ticket(tmp_path / "float16", "kaiming_normal", "dynamic", torch.float16, 99)
    cases.append((d, "float16"))
    pairs.append((d, tmp_path / "float16.npz"))
    # version-1 tickets written by the old code: no freeze_keys (ranks computed), no dtype
    for name in ("ticket_v1_kaiming_uniform", "ticket_v1_signed_kaiming_constant"):
        cases.append((FIXTURES / name, "float32"))
        pairs.append((FIXTURES / name, tmp_path / f"{name}.npz"))
    codes, _ = run_decoder(pairs)
    assert codes == [0] * len(pairs)
    for (directory, dtype_name), (_, npz) in zip(cases, pairs):
        _assert_same(npz, directory, dtype_name)


def _load_decoder_module():
    spec = importlib.util.spec_from_file_location("reference_decoder_under_test", DECODER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_decoder_tables_and_constants_are_the_generators():
    dec = _load_decoder_module()
    assert dec.NORMAL_TABLE == rng._NORMAL_TABLE  # one copy: the generator imports the decoder's table
    assert (dec.Y, dec.FRAC, dec.SEG_BITS) == (rng._Y, rng.NORMAL_FRAC, rng._SEG_BITS)
    assert dec.GENERATOR_VERSIONS == rng.GENERATOR_VERSIONS
    h = rng.bits(3, "a", "weight", 5000)
    assert np.array_equal(dec.hashes(3, "a", "weight", 5000).astype(np.int64), h.numpy())
    assert np.array_equal(dec.normal_fixed(h.numpy()), rng.normal_fixed(h.clone()).numpy())


# -- bad input: one line naming the file, exit 2, nothing written ----------------------------
@pytest.fixture(scope="module")
def good_ticket(tmp_path_factory):
    return _searched_ticket(tmp_path_factory.mktemp("dec") / "t", "kaiming_uniform", "dynamic", torch.float32, 5)


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _record(document):
    """The ticket's record: format 4 keeps it under "timm_fslt" (timm's keys at the top)."""
    return document["timm_fslt"] if isinstance(document.get("timm_fslt"), dict) else document


def _edit_config(directory, **fields):
    path = directory / "config.json"
    document = json.loads(path.read_text())
    _record(document).update(fields)
    path.write_text(json.dumps(document))


def _run_bad(directory, out):
    r = subprocess.run([sys.executable, str(DECODER), str(directory), "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert not out.exists() and not list(out.parent.glob(".reference_decoder.*"))
    return lines[0]


def test_missing_directory(tmp_path):
    line = _run_bad(tmp_path / "nope", tmp_path / "w.npz")
    assert "nope" in line and "not a directory" in line


def test_tampered_mask_file_fails_the_checksum(good_ticket, tmp_path):
    d = _copy(good_ticket, tmp_path / "t")
    data = bytearray((d / "supermask.safetensors").read_bytes())
    data[-1] ^= 1
    (d / "supermask.safetensors").write_bytes(bytes(data))
    line = _run_bad(d, tmp_path / "w.npz")
    assert "supermask.safetensors" in line and "sha256" in line


def test_missing_state_file(good_ticket, tmp_path):
    d = _copy(good_ticket, tmp_path / "t")
    (d / "state.safetensors").unlink()
    line = _run_bad(d, tmp_path / "w.npz")
    assert "state.safetensors" in line and "missing" in line


@pytest.mark.parametrize("field,value,message", [("generator_version", 3, "unknown generator_version 3"),
                                                 ("format_version", 99, "unknown format_version 99")])
def test_unknown_versions(good_ticket, tmp_path, field, value, message):
    d = _copy(good_ticket, tmp_path / "t")
    _edit_config(d, **{field: value})
    line = _run_bad(d, tmp_path / "w.npz")
    assert "config.json" in line and message in line


def test_an_edited_config_fails_its_integrity_record(good_ticket, tmp_path):
    config = _record(json.loads((good_ticket / "config.json").read_text()))
    assert config["format_version"] == 4 and "integrity" in config
    d = _copy(good_ticket, tmp_path / "t")
    freeze = dict(config["freeze"], seed=config["freeze"]["seed"] + 1)
    _edit_config(d, freeze=freeze)
    line = _run_bad(d, tmp_path / "w.npz")
    assert "config.json" in line and "integrity" in line


def test_a_version_1_normal_ticket_is_refused(tmp_path):
    model = timm_fslt.create_model(ARCH["timm"], **ARCH["kwargs"])
    timm_fslt.freeze(model, prune=0.2, lock=0.3, weight_init="kaiming_normal", generator_version=1)
    timm_fslt.save_ticket(model, tmp_path / "t", architecture=ARCH)
    line = _run_bad(tmp_path / "t", tmp_path / "w.npz")
    assert "kaiming_normal" in line and "version 1" in line


def test_an_existing_output_survives_a_failed_decode(good_ticket, tmp_path):
    d = _copy(good_ticket, tmp_path / "t")
    (d / "supermask.safetensors").write_bytes(b"garbage")
    out = tmp_path / "w.npz"
    out.write_bytes(b"old")
    r = subprocess.run([sys.executable, str(DECODER), str(d), "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 2 and out.read_bytes() == b"old"
    assert hashlib.sha256(out.read_bytes()).hexdigest() == hashlib.sha256(b"old").hexdigest()
