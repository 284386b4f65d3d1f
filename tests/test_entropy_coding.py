"""The entropy-coded supermask: the coder (timm_fslt/entropy.py) against an encoder and a decoder
written here from the documented algorithm, the reference decoder's own rANS decoder, the sizes
it promises, and tickets saved both ways (timm_fslt/ticket/mask_coding.py)."""
import hashlib
import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
import safetensors.torch
import torch

import timm_fslt
from timm_fslt import entropy
from timm_fslt import reference_decoder as ref
from timm_fslt.errors import TicketError
from timm_fslt.ticket import read_config, size_report_from_config

from helpers import masks

TOTAL = 1 << 24
HEADER = 1 + 2 + 2 * 2 + 4 * 2 + 4  # a binary rANS record's bytes before its words


def _documented_encoder(index, freqs):
    """README "Entropy-coded supermask", encoder side, in plain Python integers."""
    cum = [0]
    for f in freqs:
        cum.append(cum[-1] + int(f))
    x, out = 0, []
    for s in reversed([int(i) for i in index]):
        f = int(freqs[s])
        if x >> 40 >= f:
            out.append(x & 0xFFFFFFFF)
            x >>= 32
        x = ((x // f) << 24) | (cum[s] + x % f)
    while x:
        out.append(x & 0xFFFFFFFF)
        x >>= 32
    return out


def _stream(rng, n, alphabet, p):
    """n symbols: 0 with probability 1 - p, else uniform over the alphabet's other symbols."""
    other = rng.integers(1, alphabet, n) if alphabet > 2 else np.ones(n, np.int64)
    return np.where(rng.random(n) < p, other, 0).astype(np.uint32)


_CASES = [(n, a, p) for n in (0, 1, 2, 7, 8, 9, 33, 100, 1000, 4097) for a in (2, 3, 16, 256)
          for p in (0.0, 1e-3, 0.05, 0.3, 0.5, 0.9, 1.0)]


def test_constrictions_words_are_the_documented_encoders_with_our_frequencies():
    """constriction's model given the weights freqs - 1 is exactly freqs: same words as the
    encoder written from the documentation, for every alphabet and skew."""
    rng = np.random.default_rng(0)
    checked = 0
    for n, alphabet, p in _CASES:
        symbols = _stream(rng, n, alphabet, p)
        present, counts = np.unique(symbols, return_counts=True)
        if len(present) < 2:
            continue
        freqs = entropy.quantize(counts)
        index = np.searchsorted(present, symbols)
        assert entropy.rans_words(index, freqs).tolist() == _documented_encoder(index, freqs), (n, alphabet, p)
        checked += 1
    assert checked > 100


def test_quantize_gives_every_present_symbol_at_least_one_and_sums_to_2_24():
    rng = np.random.default_rng(1)
    for counts in ([1, 1], [1, 10**8], [3, 5, 7], [1] * 300, list(rng.integers(1, 10**6, 256)), [10**9, 1, 2]):
        freqs = entropy.quantize(counts)
        assert freqs.sum() == TOTAL and freqs.min() >= 1
        ideal = np.array(counts, dtype=np.float64) / sum(counts) * TOTAL
        assert np.abs(freqs - ideal).max() <= len(counts) + 1  # largest remainders: proportional to within k
    with pytest.raises(ValueError):
        entropy.quantize([5])


@pytest.mark.parametrize("alphabet", [2, 3, 16, 256])
def test_every_stream_decodes_to_itself_in_the_package_and_the_reference_decoder(alphabet):
    rng = np.random.default_rng(alphabet)
    streams = [_stream(rng, n, alphabet, p) for n, a, p in _CASES if a == alphabet]
    data, records = entropy.encode_streams(streams, alphabet)
    decoded, read = entropy.decode_streams(data, [s.size for s in streams], alphabet)
    assert read == records and all(np.array_equal(a, b) for a, b in zip(decoded, streams))
    methods = {r.method for r in records}
    assert methods == {"raw", "constant", "rans"}
    at = 0
    for s, record in zip(streams, records):
        if alphabet == 2:  # the reference decoder reads mask records (alphabet 2)
            bits, end = ref.entropy_layer(data, at, s.size, "test")
            assert np.array_equal(bits, s.astype(bool)) and end - at == record.bytes
        if record.method == "rans":  # its rANS decoder is general
            body = memoryview(data)[at:at + record.bytes]
            k = int.from_bytes(body[1:3], "little")
            freqs = list(np.frombuffer(body[3 + 2 * k:3 + 6 * k], "<u4"))
            words = list(np.frombuffer(body[3 + 6 * k + 4:], "<u4").astype(np.int64))
            present = np.frombuffer(body[3:3 + 2 * k], "<u2")
            assert np.array_equal(present[ref.rans_symbols([int(w) for w in words], [int(f) for f in freqs],
                                                           s.size, "test")], s)
        at += record.bytes


def test_edge_streams_take_the_method_their_size_calls_for():
    cases = {"empty": np.zeros(0, np.uint8), "one zero": np.zeros(1, np.uint8), "one one": np.ones(1, np.uint8),
             "all zeros": np.zeros(5000, np.uint8), "all ones": np.ones(5000, np.uint8),
             "one one in 100,000": np.eye(1, 100_000, 77_777, dtype=np.uint8)[0]}
    data, records = entropy.encode_streams(list(cases.values()), 2)
    got = dict(zip(cases, records))
    assert got["empty"] == entropy.Record("raw", 1)  # just the method byte
    assert got["one zero"].method == got["one one"].method == "raw"  # 2 bytes beat a 3-byte constant
    assert got["all zeros"] == got["all ones"] == entropy.Record("constant", 3)
    assert got["one one in 100,000"].method == "rans" and got["one one in 100,000"].bytes <= HEADER + 3 * 4
    decoded, _ = entropy.decode_streams(data, [s.size for s in cases.values()], 2)
    assert all(np.array_equal(a, b) for a, b in zip(decoded, cases.values()))


@pytest.mark.parametrize("p", [0.02, 0.2, 0.5, 0.8])
def test_a_large_layer_costs_within_one_percent_of_its_entropy_plus_the_header(p):
    rng = np.random.default_rng(int(p * 100))
    bits = (rng.random(400_000) < p).astype(np.uint8)
    (record,) = entropy.encode_streams([bits], 2)[1]
    h = entropy.entropy_bits(np.bincount(bits, minlength=2))
    assert record.method == ("raw" if p == 0.5 else "rans")
    # the header, and at most two words of final state beyond the information itself
    assert 8 * record.bytes <= 1.01 * h + 8 * HEADER + 64
    assert 8 * record.bytes >= h  # (no coder beats the entropy)
    assert record.bytes <= 1 + math.ceil(bits.size / 8)  # never more than raw and its method byte


def test_random_streams_are_never_larger_than_raw_plus_the_method_byte():
    rng = np.random.default_rng(3)
    for _ in range(200):
        n, alphabet = int(rng.integers(0, 3000)), int(rng.choice([2, 5, 16, 200]))
        symbols = _stream(rng, n, alphabet, float(rng.random()))
        (record,) = entropy.encode_streams([symbols], alphabet)[1]
        assert record.bytes <= 1 + entropy.raw_bytes(n, alphabet)


def _rans_record(bits):
    data, (record,) = entropy.encode_streams([bits], 2)
    assert record.method == "rans"
    return bytearray(data)


@pytest.mark.parametrize("damage, message", [
    (lambda d: d[:-1], "ends inside"),
    (lambda d: d + b"\0", "bytes follow the last layer's record"),
    (lambda d: bytes([7]) + d[1:], "unknown method 7"),
    (lambda d: d[:1] + (1).to_bytes(2, "little") + d[3:], "present symbols"),
    (lambda d: d[:3] + (1).to_bytes(2, "little") + d[5:], "not strictly increasing"),
    (lambda d: d[:7] + (5).to_bytes(4, "little") + d[11:], "sum to"),
    (lambda d: d[:15] + (2**32 - 1).to_bytes(4, "little") + d[19:], "larger than the raw record"),
    (lambda d: d[:-4] + bytes(4), "zero word"),
    (lambda d: d[:-4] + (int.from_bytes(d[-4:], "little") ^ 1).to_bytes(4, "little"), "do not end where"),
])
def test_a_damaged_record_is_a_coding_error_naming_what_is_wrong(damage, message):
    bits = (np.random.default_rng(5).random(3000) < 0.1).astype(np.uint8)
    data = bytes(damage(_rans_record(bits)))
    with pytest.raises(entropy.CodingError, match=message):
        entropy.decode_streams(data, [bits.size], 2)
    with pytest.raises(ref.DecodeError):
        ref.entropy_layer(data, 0, bits.size, "test") if message != "bytes follow the last layer's record" \
            else ref.mask_bits({"layers": [{"free": bits.size, "kept": int(bits.sum()), "locked": 0, "name": "l"}],
                                "mask": {"coding": "entropy"}, "format_version": 5},
                               np.frombuffer(data, np.uint8), "test")


def test_random_bytes_never_crash_the_decoders():
    rng = np.random.default_rng(6)
    good = bytes(_rans_record((rng.random(2000) < 0.2).astype(np.uint8)))
    for trial in range(300):
        data = bytearray(good)
        for _ in range(int(rng.integers(1, 4))):
            data[int(rng.integers(0, len(data)))] ^= 1 << int(rng.integers(0, 8))
        try:
            (out,), _ = entropy.decode_streams(bytes(data), [2000], 2)
            assert out.shape == (2000,) and out.max() <= 1
        except entropy.CodingError:
            pass
        try:
            ref.entropy_layer(bytes(data), 0, 2000, "test")
        except ref.DecodeError:
            pass


# -- tickets -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def skewed(tmp_path_factory):
    """A conv6 ticket in global scope whose layers keep very different fractions of their free
    weights (what a global Edge-Popup threshold does), saved raw, entropy-coded and by default."""
    torch.manual_seed(0)
    model = timm_fslt.create_model("conv6", width=0.125)
    timm_fslt.freeze(model, prune=0.35, lock=0.35, seed=3)
    group = timm_fslt.get_group(model)
    with torch.no_grad():
        for i, layer in enumerate(group.layers):
            layer.scores.mul_(4.0 ** (i - len(group.layers) // 2))  # score scales differ per layer
    group.refresh()
    root = tmp_path_factory.mktemp("coded")
    dirs = {c: timm_fslt.save_ticket(model, root / c, mask_coding=c) for c in ("raw", "entropy", "auto")}
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        out = model(x)
    return model, dirs, x, out


def test_a_ticket_saved_both_ways_loads_to_the_same_masks_and_outputs(skewed):
    model, dirs, x, out = skewed
    own = json.loads((dirs["entropy"] / "config.json").read_text())["timm_fslt"]
    assert own["format_version"] == 5 and own["mask"]["coding"] == "entropy"
    assert {m for m, _ in own["mask"]["entropy_layers"]} >= {"rans"}
    expected = masks(model)
    for coding, directory in dirs.items():
        loaded = timm_fslt.load_ticket(directory)
        got = masks(loaded)
        assert len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected)), coding
        with torch.no_grad():
            assert torch.equal(loaded(x), out), coding


def test_auto_stores_the_smaller_and_the_coded_mask_is_much_smaller_here(skewed):
    _, dirs, _, _ = skewed
    size = {c: (d / "supermask.safetensors").stat().st_size for c, d in dirs.items()}
    assert size["entropy"] < 0.8 * size["raw"]
    assert (dirs["auto"] / "supermask.safetensors").read_bytes() == (dirs["entropy"] / "supermask.safetensors").read_bytes()


def test_the_reference_decoder_gives_the_same_arrays_for_both_codings(skewed, tmp_path):
    _, dirs, _, _ = skewed
    arrays = {}
    for coding in ("raw", "entropy"):
        out = tmp_path / f"{coding}.npz"
        run = subprocess.run([sys.executable, ref.__file__, str(dirs[coding]), "--out", str(out)],
                             capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        arrays[coding] = dict(np.load(out))
    assert arrays["raw"].keys() == arrays["entropy"].keys()
    assert all(np.array_equal(arrays["raw"][k], arrays["entropy"][k]) for k in arrays["raw"])


def test_saving_the_same_model_twice_gives_the_same_bytes(skewed, tmp_path):
    model, dirs, _, _ = skewed
    again = timm_fslt.save_ticket(model, tmp_path / "again", mask_coding="entropy")
    for name in ("config.json", "supermask.safetensors", "state.safetensors"):
        assert (again / name).read_bytes() == (dirs["entropy"] / name).read_bytes(), name


@pytest.mark.parametrize("bad", ["zip", "Entropy", None, 1, True])
def test_a_bad_mask_coding_is_refused_by_name_and_changes_nothing(skewed, tmp_path, bad):
    model, dirs, _, _ = skewed
    directory = shutil.copytree(dirs["raw"], tmp_path / "t")
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for call in (lambda: timm_fslt.save_ticket(model, directory, mask_coding=bad),
                 lambda: timm_fslt.save_ticket(model, tmp_path / "new", mask_coding=bad),
                 lambda: timm_fslt.size_report(model, mask_coding=bad)):
        with pytest.raises(ValueError, match=r"mask_coding must be one of 'auto', 'raw', 'entropy', got"):
            call()
    if bad is not None:  # (push_to_hub's None: save_ticket's default)
        with pytest.raises(TicketError, match="mask_coding must be one of"):
            timm_fslt.push_to_hub(model, "me/x", mask_coding=bad)
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    assert not (tmp_path / "new").exists()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_size_report_gives_the_stored_raw_coded_and_entropy_bits_honestly(skewed):
    model, dirs, _, _ = skewed
    for coding in ("raw", "entropy"):
        config = read_config(dirs[coding])
        report = size_report_from_config(config)
        assert str(report) == str(timm_fslt.size_report(model, mask_coding=coding))
        assert report.to_dict() == timm_fslt.size_report(model, mask_coding=coding).to_dict()
        payload = config["files"]["supermask.safetensors"]["bytes"]  # the file: 8 + header + payload
        assert report.mask_stored_bits == 8 * config["mask"]["bytes"] and payload > config["mask"]["bytes"]
        assert report.mask_coding == coding
    report = size_report_from_config(read_config(dirs["entropy"]))
    assert report.mask_stored_bits == report.mask_entropy_coded_bits < report.mask_raw_bits
    assert report.mask_entropy_bits < report.mask_entropy_coded_bits
    assert report.mask_raw_bits == 8 * math.ceil(report.free / 8) and report.mask_bits == report.free  # unchanged
    for layer in report.layers:
        kept = layer.kept - layer.locked
        h = entropy.entropy_bits([layer.free - kept, kept])
        assert layer.entropy_bits == h and layer.coded_bits <= 8 * (1 + math.ceil(layer.free / 8))
    text = str(report)
    assert "supermask as stored       entropy: " in text and "empirical entropy" in text
    totals = report.to_dict()["totals"]
    assert totals["mask_stored_bits_per_free_weight"] == pytest.approx(report.mask_stored_bits / report.free)


def test_a_resealed_coded_mask_that_decodes_to_other_bits_is_refused(skewed, tmp_path):
    """A valid stream of other bits (rewritten and resealed) never loads as a wrong mask."""
    from timm_fslt.ticket import seal_config
    _, dirs, _, _ = skewed
    directory = shutil.copytree(dirs["entropy"], tmp_path / "t")
    document = json.loads((directory / "config.json").read_text())
    own = document["timm_fslt"]
    sizes = [row["free"] for row in own["layers"]]
    payload = safetensors.torch.load_file(directory / "supermask.safetensors")["supermask"].numpy().tobytes()
    streams = [s.copy() for s in entropy.decode_streams(payload, sizes, 2)[0]]
    i = max(range(len(sizes)), key=sizes.__getitem__)
    ones, zeros = np.flatnonzero(streams[i]), np.flatnonzero(streams[i] == 0)
    streams[i][ones[0]], streams[i][zeros[0]] = 0, 1  # same counts, other bits
    data, records = entropy.encode_streams(streams, 2)
    blob = safetensors.torch.save({"supermask": torch.frombuffer(bytearray(data), dtype=torch.uint8)},
                   metadata={"format": "timm_fslt.supermask.entropy"})
    (directory / "supermask.safetensors").write_bytes(blob)
    own["mask"].update(bytes=len(data), entropy_bytes=len(data), entropy_layers=[[r.method, r.bytes] for r in records])
    own["files"]["supermask.safetensors"] = {"bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
    (directory / "config.json").write_text(json.dumps(seal_config(document)))
    with pytest.raises(TicketError, match="masked_digest|digest"):
        timm_fslt.load_ticket(directory)


def test_push_to_hub_passes_mask_coding_and_a_saved_ticket_goes_up_as_saved(skewed, monkeypatch):
    import huggingface_hub
    model, dirs, _, _ = skewed
    uploads = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: None)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, *, folder_path, **kw: uploads.append(
        {p.name: p.read_bytes() for p in folder_path.iterdir()}))
    for coding in ("raw", "entropy"):
        timm_fslt.push_to_hub(model, "me/coded", mask_coding=coding)
        assert uploads[-1]["supermask.safetensors"] == (dirs[coding] / "supermask.safetensors").read_bytes()
        card = uploads[-1]["README.md"].decode()
        assert f"| supermask as stored ({coding}; empirical entropy" in card
    timm_fslt.push_to_hub(dirs["raw"], "me/coded")  # a saved ticket: as saved
    assert uploads[-1]["supermask.safetensors"] == (dirs["raw"] / "supermask.safetensors").read_bytes()
    with pytest.raises(TicketError, match="mask_coding='entropy' applies when a frozen model is pushed"):
        timm_fslt.push_to_hub(dirs["raw"], "me/coded", mask_coding="entropy")


@pytest.mark.parametrize("alphabet", [3, 4, 16, 256, 2**16])
def test_the_reference_decoder_reads_records_and_raw_fields_of_every_alphabet(alphabet):
    """Format 6 (a search method's ticket) stores symbols of the method's alphabet: the reference
    decoder's own reader gives the package's streams, raw fields and records alike."""
    rng = np.random.default_rng(alphabet)
    streams = [_stream(rng, n, min(a, alphabet), p) for n, a, p in _CASES if a <= 16] + \
        [rng.integers(0, alphabet, 500).astype(np.uint32), np.full(40, alphabet - 1, np.uint32)]
    data, records = entropy.encode_streams(streams, alphabet)
    at = 0
    for s, record in zip(streams, records):
        symbols, end = ref.entropy_layer(data, at, s.size, "test", alphabet)
        assert np.array_equal(symbols, s) and end - at == record.bytes
        at = end
    flat = np.concatenate(streams)
    assert np.array_equal(ref.unpack_symbols(entropy.pack(flat, alphabet), flat.size, alphabet, "test"), flat)
    too_big = bytes([entropy.CONSTANT]) + (alphabet - 1).to_bytes(2, "little")
    with pytest.raises(ref.DecodeError, match="constant record"):
        ref.entropy_layer(too_big, 0, 5, "test", alphabet - 1)
