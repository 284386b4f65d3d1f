"""Sharing tickets on the Hub: huggingface_hub's real upload and download paths against a local
Hub-compatible server (tests/hub_server.py), and loading a repo id from the offline Hub cache.

HF_ENDPOINT and HF_HUB_OFFLINE are read when huggingface_hub is imported, so every Hub client
runs in a subprocess with its own environment and a temporary HF_HOME.
"""
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import safetensors.torch
import torch
from huggingface_hub import ModelCard

import timm_fslt
from timm_fslt.ticket import hub as hub_mod
from timm_fslt.errors import TicketChecksumError, TicketError

from hub_server import HubServer, hub_env as _env, run_python as _run

REPO = Path(__file__).resolve().parents[1]
TOKEN = "hf_test_token"
TICKET_FILES = ["config.json", "state.safetensors", "supermask.safetensors"]


@pytest.fixture(scope="module")
def hub():
    with HubServer(token=TOKEN, lifetime=300) as server:
        yield server


def _routes(log):
    return [(method, path.split("?")[0]) for method, path in log]


@pytest.fixture(scope="module")
def pushed(hub, resnet_ticket, tmp_path_factory):
    """The ResNet ticket pushed with ``python -m timm_fslt push`` (the ``fslt push`` command)."""
    start = len(hub.log)
    home = tmp_path_factory.mktemp("hf-push")
    token_file = home / "token"
    token_file.write_text(TOKEN + "\n")
    run = _run(["-m", "timm_fslt", "push", str(resnet_ticket.dir), "tester/resnet-ticket", "--token-file",
                str(token_file), "--metric", "accuracy=0.625", "--dataset", "uoft-cs/cifar10",
                "--message", "first ticket"], _env(hub, home))
    return SimpleNamespace(repo_id="tester/resnet-ticket", stdout=run.stdout, log=hub.log[start:])


def test_fslt_push_uploads_the_ticket_files_unchanged_and_a_model_card(hub, pushed, resnet_ticket):
    assert "pushed" in pushed.stdout and "tester/resnet-ticket/commit/" in pushed.stdout
    # The regular (base64 NDJSON) upload path of huggingface_hub, step by step.
    assert _routes(pushed.log) == [
        ("POST", "/api/repos/create"), ("POST", "/api/validate-yaml"),
        ("POST", "/api/models/tester/resnet-ticket/preupload/main"),
        ("POST", "/api/models/tester/resnet-ticket/commit/main")]
    assert hub.repos[pushed.repo_id].head.summary == "first ticket"
    assert not hub.repos[pushed.repo_id].private

    files = hub.files(pushed.repo_id)
    assert sorted(files) == ["README.md"] + TICKET_FILES
    for name in TICKET_FILES:
        assert files[name] == (resnet_ticket.dir / name).read_bytes(), name

    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "timm_fslt" and card.data.license == "apache-2.0"
    assert {"strong-lottery-ticket", "pruning", "timm"} <= set(card.data.tags)
    assert card.data.datasets == ["uoft-cs/cifar10"] and card.data.metrics == ["accuracy"]
    (result,) = card.data.eval_results
    assert (result.metric_type, result.metric_value, result.dataset_type) == ("accuracy", 0.625, "uoft-cs/cifar10")
    report = timm_fslt.size_report(resnet_ticket.model)
    for line in ('model = timm_fslt.load_ticket("tester/resnet-ticket")', "| accuracy | 0.625 | uoft-cs/cifar10 |",
                 "| prune ratio | 0.35 |", "| lock ratio | 0.35 |", "| seed | 11 |",
                 f"| freezing ratio (measured) | {report.freezing_ratio:.4f} |",
                 f"| supermask (1 bit per free weight) | {report.mask_bits:,} |",
                 f"| **ticket** | **{report.ticket_bits:,}** ({(report.ticket_bits + 7) // 8:,} bytes) |"):
        assert line in card.text, line


_DOWNLOAD = """
import sys
from huggingface_hub import snapshot_download
print(snapshot_download(sys.argv[1]))
"""

_LOAD_OFFLINE = """
import sys, torch, safetensors.torch as st, timm_fslt
from timm_fslt.apps import cli
repo_id, inputs, outputs = sys.argv[1:]
model = timm_fslt.load_ticket(repo_id)
with torch.no_grad():
    st.save_file({"out": model(st.load_file(inputs)["x"])}, outputs)
assert cli.main(["info", repo_id]) == 0
"""


def test_a_pushed_ticket_loads_by_repo_id_from_the_offline_hub_cache(hub, pushed, resnet_ticket, tmp_path):
    hf_home = tmp_path / "hf"
    # huggingface_hub's own download fills HF_HOME with the real cache layout.
    _run(["-c", _DOWNLOAD, pushed.repo_id], _env(hub, hf_home))
    cached = hf_home / "hub" / "models--tester--resnet-ticket"
    commit = (cached / "refs" / "main").read_text()
    assert commit == hub.repos[pushed.repo_id].head.oid
    assert sorted(os.listdir(cached / "snapshots" / commit)) == ["README.md"] + TICKET_FILES

    inputs = tmp_path / "inputs.safetensors"
    safetensors.torch.save_file({"x": resnet_ticket.x}, inputs)
    requests_before = len(hub.log)
    run = _run(["-c", _LOAD_OFFLINE, pushed.repo_id, str(inputs), str(tmp_path / "out.safetensors")],
               _env(hub, hf_home, offline=True))
    assert len(hub.log) == requests_before  # served from the cache alone
    assert torch.equal(safetensors.torch.load_file(tmp_path / "out.safetensors")["out"], resnet_ticket.out)
    assert str(timm_fslt.size_report(resnet_ticket.model)) in run.stdout


def test_push_to_hub_of_a_model_uploads_its_ticket_and_card(resnet_ticket, monkeypatch):
    # The HTTP side is the one tested above; here: what a pushed model object becomes.
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs)

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        calls["files"] = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
        calls["upload"] = (repo_id, kwargs)
        return "commit-info"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    result = timm_fslt.push_to_hub(resnet_ticket.model, "me/r18", private=True, token="t",
                                   metrics={"accuracy": 0.625}, datasets=["uoft-cs/cifar10"])
    assert result == "commit-info"
    assert calls["create_repo"] == ("me/r18", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert calls["upload"] == ("me/r18", {"repo_type": "model", "commit_message": "Upload timm_fslt ticket"})
    assert sorted(calls["files"]) == ["README.md"] + TICKET_FILES
    for name in ("supermask.safetensors", "state.safetensors"):
        assert calls["files"][name] == (resnet_ticket.dir / name).read_bytes()
    config = json.loads(calls["files"]["config.json"])["timm_fslt"]
    assert config["datasets"] == ["uoft-cs/cifar10"] and config["metrics"] == {"accuracy": 0.625}
    assert 'timm_fslt.load_ticket("me/r18")' in calls["files"]["README.md"].decode()


# -- in-process checks (no network) ------------------------------------------------------------

def test_push_to_hub_rejects_a_repo_id_without_namespace(resnet_ticket):
    with pytest.raises(TicketError, match=r"repo_id must be a Hub repo id 'user/name', got 'resnet'"):
        timm_fslt.push_to_hub(resnet_ticket.dir, "resnet")


def test_push_to_hub_verifies_the_ticket_before_uploading(resnet_ticket, tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("nothing may be uploaded from a corrupted ticket")
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", no_network)
    directory = Path(shutil.copytree(resnet_ticket.dir, tmp_path / "t"))
    path = directory / "supermask.safetensors"
    path.write_bytes(path.read_bytes()[:-1] + bytes([path.read_bytes()[-1] ^ 1]))
    with pytest.raises(TicketChecksumError, match=r"supermask.safetensors' is corrupted"):
        timm_fslt.push_to_hub(directory, "tester/broken")


def test_an_uncached_repo_id_offline_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(TicketError, match=r"no local directory 'tester/missing', and the Hub repo 'tester/missing' "
                                          r"could not be fetched \(nor found in the local Hub cache\)"):
        timm_fslt.load_ticket("tester/missing", cache_dir=tmp_path)


def test_a_path_that_is_neither_a_ticket_nor_a_repo_id_is_reported(tmp_path):
    with pytest.raises(TicketError, match=r"no ticket directory at '.*/a/b/c', and it is not a Hub repo id"):
        timm_fslt.load_ticket(tmp_path / "a" / "b" / "c")


def test_model_card_without_datasets_lists_metrics_but_no_model_index(resnet_ticket):
    config = timm_fslt.ticket.read_config(resnet_ticket.dir)
    card = hub_mod.model_card(config, "me/t")
    assert card.data.metrics == ["accuracy"] and card.data.eval_results is None
    assert "| accuracy | 0.625 |" in card.text
    assert json.loads(json.dumps(card.data.to_dict()))["library_name"] == "timm_fslt"


def test_hub_server_stops_itself_after_its_lifetime():
    # A lifetime long enough that a loaded CI machine still reaches it alive first.
    server = HubServer(lifetime=4.0).start()
    url = server.url + "/api/whoami-v2"
    with pytest.raises(urllib.error.HTTPError):  # alive: answers 401 without a token
        urllib.request.urlopen(url, timeout=5)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not server._stopped:
        time.sleep(0.05)
    assert server._stopped
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=2)


# -- pushing twice, hostile and damaged tickets through the Hub ------------------------------------

def test_a_second_push_to_the_same_repo_adds_a_commit(hub, pushed, resnet_ticket, tmp_path):
    head = hub.repos[pushed.repo_id].head.oid
    env = dict(_env(hub, tmp_path / "hf"), HF_TOKEN=TOKEN)  # the token from the environment
    run = _run(["-m", "timm_fslt", "push", str(resnet_ticket.dir), pushed.repo_id, "--message", "again"], env)
    assert "pushed" in run.stdout
    repo = hub.repos[pushed.repo_id]
    assert repo.head.oid != head and repo.head.summary == "again" and len(repo.commits) >= 3
    assert hub.files(pushed.repo_id)["config.json"] == (resnet_ticket.dir / "config.json").read_bytes()


def test_a_token_on_the_command_line_works_but_warns(hub, resnet_ticket, tmp_path):
    run = _run(["-m", "timm_fslt", "push", str(resnet_ticket.dir), "tester/token-flag", "--token", TOKEN],
               _env(hub, tmp_path / "hf"))
    assert "visible to other users in the process list" in run.stderr and "pushed" in run.stdout
    bad = subprocess.run([sys.executable, "-m", "timm_fslt", "push", str(resnet_ticket.dir), "tester/x",
                          "--token-file", str(tmp_path / "missing")], cwd=REPO, env=_env(hub, tmp_path / "hf"),
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "--token-file: cannot read" in bad.stderr


_LOAD = """
import json, sys, timm_fslt
try:
    timm_fslt.load_ticket(sys.argv[1])
    print(json.dumps({"loaded": True}))
except timm_fslt.TicketError as err:
    print(json.dumps({"loaded": False, "error": str(err)}))
"""


def _load_in_subprocess(repo_id, env):
    return json.loads(_run(["-c", _LOAD, repo_id], env).stdout.strip().splitlines()[-1])


def test_a_hostile_ticket_pushed_to_the_hub_runs_nothing_when_loaded_by_repo_id(hub, resnet_ticket, tmp_path):
    sentinel = tmp_path / "SENTINEL"
    hostile = Path(shutil.copytree(resnet_ticket.dir, tmp_path / "hostile"))
    config = json.loads((hostile / "config.json").read_text())
    # format 4: our record and timm's keys rewritten alike (a contradiction alone is refused)
    config["timm_fslt"]["architecture"] = {"builder": "os:system", "kwargs": {"command": f"touch {sentinel}"}}
    config["architecture"] = "timm_fslt-builder/os:system"
    config["model_args"] = {"command": f"touch {sentinel}"}
    (hostile / "config.json").write_text(json.dumps(timm_fslt.ticket.seal_config(config)))  # resealed
    env = dict(_env(hub, tmp_path / "hf"), HF_TOKEN=TOKEN)
    _run(["-m", "timm_fslt", "push", str(hostile), "tester/hostile"], env)
    result = _load_in_subprocess("tester/hostile", env)
    assert not result["loaded"] and "import path 'os:system'" in result["error"]
    assert "trust_builder=True" in result["error"]
    assert not sentinel.exists()


def test_a_damaged_hub_cache_is_downloaded_again_online_and_explained_offline(hub, pushed, tmp_path):
    env = _env(hub, tmp_path / "hf")
    assert _load_in_subprocess(pushed.repo_id, env) == {"loaded": True}
    blobs = tmp_path / "hf" / "hub" / "models--tester--resnet-ticket" / "blobs"
    damaged = []
    for blob in blobs.iterdir():  # cut every cached tensor file short, as a killed download would
        if not blob.read_bytes().startswith((b"{", b"---")):  # not config.json or the model card
            blob.write_bytes(blob.read_bytes()[:-7])
            damaged.append(blob)
    assert damaged
    offline = _load_in_subprocess(pushed.repo_id, _env(hub, tmp_path / "hf", offline=True))
    assert not offline["loaded"] and "is damaged and HF_HUB_OFFLINE is set" in offline["error"]
    assert _load_in_subprocess(pushed.repo_id, env) == {"loaded": True}  # fetched again
