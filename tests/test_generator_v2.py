"""Generator version 2: golden vectors, an independent pure-Python evaluation, the
normal's accuracy, bit-identity across CPU capabilities and thread counts, the
elementwise freezing rule (t1, t2), and ticket integration (v1 tickets still load)."""
import hashlib
import json
import math
import os
import struct
import subprocess
import sys
import textwrap
import warnings
from fractions import Fraction
from pathlib import Path

import pytest
import torch

import timm_fslt
from timm_fslt.nn import modules as layers
from timm_fslt.regen import init, pattern as freezing, rng
from timm_fslt.ticket import read_config

from regen_reference import code_from_keys, normal_fixed_stream

FIXTURES = Path(__file__).parent / "fixtures"
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# lengths that are not a multiple of any vector width, and one above the chunk size
SHAPES = [(1,), (37,), (3, 5, 7), (rng._CHUNK + 123,)]


def _sha(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.view(torch.int16)
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()[:16]


def _sha_all(tensors) -> str:
    return hashlib.sha256("".join(_sha(t) for t in tensors).encode()).hexdigest()[:16]


# -- golden vectors ---------------------------------------------------------------------
GOLDEN_STREAMS = {"bits": "65646125925dde0e", "uniform": "386b32016e5c6726", "normal": "e0cd879422be5a99",
                  "normal_fixed": "2fdef35443f9e1c4"}
GOLDEN_WEIGHTS = {
    "kaiming_uniform/torch.float32": "8f413231a904ff84", "kaiming_uniform/torch.float64": "dabb0da4f54f7c9c",
    "kaiming_uniform/torch.bfloat16": "877099cd32d25d00", "kaiming_uniform/torch.float16": "be12f0bca91dd0d0",
    "kaiming_normal/torch.float32": "5116e9542fd031e3", "kaiming_normal/torch.float64": "4d532f209c2457e0",
    "kaiming_normal/torch.bfloat16": "ac8ad9ec58a460b0", "kaiming_normal/torch.float16": "e262d9c81e790eff",
    "signed_kaiming_constant/torch.float32": "7909d538b7c3818c",
    "signed_kaiming_constant/torch.float64": "98c1fb780a2f2d55",
    "signed_kaiming_constant/torch.bfloat16": "27c24827bc44dae5",
    "signed_kaiming_constant/torch.float16": "f22028ebe68fb717"}


def _stream_digest(kind):
    fn = {"bits": rng.bits, "uniform": rng.uniform, "normal": rng.normal, "normal_fixed": normal_fixed_stream}[kind]
    return _sha_all(fn(5, "blocks.1.conv2", "score", math.prod(s)) for s in SHAPES)


def _weight_digest(kind, dtype):
    return _sha_all(init.random_weight(kind, 9, "layer2.0.conv1", s, dtype=dtype) for s in SHAPES)


def test_golden_first_values_of_every_v2_stream():
    assert rng.GENERATOR_VERSION == 2
    assert rng.bits(0, "conv1", "weight", 3).tolist() == [588910132, 2383137991, 2589257874]  # = version 1
    assert normal_fixed_stream(0, "conv1", "weight", 4).tolist() == [300542461354, -439635574225, -347838804781, 414083650179]
    w = {kind: init.random_weight(kind, 0, "conv1", (2, 3, 1, 1), dtype=torch.float64).reshape(-1)[:3]
         for kind in init.WEIGHT_INITS}
    assert {k: [x.hex() for x in v.tolist()] for k, v in w.items()} == {
        "kaiming_uniform": ["-0x1.06c17f3726b6dp+0", "0x1.3dd3aa09c1db1p-3", "0x1.29e906f4fc47bp-2"],
        "kaiming_normal": ["0x1.c913f8f4b9277p-1", "-0x1.4e4ef541a3a3fp+0", "-0x1.0881119506b17p+0"],
        "signed_kaiming_constant": ["-0x1.a20bd700c2c3fp-1", "0x1.a20bd700c2c3fp-1", "0x1.a20bd700c2c3fp-1"]}


@pytest.mark.parametrize("kind", list(GOLDEN_STREAMS))
def test_golden_stream_digests(kind):
    assert _stream_digest(kind) == GOLDEN_STREAMS[kind]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", init.WEIGHT_INITS)
def test_golden_weight_digests(kind, dtype):
    assert _weight_digest(kind, dtype) == GOLDEN_WEIGHTS[f"{kind}/{dtype}"]


# -- an independent evaluation in Python integers and fractions ----------------------------
M32 = 0xFFFFFFFF


def _py_hash(seed, name, stream, i):
    k0, k1, k2 = struct.unpack("<3I", hashlib.sha256(f"{seed}/{name}/{stream}".encode()).digest()[:12])

    def mix(x):
        x ^= x >> 16
        x = x * 0x7FEB352D & M32
        x ^= x >> 15
        x = x * 0x846CA68B & M32
        return x ^ (x >> 16)
    return mix((mix(mix((i & M32) ^ k0) ^ (i >> 32) ^ k1) + k2) & M32)


def _py_normal_z(h):
    """+-Z by the README's text: sign bit 31, t odd, k = clz32(t), segment, rounded Horner."""
    t = 2 * (h & 0x7FFFFFFF) + 1
    k = 32 - t.bit_length()
    x = t << k
    row = rng._NORMAL_TABLE[k * 8 + ((x >> 28) & 7)]
    y = x & (2 ** 28 - 1)
    acc = row[6]
    for c in reversed(row[:6]):
        acc = c + (acc * y + 2 ** 27) // 2 ** 28  # floor division = arithmetic shift
    return -acc if h >> 31 else acc


def _py_round(value: Fraction, dtype) -> float:
    """Exact value -> float64 (correctly rounded: Fraction -> float) -> float32 -> 16-bit, each RNE."""
    x = float(value)
    if dtype == torch.float64:
        return x
    f32 = struct.unpack("<f", struct.pack("<f", x))[0]  # C double -> float: round to nearest even
    if dtype == torch.float32:
        return f32
    if dtype == torch.float16:
        return struct.unpack("<e", struct.pack("<e", f32))[0]  # round to nearest even
    bits = struct.unpack("<I", struct.pack("<f", f32))[0]
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def _py_weight(kind, seed, name, shape, i, dtype):
    fan_in = shape[1] * math.prod(shape[2:])
    std = math.sqrt(2.0) / math.sqrt(fan_in)
    h = _py_hash(seed, name, "weight", i)
    if kind == "kaiming_uniform":
        exact = Fraction(2 * h + 1 - 2 ** 32) * Fraction(std * math.sqrt(3.0) * 2.0 ** -32)
    elif kind == "kaiming_normal":
        exact = Fraction(_py_normal_z(h)) * Fraction(std * 2.0 ** -38)
    else:
        exact = Fraction(1 if h >> 31 else -1) * Fraction(std)
    return _py_round(exact, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_weights_equal_an_exact_python_evaluation(dtype):
    shape = (520, 64, 3, 3)  # 299,520 weights: past one chunk
    positions = torch.tensor(sorted({(i * 7919 + 13) % math.prod(shape) for i in range(300)} |
                                    {0, 1, rng._CHUNK - 1, rng._CHUNK, math.prod(shape) - 1}))
    for kind in init.WEIGHT_INITS:
        got = init.random_weight(kind, 17, "stages.2.conv", shape, dtype=dtype)
        got = got.reshape(-1)[positions].double().tolist()
        ref = [_py_weight(kind, 17, "stages.2.conv", shape, int(i), dtype) for i in positions]
        assert got == ref, kind


def test_normal_fixed_equals_the_python_integer_evaluation_on_every_segment():
    # every octave and part, both signs, and the extreme inputs t = 1 and t = 2**32 - 1
    hs = [0, 0x7FFFFFFF, 0x80000000, M32]
    for k in range(32):
        for j in range(8):
            t = ((8 + j) << (28 - k)) if k <= 28 else (1 << (31 - k))
            hs += [(t | 1) >> 1, ((t | 1) >> 1) | 0x80000000]
    got = rng.normal_fixed(torch.tensor(hs, dtype=torch.int64)).tolist()
    assert got == [_py_normal_z(h) for h in hs]


# -- accuracy of the normal ---------------------------------------------------------------
def test_normal_quantile_error_against_the_exact_quantile():
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 40
    ts = sorted({1, 3, 5, 7, 2 ** 32 - 1} | {(2 ** 32 - 1) * i // 997 | 1 for i in range(1, 997)} |
                {(1 << b) + 1 for b in range(1, 32)} | {(1 << b) - 1 for b in range(2, 33)})
    z = rng.normal_fixed(torch.tensor([(t - 1) // 2 for t in ts], dtype=torch.int64)).tolist()
    worst = max(abs(mp.mpf(zi) / 2 ** 38 + mp.sqrt(2) * mp.erfinv(2 * mp.mpf(t) / 2 ** 33 - 1))
                for zi, t in zip(z, ts))
    assert worst < 1.25e-11  # make_normal_tables.py measures 1.24e-11 (400 inputs per segment); bound 2.6e-11
    assert max(z) == z[0] and z[0] / 2 ** 38 == pytest.approx(6.33796, abs=1e-5)  # t = 1: p = 2**-33


def test_normal_is_strictly_decreasing_in_t_across_every_segment_boundary():
    t = []
    for k in range(29):
        for j in range(8):
            edge = (8 + j) << (28 - k)
            t += range(max(1, edge - 64) | 1, edge + 64, 2)
    t = sorted(set(x for x in t if x < 2 ** 32))
    z = rng.normal_fixed(torch.tensor([(x - 1) // 2 for x in t], dtype=torch.int64))
    assert bool((z[1:] < z[:-1]).all())


def test_a_million_draws_are_standard_normal_mean_variance_and_kolmogorov_smirnov():
    n = 1_000_000
    z = rng.normal(2024, "layer", "score", n)
    assert abs(float(z.mean())) < 4 / math.sqrt(n)  # 4 standard errors
    assert abs(float(z.var()) - 1) < 4 * math.sqrt(2 / n)
    assert float((-z).mean()) == -float(z.mean())
    x = z.sort().values.tolist()
    cdf = torch.tensor([0.5 * math.erfc(-v / math.sqrt(2.0)) for v in x], dtype=torch.float64)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    ks = float(torch.maximum(i / n - cdf, cdf - (i - 1) / n).max())
    assert ks < 1.63 / math.sqrt(n)  # below the 1% critical value


# -- the same bits under every CPU capability and thread count -----------------------------
_DIGEST_SCRIPT = textwrap.dedent("""
    import hashlib, json, sys, torch
    from torch import nn
    import timm_fslt

    def sha(t):
        t = t.detach().contiguous()
        t = t.view(torch.int16) if t.dtype in (torch.bfloat16, torch.float16) else t
        return hashlib.sha256(t.numpy().tobytes()).hexdigest()[:16]

    def net():
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 16, 3, groups=2), nn.Flatten(),
                             nn.Linear(16, 10))

    out = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for init in ("kaiming_uniform", "kaiming_normal", "signed_kaiming_constant"):
            for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
                for score_init in ("kaiming_normal", "kaiming_uniform"):
                    m = timm_fslt.freeze(net().to(dtype), prune=0.3, lock=0.2, seed=11, weight_init=init,
                                         score_init=score_init)
                    rows = []
                    for layer in timm_fslt.get_group(m).layers:
                        rows.append(sha(layer.frozen) + sha(layer.scores))
                    for _, mod in timm_fslt.iter_frozen(m):
                        rows.append(sha(mod.parametrizations.weight.original))
                    out[f"{threads}/{init}/{dtype}/{score_init}"] = hashlib.sha256("".join(rows).encode()).hexdigest()[:16]
    print("DIGESTS", json.dumps(out, sort_keys=True))
""")

GOLDEN_MODEL_DIGEST = "a0b13ff514260f05"


def test_weights_codes_and_scores_are_identical_under_every_cpu_capability_and_thread_count():
    results = {}
    for capability in ("default", "avx2", "avx512"):
        env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "OUTDATED_IGNORE": "1"}
        out = subprocess.run([sys.executable, "-c", _DIGEST_SCRIPT], capture_output=True, text=True,
                             timeout=300, env=env)
        assert out.returncode == 0, out.stderr[-3000:]
        line = next(x for x in out.stdout.splitlines() if x.startswith("DIGESTS "))
        results[capability] = json.loads(line[len("DIGESTS "):])
    reference = results["default"]
    assert len(reference) == 2 * 3 * 4 * 2
    for capability, digests in results.items():
        assert digests == reference, capability
    for key, value in reference.items():  # one thread == two threads
        if key.startswith("1/"):
            assert reference["2/" + key[2:]] == value, key
    combined = hashlib.sha256(json.dumps(reference, sort_keys=True).encode()).hexdigest()[:16]
    assert combined == GOLDEN_MODEL_DIGEST


# -- the freezing pattern as two thresholds ------------------------------------------------
def _check_keys(seed, name, shape, n_pruned, n_locked):
    code = freezing.frozen_code(seed, name, shape, n_pruned, n_locked)
    t1, t2 = freezing.freeze_keys_of_code(seed, name, code, n_pruned, n_locked)
    assert torch.equal(code_from_keys(seed, name, shape, t1, t2), code), (name, n_pruned, n_locked)
    return t1, t2


def test_freeze_keys_reproduce_every_layer_of_a_resnet50():
    import timm
    with torch.device("meta"):  # shapes only
        model = timm.create_model("resnet50")
    targets = layers.find_maskable(model)
    shapes = [layers.weight_shape(m) for _, m in targets]
    assert len(shapes) == 54
    for (name, _), shape, (n_pruned, n_locked) in zip(targets, shapes,
                                                      freezing.frozen_counts(shapes, 0.35, 0.35, "erk")):
        t1, t2 = _check_keys(0, name, shape, n_pruned, n_locked)
        # (erk keeps some small layers dense: t1 = t2 = 0)
        assert (t1 == 0) == (n_pruned == 0) and (t1 == t2) == (n_locked == 0) and t1 <= t2 < 2 ** 64 - 1
    assert freezing.freeze_keys(0, "fc", (1000, 2048), 10, 20) == _check_keys(0, "fc", (1000, 2048), 10, 20)


def test_freeze_keys_edge_cases_and_sentinels():
    shape, n = (7, 11), 77
    assert _check_keys(1, "l", shape, 0, 0) == (0, 0)  # nothing frozen
    t1, t2 = _check_keys(1, "l", shape, 0, 30)  # no pruning: t1 = 0
    assert t1 == 0 and 0 < t2 < 2 ** 64 - 1
    t1, t2 = _check_keys(1, "l", shape, 30, 0)  # no locking: t2 = t1
    assert t1 == t2 > 0
    assert _check_keys(1, "l", shape, 0, n) == (0, 2 ** 64 - 1)  # everything locked
    assert _check_keys(1, "l", shape, n, 0) == (2 ** 64 - 1, 2 ** 64 - 1)  # everything pruned
    t1, t2 = _check_keys(1, "l", shape, 40, n - 40)  # everything frozen
    assert t2 == 2 ** 64 - 1
    _check_keys(1, "l", shape, 1, 0)
    _check_keys(1, "l", shape, n - 1, 1)
    # t1 is the key of the element of rank n_pruned: h * 2**32 + index
    h = rng.bits(1, "l", "freeze", n).tolist()
    keys = sorted((hv << 32) | i for i, hv in enumerate(h))
    assert _check_keys(1, "l", shape, 30, 10) == (keys[30], keys[40])
    with pytest.raises(ValueError, match="0 <= t1 <= t2"):
        code_from_keys(1, "l", shape, 5, 4)


def test_freeze_keys_with_hash_ties(monkeypatch):
    # a low-entropy hash: many positions tie, and the index must break the ties exactly
    # (the torch path, whose hashes this patches; the compiled kernels' ties: tests/test_native.py)
    monkeypatch.setenv("TIMM_FSLT_KERNELS", "torch")
    monkeypatch.setattr(rng, "_hash_range",
                        lambda key, a, b, device: (torch.arange(a, b, dtype=torch.int64) * 7919 + key[0]) % 5)
    for shape, n_pruned, n_locked in [((40, 50), 700, 500), ((2000,), 1, 0), ((2000,), 0, 1999),
                                      ((3, 3, 3, 3), 20, 61), ((1000,), 400, 0), ((10,), 3, 3)]:
        t1, t2 = _check_keys(0, "l", shape, n_pruned, n_locked)
        assert t1 >> 32 < 5 and (t2 >> 32 < 5 or t2 == 2 ** 64 - 1)


# -- tickets ---------------------------------------------------------------------------------
ARCH = {"timm": "mnist_cnn", "kwargs": {"width": 0.125, "img_size": 8}}


def _tiny(**kwargs):
    return timm_fslt.freeze(timm_fslt.create_model(ARCH["timm"], **ARCH["kwargs"]), prune=0.2, lock=0.3, **kwargs)


def test_new_tickets_record_version_2_dtypes_and_freeze_keys(tmp_path):
    model = _tiny(seed=2)
    timm_fslt.save_ticket(model, tmp_path / "t", architecture=ARCH)
    config = read_config(tmp_path / "t")
    assert config["generator_version"] == 2 and config["freeze"]["generator_version"] == 2
    for row, layer in zip(config["layers"], timm_fslt.get_group(model).layers):
        assert row["dtype"] == "float32"
        assert row["freeze_keys"] == list(freezing.freeze_keys(2, row["name"], row["shape"], row["pruned"],
                                                               row["locked"]))
        code = code_from_keys(2, row["name"], row["shape"], *row["freeze_keys"])
        assert torch.equal(code, layer.frozen)


def test_unknown_generator_versions_are_refused(tmp_path):
    from timm_fslt import ticket as T
    timm_fslt.save_ticket(_tiny(), tmp_path / "t", architecture=ARCH)
    path = tmp_path / "t" / "config.json"
    config = json.loads(path.read_text())
    config["timm_fslt"]["generator_version"] = 3  # format 4: our record under "timm_fslt"
    config = T.seal_config(config)  # keep the integrity record valid: the version check must refuse
    path.write_text(json.dumps(config))
    with pytest.raises(timm_fslt.errors.TicketVersionError, match="generator version 3"):
        timm_fslt.load_ticket(tmp_path / "t")
    with pytest.raises(ValueError, match="generator_version must be one of"):
        timm_fslt.FreezeConfig(generator_version=3)


def _sha256(t):
    return hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()


@pytest.mark.parametrize("name", ["ticket_v1_kaiming_uniform", "ticket_v1_signed_kaiming_constant"])
def test_version_1_tickets_saved_by_the_old_code_load_with_identical_weights(name):
    # tests/fixtures/make_v1_tickets.py wrote these with the generator-version-1 code
    expected = json.loads((FIXTURES / "expected_v1.json").read_text())[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (format 1 has no integrity record: warned, not refused)
        model = timm_fslt.load_ticket(FIXTURES / name)
    assert timm_fslt.get_config(model).generator_version == 1
    plain = timm_fslt.materialize(model)
    weights = {k: _sha256(v) for k, v in plain.state_dict().items() if k.endswith("weight")}
    assert weights == expected["weights"]  # the uniform and sign streams are exact on every CPU
    sys.path.insert(0, str(FIXTURES))
    try:
        from make_v1_tickets import fixed_input
    finally:
        sys.path.remove(str(FIXTURES))
    with torch.no_grad():
        out = model(fixed_input())
    # identical weights; the float32 convolutions' summation order is the CPU library's, so on
    # another machine the output may differ in the last bits -- bit-identical here:
    if _sha256(out) != expected["output_sha256"]:
        torch.testing.assert_close(out.reshape(-1), torch.tensor(expected["output"]), rtol=1e-5, atol=1e-6)


def test_a_version_1_normal_ticket_loads_with_a_warning(tmp_path):
    model = _tiny(weight_init="kaiming_normal", generator_version=1)
    timm_fslt.save_ticket(model, tmp_path / "t", architecture=ARCH)
    config = read_config(tmp_path / "t")
    assert config["generator_version"] == 1
    with pytest.warns(UserWarning, match="generator version 1 with weight_init='kaiming_normal'"):
        loaded = timm_fslt.load_ticket(tmp_path / "t")
    a, b = timm_fslt.materialize(model).state_dict(), timm_fslt.materialize(loaded).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # (on this machine)
    assert timm_fslt.get_config(loaded).generator_version == 1


# -- benchmarks/gpu_check.py: its CPU side ---------------------------------------------------
def _gpu_check():
    import importlib.util
    path = Path(__file__).parent.parent / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, path


def test_gpu_check_digests_compare_and_summary():
    gpu_check, _ = _gpu_check()
    a = gpu_check.model_digests(ARCH, "cpu", "kaiming_normal")
    assert len(a) == 3 * 4 and all(len(v) == 16 for v in a.values())
    assert gpu_check.compare(a, gpu_check.model_digests(ARCH, "cpu", "kaiming_normal")) == []
    b = dict(a, **{"fc/scores": "0" * 16})
    assert gpu_check.compare(a, b) == ["fc/scores"]
    assert gpu_check.compare(a, {k: v for k, v in a.items() if k != "fc/weight"}) == ["fc/weight"]
    line = gpu_check.format_summary(12, [], {"conv6 b128 fp32": (0.012, 0.010)})
    assert line == ("gpu_check: all 12 CUDA digests equal the CPU's; step time conv6 b128 fp32 frozen 12.0 ms / "
                    "dense 10.0 ms (1.20x)")
    assert "1 of 12 CUDA digests DIFFER from the CPU's (first: fc/scores)" in gpu_check.format_summary(
        12, ["fc/scores"], {})


def test_gpu_check_sync_free_comparison_runs_and_agrees_on_the_cpu():
    gpu_check, _ = _gpu_check()
    assert gpu_check.sync_free_mismatches(ARCH, (1, 8, 8), torch.device("cpu"), steps=2) == []
    line = gpu_check.format_summary(3, [], {}, {"conv6": (0, 2)})
    assert line.endswith("; host syncs per step conv6 frozen 0 / dense 2")


def test_gpu_check_without_cuda_exits_0_with_one_clear_line():
    _, path = _gpu_check()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OUTDATED_IGNORE": "1"}
    out = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines() == [
        "gpu_check: no CUDA device (torch.cuda.is_available() is False); nothing checked"]
