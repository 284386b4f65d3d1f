"""Every script in examples/ runs (with --quick), so none of them rots."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hub_server import HubServer

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = sorted(EXAMPLES.glob("*.py"))
# Scripts whose dedicated test below runs them in full; the generic test skips them to save time.
DEDICATED = {"ticket_roundtrip.py"}
GENERIC = [p for p in SCRIPTS if p.name not in DEDICATED]


def _env(**extra):
    # One thread: these tiny runs are faster so, and do not fight the test runner for the cores.
    env = dict(os.environ, OUTDATED_IGNORE="1", HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", MPLBACKEND="Agg", OMP_NUM_THREADS="1")
    for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "FSLT_PUSH_REPO"):
        env.pop(key, None)
    env.update(extra)
    return env


def _run(script: Path, cwd: Path, *args, env=None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(script), "--quick", *args], cwd=cwd, env=env or _env(),
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"{script.name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_examples_folder_has_the_documented_scripts():
    names = {p.name for p in SCRIPTS}
    assert {"freeze_timm_search.py", "gin_karate.py", "ticket_roundtrip.py"} <= names
    assert DEDICATED <= names  # a renamed script must not silently drop out of the tests


@pytest.mark.parametrize("script", GENERIC, ids=[p.stem for p in GENERIC])
def test_example_runs_quick(script, tmp_path):
    proc = _run(script, tmp_path)
    assert proc.stdout.strip(), f"{script.name} printed nothing"


def test_ticket_roundtrip_pushes_to_a_hub_and_reloads_identically(tmp_path):
    script = EXAMPLES / "ticket_roundtrip.py"
    with HubServer(token="hf_example", lifetime=300) as hub:
        env = _env(HF_ENDPOINT=hub.url, HF_TOKEN="hf_example", HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path / "hf"))
        proc = _run(script, tmp_path, "--push-to", "tester/digits-ticket", env=env)
        files = hub.files("tester/digits-ticket")
    assert {"config.json", "supermask.safetensors", "state.safetensors", "README.md"} <= set(files)
    assert proc.stdout.count("outputs identical = True") == 2  # local reload and reload from the Hub
    local = tmp_path / "runs" / "ticket_roundtrip" / "ticket"
    assert files["supermask.safetensors"] == (local / "supermask.safetensors").read_bytes()
