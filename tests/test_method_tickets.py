"""Tickets of every search method (issue #18): a symbol per free weight (format 6), regenerated bit for bit.

For Edge-Popup, multicoated (3 coats), IteRand (a short period, so kept weights are re-drawn) and
Edge-Popup with a sparsity schedule (finished, and saved mid-schedule), on timm_fslt's small conv
net and timm's ``test_resnet``: a few search steps, saved raw and entropy-coded, loaded, outputs
identical; the coded symbols equal the raw ones; the reference decoder gives the same weights;
size_report's numbers are the files' bytes.  Edge-Popup tickets keep their bytes (golden digests,
computed with the code before format 6)."""
import hashlib
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

import timm_fslt
from timm_fslt import entropy
from timm_fslt.apps import cli
from timm_fslt.nn import modules as L
from timm_fslt.ticket.format import read_config, read_ticket, size_report_from_config

from test_reference_decoder import run_decoder

torch.set_num_threads(1)
MODELS = {"mnist_cnn": ({"width": 0.125, "img_size": 8}, (1, 8, 8)),
          "test_resnet": ({"num_classes": 10}, (3, 32, 32))}
METHODS = {
    "edge_popup": {},
    "multicoated": dict(method="multicoated", coat_sparsities=(0.45, 0.55, 0.65)),
    "iterand": dict(method="iterand", rerand_period=2, rerand_rate=0.5),
    "schedule": dict(sparsity_schedule=("linear", 0.35, 0.5), schedule_steps=6),
    "schedule_mid": dict(method="multicoated", coat_sparsities=(0.5, 0.6, 0.65),
                         sparsity_schedule=("cosine", 0.35, 1.0), schedule_steps=40),
}
STEPS = 7


def _searched(arch, method, scale):
    kwargs, shape = MODELS[arch]
    model = timm_fslt.create_model(arch, **kwargs)
    timm_fslt.freeze(model, prune=0.3, lock=0.3, scale=scale, seed=4, **METHODS[method])
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, *shape, generator=g), torch.randint(0, 10, (8,), generator=g)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    for _ in range(STEPS):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        out = model(x)
    return model, x, out


@pytest.fixture(scope="module")
def tickets(tmp_path_factory):
    made = {}
    root = tmp_path_factory.mktemp("method_tickets")
    for arch in MODELS:
        for method in METHODS:
            scale = "dynamic" if method == "multicoated" else "static" if method != "edge_popup" else None
            model, x, out = _searched(arch, method, scale)
            dirs = {c: timm_fslt.save_ticket(model, root / f"{arch}_{method}_{c}", mask_coding=c)
                    for c in ("raw", "entropy")}
            made[arch, method] = SimpleNamespace(model=model, x=x, out=out, dirs=dirs)
    return made


CASES = [(a, m) for a in MODELS for m in METHODS]


@pytest.mark.parametrize("arch, method", CASES)
def test_a_ticket_loads_with_bit_identical_outputs_both_codings(tickets, arch, method):
    t = tickets[arch, method]
    group = timm_fslt.get_group(t.model)
    for coding, directory in t.dirs.items():
        config = read_config(directory)
        assert config["format_version"] == (6 if method != "edge_popup" else 4 if coding == "raw" else 5)
        loaded = timm_fslt.load_ticket(directory)
        with torch.no_grad():
            assert torch.equal(loaded(t.x), t.out), (coding, method)
        again = timm_fslt.get_group(loaded)
        assert again.sparsity == group.sparsity and again.search_step == (
            group.search_step if method != "edge_popup" else 0)
        for a, b in zip(group.layers, again.layers):
            assert torch.equal(a.mask, b.mask) and torch.equal(a.scale, b.scale)
            if method in ("multicoated", "schedule_mid"):
                assert torch.equal(a.level, b.level)
            if method == "iterand":
                kept = b.mask.reshape(-1)[b.frozen.reshape(-1) == 0]
                assert torch.equal(b.rerand_round[kept], a.rerand_round[kept])
                assert not b.rerand_round[~kept].any()
        # the loaded model saves the same bytes (nothing lost: levels, rounds, the step count)
        resaved = timm_fslt.save_ticket(loaded, directory.parent / f"{directory.name}_again", mask_coding=coding)
        for name in ("supermask.safetensors", "config.json"):
            assert (resaved / name).read_bytes() == (directory / name).read_bytes(), name


def test_the_methods_store_what_they_claim(tickets):
    for arch in MODELS:
        mc = read_config(tickets[arch, "multicoated"].dirs["raw"])["mask"]
        assert mc["alphabet"] == 4 and mc["method"] == "multicoated" and mc["bits"] == 2 * mc["symbols"]
        it = read_config(tickets[arch, "iterand"].dirs["raw"])
        # rounds 1..3 ran (period 2, 7 steps) and some kept weights were re-drawn
        assert it["mask"]["search_step"] == STEPS and 3 <= it["mask"]["alphabet"] <= 5
        assert sum(c for row in it["layers"] for s, c in row["symbol_counts"] if s >= 2) > 0
        sched = read_config(tickets[arch, "schedule"].dirs["raw"])["mask"]
        assert sched["alphabet"] == 2 and sched["bits"] == sched["symbols"] and sched["search_step"] == STEPS
        # saved mid-schedule: the loaded group has the scheduled (not the final) sparsity, as saved
        mid = tickets[arch, "schedule_mid"]
        assert timm_fslt.get_group(mid.model).sparsity < 0.5


@pytest.mark.parametrize("arch, method", CASES)
def test_coded_symbols_equal_the_raw_ones_and_cost_at_most_raw_plus_headers(tickets, arch, method):
    t = tickets[arch, method]
    (raw_config, raw, _), (coded_config, coded, _) = (read_ticket(t.dirs[c]) for c in ("raw", "entropy"))
    if method == "edge_popup":  # (raw packed bits)
        assert torch.equal(raw, coded)
        return
    assert torch.equal(raw, coded) and raw.dtype == torch.int32
    mask = coded_config["mask"]
    alphabet, layers = mask["alphabet"], coded_config["layers"]
    assert mask["bytes"] <= raw_config["mask"]["bytes"] + 2 * len(layers)
    for row, (_, size) in zip(layers, mask["entropy_layers"]):
        h = entropy.entropy_bits([c for _, c in row["symbol_counts"]])
        header = 8 * (1 + 2 + 6 * len(row["symbol_counts"]) + 4 + 8)
        assert 8 * size <= min(8 * (1 + entropy.raw_bytes(row["free"], alphabet)), 1.01 * h + header)


@pytest.mark.parametrize("arch, method", CASES)
def test_size_report_counts_the_files_bytes(tickets, arch, method, capsys):
    t = tickets[arch, method]
    for coding, directory in t.dirs.items():
        config = read_config(directory)
        payload = safetensors.torch.load_file(directory / "supermask.safetensors")["supermask"]
        report = timm_fslt.size_report(t.model, mask_coding=coding)
        assert report.mask_stored_bits == 8 * payload.numel() == 8 * config["mask"]["bytes"]
        assert report.mask_raw_bits == 8 * entropy.raw_bytes(report.free, report.mask_alphabet)
        assert str(report) == str(size_report_from_config(config))
        assert report.to_dict() == size_report_from_config(config).to_dict()
        if method != "edge_popup":
            counts = [c for row in config["layers"] for c in row["symbol_counts"]]
            assert report.mask_bits == report.free * math.ceil(math.log2(config["mask"]["alphabet"]))
            assert report.mask_entropy_bits <= report.mask_bits and len(counts) >= len(config["layers"])
            assert f"method {config['mask']['method']}" in str(report)
    assert cli.main(["info", str(t.dirs["entropy"])]) == 0
    assert str(timm_fslt.size_report(t.model, mask_coding="entropy")) in capsys.readouterr().out


def test_the_reference_decoder_matches_every_ticket(tickets, tmp_path):
    pairs = [(t.dirs[c], tmp_path / f"{a}_{m}_{c}.npz") for (a, m), t in tickets.items() for c in t.dirs]
    codes, err = run_decoder(pairs)
    assert codes == [0] * len(pairs), err
    for (directory, out), (key, t) in zip(pairs, [(k, t) for k, t in tickets.items() for _ in t.dirs]):
        arrays = np.load(out)
        plain = timm_fslt.materialize(timm_fslt.load_ticket(directory)).state_dict()
        for layer in timm_fslt.get_group(t.model).layers:
            want = plain[layer.layer_name + ".weight"].numpy()
            got = arrays[layer.layer_name + ".weight"]
            assert got.dtype == want.dtype and np.array_equal(got, want), (key, layer.layer_name)
            assert np.array_equal(arrays[layer.layer_name + ".mask"], layer.mask.numpy())
            if key[1] in ("multicoated", "schedule_mid"):
                assert np.array_equal(arrays[layer.layer_name + ".level"], layer.level.numpy())


def test_an_iterand_ticket_stores_rounds_only_where_the_mask_keeps_and_the_weights_were_redrawn(tickets):
    t = tickets["mnist_cnn", "iterand"]
    redrawn_kept = redrawn_left_out = 0
    for layer in timm_fslt.get_group(t.model).layers:
        kept = layer.mask.reshape(-1)[layer.frozen.reshape(-1) == 0]
        redrawn_kept += int((layer.rerand_round[kept] > 0).sum())
        redrawn_left_out += int((layer.rerand_round[~kept] > 0).sum())
    assert redrawn_kept > 0 and redrawn_left_out > 0  # the ticket keeps the first, drops the second
    loaded = timm_fslt.load_ticket(t.dirs["raw"])
    changed = 0
    with torch.no_grad():
        for _, module, pname, layer in L.iter_sites(loaded):
            effective, seed = getattr(module, pname).reshape(-1), module.parametrizations[pname].original.reshape(-1)
            free = (layer.frozen.reshape(-1) == 0).nonzero().squeeze(1)
            kept = layer.mask.reshape(-1)[free]
            rounds = layer.rerand_round
            same = free[kept & (rounds == 0)]
            assert torch.equal(effective[same], seed[same] * layer.scale)
            drawn = free[kept & (rounds > 0)]
            changed += int((effective[drawn] != seed[drawn] * layer.scale).sum())
            assert not effective[free[~kept]].any()
    assert changed > 0  # the re-drawn kept weights hold their round's values, not the seed's


# -- Edge-Popup tickets are byte for byte as before format 6 -------------------------------------

# sha256[:16] of an unsearched mnist_cnn ticket's files (prune 0.3, lock 0.3, seed 4), and of its
# config.json without timm_fslt_version and the seal, written by the code before format 6
GOLDEN = {"raw": ("2a41c76797b70702", "02248f2a623ec175", "8e6d11a961eed009"),
          "entropy": ("a16f24edc4b6d07d", "02248f2a623ec175", "5c21ba6eca2b7c3c")}


@pytest.mark.parametrize("coding", ["raw", "entropy"])
def test_an_edge_popup_tickets_bytes_are_unchanged(tmp_path, coding):
    model = timm_fslt.create_model("mnist_cnn", width=0.125, img_size=8)
    timm_fslt.freeze(model, prune=0.3, lock=0.3, seed=4)
    directory = timm_fslt.save_ticket(model, tmp_path / "t", mask_coding=coding)
    sha = [hashlib.sha256((directory / n).read_bytes()).hexdigest()[:16]
           for n in ("supermask.safetensors", "state.safetensors")]
    document = json.loads((directory / "config.json").read_text())
    own = {k: v for k, v in document["timm_fslt"].items() if k not in ("timm_fslt_version", "integrity")}
    body = json.dumps({**document, "timm_fslt": own}, sort_keys=True, separators=(",", ":")).encode()
    assert (*sha, hashlib.sha256(body).hexdigest()[:16]) == GOLDEN[coding]
    assert "alphabet" not in own["mask"] and not any("symbol_counts" in row for row in own["layers"])


# -- the Hub -----------------------------------------------------------------------------------------

def test_a_method_ticket_goes_through_the_hub_and_loads_from_its_snapshot(tickets, tmp_path):
    from hub_server import HubServer, hub_env, run_python
    from test_hub import _DOWNLOAD, _LOAD_OFFLINE

    t = tickets["mnist_cnn", "multicoated"]
    with HubServer(token="hf_test_token", lifetime=120) as hub:
        home = tmp_path / "hf"
        token = tmp_path / "token"
        token.write_text("hf_test_token\n")
        run_python(["-m", "timm_fslt", "push", str(t.dirs["entropy"]), "tester/mc", "--token-file", str(token)],
                   hub_env(hub, home))
        files = hub.files("tester/mc")
        for name in ("config.json", "supermask.safetensors", "state.safetensors"):
            assert files[name] == (t.dirs["entropy"] / name).read_bytes(), name
        card = files["README.md"].decode()
        assert "found by the search method `multicoated`" in card and "| method | multicoated |" in card
        assert "| coat_sparsities | [0.45, 0.55, 0.65] |" in card and "2 bits per free weight, 4 symbols" in card
        run_python(["-c", _DOWNLOAD, "tester/mc"], hub_env(hub, home))
        inputs, outputs = tmp_path / "x.safetensors", tmp_path / "out.safetensors"
        safetensors.torch.save_file({"x": t.x}, inputs)
        run = run_python(["-c", _LOAD_OFFLINE, "tester/mc", str(inputs), str(outputs)], hub_env(hub, home, offline=True))
    assert torch.equal(safetensors.torch.load_file(outputs)["out"], t.out)
    assert "method multicoated" in run.stdout
    snapshot = tmp_path / "snapshot"  # a Hub-format directory (the model card beside the files) loads too
    snapshot.mkdir()
    for name, data in files.items():
        (snapshot / name).write_bytes(data)
    with torch.no_grad():
        assert torch.equal(timm_fslt.load_ticket(snapshot)(t.x), t.out)


def test_push_to_hub_of_a_method_model_and_of_its_ticket_with_timm_weights(tickets, monkeypatch):
    import huggingface_hub
    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kwargs: None)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, *, repo_id, folder_path, **kwargs:
                        calls.append({p.name: p.read_bytes() for p in folder_path.iterdir()}) or "ok")
    t = tickets["mnist_cnn", "iterand"]
    timm_fslt.push_to_hub(t.model, "me/it", token="t", mask_coding="raw")
    timm_fslt.push_to_hub(t.dirs["entropy"], "me/it", token="t", timm_weights=True)
    model_push, dir_push = calls
    assert model_push["supermask.safetensors"] == (t.dirs["raw"] / "supermask.safetensors").read_bytes()
    assert dir_push["supermask.safetensors"] == (t.dirs["entropy"] / "supermask.safetensors").read_bytes()
    assert "model.safetensors" in dir_push and "`iterand`" in dir_push["README.md"].decode()
