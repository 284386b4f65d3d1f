"""A search killed with SIGKILL mid-epoch resumes and ends exactly where an uninterrupted run ends."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fixtures_data import recipes_dir, write_saved_image_dataset

ARGS = ["--model-kwargs", "width=0.0625", "--epochs", "3", "--limit-train-batches", "4",
        "--batch-size", "8", "--num-workers", "0", "--no-progress", "--lr", "0.5", "--log-every", "1"]


def _env():
    env = dict(os.environ, OUTDATED_IGNORE="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), env.get("PYTHONPATH")]))
    return env


def _cmd(data, out, *extra, step_delay=None):
    recipe = os.path.join(recipes_dir(), "cifar10.py")
    args = ["--data", str(data), "--output-dir", str(out), *ARGS, *extra]
    if step_delay is None:
        return [sys.executable, recipe, *args]
    # The same recipe, slowed by a pause after every optimizer step (only timing changes), so
    # the kill reliably lands inside epoch 2 however fast this tiny network trains.
    runner = ("import runpy, sys, time\n"
              "from torch.optim.optimizer import register_optimizer_step_post_hook\n"
              f"register_optimizer_step_post_hook(lambda *a: time.sleep({step_delay}))\n"
              "sys.argv = sys.argv[1:]\n"
              "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    return [sys.executable, "-c", runner, recipe, *args]


def _metric_records(path):
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if k != "time"} for r in records if r["event"] == "metrics"]


def _steps_logged(path):
    try:
        return [r["step"] for r in _metric_records(path) if "train/step_loss" in r]
    except (OSError, ValueError, KeyError):
        return []


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_the_uninterrupted_run(tmp_path):
    data = write_saved_image_dataset(tmp_path / "data")
    full = subprocess.run(_cmd(data, tmp_path / "full"), env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert full.returncode == 0, full.stderr[-3000:]

    cut = tmp_path / "cut"
    proc = subprocess.Popen(_cmd(data, cut, step_delay=0.4), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 300
    # Epoch 1 is steps 1-4 (then a checkpoint); kill once epoch 2 has logged a step.
    while not any(s >= 6 for s in _steps_logged(cut / "metrics.jsonl")):
        assert proc.poll() is None, f"run ended before it could be killed: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "run made no progress"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (cut / "results.json").exists()
    checkpoints = sorted(p.name for p in (cut / "checkpoints").iterdir() if p.name.startswith("epoch_"))
    assert checkpoints and checkpoints[-1] in ("epoch_0001", "epoch_0002")

    resumed = subprocess.run(_cmd(data, cut, "--resume"), env=_env(), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = json.loads((tmp_path / "full" / "results.json").read_text())
    b = json.loads((cut / "results.json").read_text())
    for key in ("history", "accuracy", "val", "test", "best_epoch", "mask_digests", "sparsity"):
        assert a[key] == b[key], key
    # the metric log holds each step once, with the uninterrupted run's values
    assert _metric_records(tmp_path / "full" / "metrics.jsonl") == _metric_records(cut / "metrics.jsonl")
    # and the saved tickets are byte-identical
    for name in ("config.json", "supermask.safetensors", "state.safetensors"):
        assert (tmp_path / "full" / "ticket" / name).read_bytes() == (cut / "ticket" / name).read_bytes(), name
