"""Two processes (torchrun through `accelerate launch`, CPU): a run killed after a mid-epoch
checkpoint resumes and ends bit-identical to an uninterrupted one, BatchNorm included (each
process's own statistics travel in the checkpoint until the epoch's end averages them)."""
import json
import os
import subprocess
import sys

import pytest

from fixtures_data import recipes_dir, repo_root, write_saved_image_dataset

RUNNER = """import os, runpy, sys
from torch.optim.optimizer import register_optimizer_step_post_hook
recipe, kill_at, steps = sys.argv[1], int(os.environ.get("FSLT_KILL_AT_STEP", "0")), [0]
def _hook(optimizer, args, kwargs):
    steps[0] += 1
    if kill_at and steps[0] == kill_at:
        os._exit(3)  # like a SIGKILL: nothing after this step is saved
register_optimizer_step_post_hook(_hook)
sys.argv = sys.argv[1:]
runpy.run_path(recipe, run_name="__main__")
"""


@pytest.mark.slow
def test_a_two_process_run_killed_mid_epoch_resumes_bit_identical(tmp_path):
    data = write_saved_image_dataset(tmp_path / "cifar")
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)

    def launch(out, port, *extra, kill_at=0):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(port), str(runner), os.path.join(recipes_dir(), "cifar10.py"), "--cpu",
               "--data", str(data), "--model", "resnet18_cifar", "--model-kwargs", "width=0.125",
               "--epochs", "2", "--limit-train-batches", "4", "--batch-size", "8", "--num-workers", "0",
               "--no-progress", "--lr", "0.5", "--checkpoint-every-steps", "3", "--keep-checkpoints", "10",
               "--output-dir", str(out), *extra]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OUTDATED_IGNORE": "1", "HF_HUB_OFFLINE": "1",
               "FSLT_KILL_AT_STEP": str(kill_at)}
        return subprocess.run(cmd, cwd=repo_root(), env=env, capture_output=True, text=True, timeout=600)

    full = launch(tmp_path / "full", 29531)
    assert full.returncode == 0, full.stderr[-3000:]
    cut = launch(tmp_path / "cut", 29532, kill_at=7)  # epoch 2 is steps 5-8; its checkpoint at step 6 is done
    assert cut.returncode != 0 and not (tmp_path / "cut" / "results.json").exists()
    names = sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir() if p.name.startswith("epoch_"))
    assert names[-1] == "epoch_0001_step_00000006", names
    resumed = launch(tmp_path / "cut", 29533, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "epoch_0001_step_00000006" in resumed.stdout
    a = json.loads((tmp_path / "full" / "results.json").read_text())
    b = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert a["num_processes"] == b["num_processes"] == 2
    for key in ("history", "accuracy", "val", "test", "best_epoch", "mask_digests", "batchnorm_digests",
                "global_steps"):
        assert a[key] == b[key], key
    for name in ("supermask.safetensors", "state.safetensors"):
        assert (tmp_path / "full" / "ticket" / name).read_bytes() == (tmp_path / "cut" / "ticket" / name).read_bytes()
