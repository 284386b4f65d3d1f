"""The compiled regeneration kernels (timm_fslt/regen/native.py) against the torch path and the
NumPy reference decoder: the same bits for every rule, dtype, position set and freezing count,
ties at the ranks included, in this process (both paths) and across CPU capabilities and thread
counts in subprocesses (tests/test_generator_v2.py's golden digests run the default path, which
is the native one; here the torch path is checked to agree with it)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from timm_fslt import reference_decoder as ref
from timm_fslt.regen import init, native, pattern
from timm_fslt.regen.topk import keys_topk_mask

pytestmark = pytest.mark.skipif(native.kernels() is None, reason="numba is not installed")

SHAPES = [(7,), (64, 3, 7, 7), (256, 128, 3, 3), (1000, 300)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.fixture
def torch_path(monkeypatch):
    """Run a callable on the torch path (the kernels switched off), then on the native one."""
    def both(fn):
        monkeypatch.setenv(native.ENV, "torch")
        assert native.usable("cpu") is None
        slow = fn()
        monkeypatch.setenv(native.ENV, "native")
        assert native.usable("cpu") is not None
        return slow, fn()
    return both


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


@pytest.mark.parametrize("kind", init.WEIGHT_INITS)
def test_weights_equal_the_torch_path_for_every_dtype_and_shape(kind, torch_path):
    for dtype in DTYPES:
        for shape in SHAPES:
            slow, fast = torch_path(lambda: init.random_weight(kind, 5, "blocks.0.conv", shape, "cpu", dtype))
            assert same_bits(slow, fast), (kind, dtype, shape)


@pytest.mark.parametrize("kind", init.SCORE_INITS)
def test_draws_at_positions_equal_the_torch_path_and_the_full_draw(kind, torch_path):
    shape = (512, 64, 3, 3)
    positions = torch.randperm(int(np.prod(shape)), generator=torch.Generator().manual_seed(0))[:50_000].sort().values
    slow, fast = torch_path(lambda: init.random_weight(kind, 1, "fc", shape, "cpu", torch.float32,
                                                         stream="score", positions=positions))
    assert same_bits(slow, fast)
    full = init.random_weight(kind, 1, "fc", shape, "cpu", torch.float32, stream="score")
    assert same_bits(full.reshape(-1)[positions], fast)
    empty = init.random_weight(kind, 1, "fc", shape, "cpu", torch.float32, stream="score",
                               positions=positions[:0])
    assert empty.shape == (0,)


def test_regenerated_tables_equal_the_torch_path(torch_path):
    for dtype in DTYPES:
        slow, fast = torch_path(lambda: init.regenerated_table(3, "pos_embed", (1, 197, 64), 0.02, "cpu", dtype))
        assert same_bits(slow, fast), dtype


@pytest.mark.parametrize("shape,n_pruned,n_locked", [
    ((100,), 0, 0), ((100,), 100, 0), ((100,), 0, 100), ((100,), 30, 70), ((7, 7), 10, 5), ((1,), 1, 0),
    ((3000,), 1, 2998), ((256, 128, 3, 3), 103_219, 103_219), ((1000, 300), 0, 150_000), ((1000, 300), 299_999, 1),
])
def test_freezing_codes_equal_the_torch_path(shape, n_pruned, n_locked, torch_path):
    slow, fast = torch_path(lambda: pattern.frozen_code(9, "layer3.1.conv2", shape, n_pruned, n_locked, "cpu"))
    assert same_bits(slow, fast)
    assert int((fast == -1).sum()) == n_pruned and int((fast == 1).sum()) == n_locked


def _reference_code(h: np.ndarray, n_pruned: int, n_locked: int) -> torch.Tensor:
    """The torch path's rule on given hashes: the (hash, index)-first positions (pattern.frozen_code)."""
    keys = torch.from_numpy(h.astype(np.int64)).sub(1 << 31).to(torch.int32).bitwise_not_()
    code = torch.zeros(h.shape[0], dtype=torch.int8)
    if n_pruned + n_locked:
        code = keys_topk_mask(keys, n_pruned + n_locked).to(torch.int8)
    if n_pruned:
        code.masked_fill_(keys_topk_mask(keys, n_pruned), -1)
    return code


@pytest.mark.parametrize("uniform", [False, True])
def test_ties_at_the_ranks_go_to_the_lowest_index(uniform):
    # Hashes from tiny ranges tie everywhere (and make the uniform path's brackets miss, so its
    # fallback, the radix select, is what runs); the torch path's stable rule must hold exactly.
    g = np.random.default_rng(0)
    for trial in range(200):
        n = int(g.integers(1, 3000))
        span = int(g.choice([1, 2, 5, 50, 70_000, 2 ** 32 - 1]))
        base = 0 if span == 2 ** 32 - 1 else int(g.integers(0, 2 ** 32 - span))
        h = (g.integers(0, span, n) + base).astype(np.uint32)
        n_pruned = int(g.integers(0, n + 1))
        n_locked = int(g.integers(0, n - n_pruned + 1))
        got = native.code_of_hashes(h, n_pruned, n_locked, uniform=uniform)
        assert torch.equal(got, _reference_code(h, n_pruned, n_locked)), (trial, n, span, n_pruned, n_locked)


def test_uniform_hashes_with_ties_at_the_ranks():
    # Uniform hashes where the elements at both ranks share their hash with others (the bracket
    # path finds the value, then the lowest indices among the tied ones come first).
    g = np.random.default_rng(1)
    h = g.integers(0, 2 ** 32, 400_000, dtype=np.uint64).astype(np.uint32)
    order = np.argsort(h, kind="stable")
    for rank in (100_000, 250_000):
        h[order[rank - 3:rank + 4]] = h[order[rank]]  # seven equal hashes straddle the rank
    got = native.code_of_hashes(h, 100_000, 150_000, uniform=True)
    assert torch.equal(got, _reference_code(h, 100_000, 150_000))


def test_the_native_path_equals_the_numpy_reference_decoder():
    # An implementation that shares no code with either torch path: NumPy, uint64 arithmetic, argsort.
    for kind in ("kaiming_uniform", "kaiming_normal", "signed_kaiming_constant"):
        for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            ours = init.random_weight(kind, 4, "head.fc", (40, 300), "cpu", dtype)
            theirs = ref.random_weight(kind, 4, "head.fc", (40, 300), str(dtype).replace("torch.", ""), 2)
            if dtype == torch.bfloat16:  # (the decoder keeps bfloat16 values in float32 arrays)
                ours = ours.float()
            theirs = np.ascontiguousarray(theirs)
            assert np.array_equal(ours.numpy().view(np.uint8), theirs.view(np.uint8)), (kind, dtype)
    for n_pruned, n_locked in ((0, 0), (3000, 4000), (12_000, 0), (1, 11_999)):
        ours = pattern.frozen_code(4, "head.fc", (40, 300), n_pruned, n_locked)
        assert np.array_equal(ours.numpy(), ref.frozen_code(4, "head.fc", (40, 300), n_pruned, n_locked))


def test_concurrent_callers_get_the_same_bits():
    expected = init.random_weight("kaiming_normal", 2, "x", (300, 300, 3))
    results, errors = [], []

    def work():
        try:
            results.append(init.random_weight("kaiming_normal", 2, "x", (300, 300, 3)))
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)
    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 4
    assert all(same_bits(r, expected) for r in results)


def test_cuda_devices_and_huge_layers_use_the_torch_path():
    assert native.usable("cuda") is None and native.usable(torch.device("meta")) is None
    assert native.usable("cpu", torch.int64) is None
    assert native.usable("cpu", torch.float32, numel=(1 << 32) + 1) is None
    assert native.usable("cpu", torch.float32, numel=1 << 20) is not None


_SCRIPT = r"""
import hashlib, json, os, torch
from timm_fslt.regen import init, native, pattern
torch.set_num_threads(int(os.environ["THREADS"]))
assert (native.kernels() is None) == (os.environ.get("TIMM_FSLT_KERNELS") == "torch")
h = hashlib.sha256()
for kind in init.WEIGHT_INITS:
    for dtype in (torch.float32, torch.bfloat16):
        h.update(init.random_weight(kind, 7, "w", (300, 200, 3), "cpu", dtype).view(-1).view(torch.uint8).numpy())
h.update(pattern.frozen_code(7, "w", (300, 200, 3), 60_000, 50_000).numpy())
# the scores' gradient: one fused pass with the kernels, index_select and products on the torch path
from timm_fslt.nn import functional
from timm_fslt.nn.functional import masked_weight
functional.FUSED_GRADIENT = True  # (the compiled gradient where the kernels are on, the torch ops elsewhere)
g = torch.Generator().manual_seed(3)
# (integers times a power of two: torch.randn's own bits differ between CPU kernel paths)
w, grad = (torch.randint(-2 ** 20, 2 ** 20, (300, 400), generator=g).float() * 2.0 ** -17 for _ in range(2))
grad[::7] = 0.0
grad[1::9] = -0.0
index = torch.randperm(120_000, generator=g)[:50_000].sort().values.to(torch.int32)
scores = torch.randint(-1000, 1000, (1, 50_000), generator=g).float()
scores[0, ::5] = 0.0
scores.requires_grad_(True)
for scale in (None, torch.tensor(1.25)):
    scores.grad = None
    masked_weight(w, scores, torch.ones(300, 400, dtype=torch.bool), scale, index).backward(grad)
    h.update(scores.grad.view(-1).view(torch.uint8).numpy())
print("DIGEST", h.hexdigest())
"""


def test_same_digest_with_and_without_kernels_for_every_capability_and_thread_count():
    digests = {}
    runs = [("native", "default", "1"), ("native", "avx2", "2"), ("native", "avx512", "2"), ("torch", "default", "2")]
    for kernels, capability, threads in runs:
        env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "OUTDATED_IGNORE": "1", "THREADS": threads,
               native.ENV: kernels}
        out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=300, env=env)
        assert out.returncode == 0, out.stderr[-3000:]
        digests[(kernels, capability, threads)] = next(
            line for line in out.stdout.splitlines() if line.startswith("DIGEST "))
    assert len(set(digests.values())) == 1, json.dumps({"/".join(k): v for k, v in digests.items()})


def _mlp():
    return torch.nn.Sequential(torch.nn.Linear(300, 400), torch.nn.ReLU(), torch.nn.Linear(400, 300),
                               torch.nn.ReLU(), torch.nn.Linear(300, 10))


def _frozen_state(model):
    import timm_fslt
    out = {}
    for layer in timm_fslt.get_group(model).layers:
        out[layer.layer_name] = (layer.frozen.clone(), layer.scores.detach().clone(), layer.mask.clone())
    for name, buffer in model.named_buffers():
        out[name] = buffer.clone()
    return out


def test_freeze_of_a_whole_model_at_once_equals_the_torch_path(torch_path):
    import timm_fslt

    def frozen():
        torch.manual_seed(0)
        return _frozen_state(timm_fslt.freeze(_mlp(), prune=0.3, lock=0.2, seed=5))
    slow, fast = torch_path(frozen)
    assert slow.keys() == fast.keys()
    for key in slow:
        for a, b in zip(slow[key] if isinstance(slow[key], tuple) else (slow[key],),
                        fast[key] if isinstance(fast[key], tuple) else (fast[key],)):
            assert same_bits(a, b), key


def test_codes_from_freeze_keys_and_their_fallback_equal_the_rank_rule():
    import timm_fslt
    from timm_fslt.frozen import freeze_for_ticket, get_config

    reference = timm_fslt.freeze(_mlp(), prune=0.3, lock=0.2, seed=5)
    codes = {layer.layer_name: layer.frozen for layer in timm_fslt.get_group(reference).layers}
    counts = {name: (int((c == -1).sum()), int((c == 1).sum())) for name, c in codes.items()}
    good = {name: pattern.freeze_keys_of_code(5, name, code, *counts[name]) for name, code in codes.items()}
    wrong = {name: (0, 2 ** 64 - 1) for name in codes}  # every weight "locked": the counts differ, rank rule used
    for keys in (good, wrong, {}):
        rebuilt = freeze_for_ticket(_mlp(), get_config(reference), keys)
        for layer in timm_fslt.get_group(rebuilt).layers:
            assert torch.equal(layer.frozen, codes[layer.layer_name]), layer.layer_name
            free = layer.free_index()
            assert torch.equal(free.index.long(), (layer.frozen.reshape(-1) == 0).nonzero().squeeze(1))
            assert free.n_locked == counts[layer.layer_name][1]


@pytest.mark.parametrize("scaled", [False, True])
def test_the_fused_score_gradient_equals_the_torch_path_bit_for_bit(scaled):
    from timm_fslt.nn import functional
    g = torch.Generator().manual_seed(11)
    n, f = 200_000, 90_000
    grad, weight = torch.randn(n, generator=g), torch.randn(n, generator=g)
    grad[::7], grad[1::11], grad[5], weight[3] = 0.0, -0.0, float("inf"), 1e-39  # zeros, inf, a subnormal
    weight[::13] = float("nan")
    index = torch.randperm(n, generator=g)[:f].sort().values.to(torch.int32)
    scores = torch.randn(f, generator=g)
    scores[::5], scores[::9], scores[::17] = 0.0, -0.0, float("nan")  # torch.sign: 0 for all three
    scale = torch.tensor(1.3779) if scaled else None
    fused = native.free_gradient(grad, weight, index, scores, scale)
    expected = functional._free_values(grad, index).mul_(functional._free_values(weight, index))
    if scale is not None:
        expected.mul_(scale)
    functional._mul_sign_(expected, scores)
    assert fused is not None and torch.equal(fused.view(torch.int32), expected.view(torch.int32))
    # what it leaves to the torch path: other dtypes, strided gradients
    assert native.free_gradient(grad.double(), weight.double(), index, scores, scale) is None
    assert native.free_gradient(grad.view(400, 500).t(), weight, index, scores, scale) is None
