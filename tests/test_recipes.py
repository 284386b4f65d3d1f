"""The Accelerate recipes end to end on tiny data written in the real on-disk formats.

Each recipe: a couple of steps per epoch, a checkpoint per epoch, a run stopped after
one epoch and resumed that matches the uninterrupted run bit for bit (CPU), and a
ticket that reloads and reproduces the reported test metrics.  Bad input fails with
a message naming the option, before anything trains.
"""
import importlib
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import helpers
import timm_fslt
from fixtures_data import (recipes_dir, repo_root, write_image_folder, write_ogbn_arxiv,
                           write_saved_image_dataset)

sys.path.insert(0, recipes_dir())
cifar10 = importlib.import_module("cifar10")
imagenet = importlib.import_module("imagenet")
ogbn_arxiv = importlib.import_module("ogbn_arxiv")
sweep = importlib.import_module("sweep")
R = importlib.import_module("fslt_recipe")

from timm_fslt.training.data import DataError, load_cifar10, load_imagenet, load_ogbn_arxiv  # noqa: E402
from timm_fslt.training import RunConfigError  # noqa: E402

QUICK = ["--epochs", "2", "--limit-train-batches", "2", "--batch-size", "8", "--num-workers", "0",
         "--no-progress", "--lr", "0.5"]
CONV6 = ["--model-kwargs", "width=0.0625"]
TINY_RESNET18 = ["--model-kwargs", "channels=[8,16,32,64]", "stem_width=8"]


# Recipes run in this process one after another: one thread, fresh Accelerate singletons.
fresh_accelerate_state = pytest.fixture(autouse=True)(helpers.one_thread_fresh_accelerate)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {
        "cifar_saved": write_saved_image_dataset(root / "cifar_saved"),
        "cifar_folder": write_image_folder(root / "cifar_folder", splits=("train", "test")),
        "imagenet_folder": write_image_folder(root / "imagenet_folder", splits=("train", "val"), size=40),
        "ogb": write_ogbn_arxiv(root / "ogb"),
    }


def _image_metrics(model, test_set):
    """Accuracy and mean loss of a reloaded ticket on the recipe's own test set, outside Accelerate."""
    loader = torch.utils.data.DataLoader(test_set, batch_size=7)
    correct, losses, n = 0, 0.0, 0
    with torch.no_grad():
        for x, y in loader:
            logits = model(x).float()
            correct += int((logits.argmax(-1) == y).sum())
            losses += float(F.cross_entropy(logits, y, reduction="none").double().sum())
            n += len(y)
    return correct / n, losses / n


def _graph_metrics(model, split):
    g = split.graph
    with torch.no_grad():
        out = model(g["x"], g["edge_index"]).float()[g["index"]]
    y = g["y"][g["index"]]
    return float((out.argmax(-1) == y).double().mean()), float(F.cross_entropy(out.double(), y))


def _end_to_end(recipe, args, tmp_path):
    """Full run, stop-after-1 + resume, same numbers; returns the full run's results."""
    full = recipe.main([*args, "--output-dir", str(tmp_path / "full")])
    assert full["completed"] and len(full["history"]) == 2
    assert (tmp_path / "full" / "checkpoints" / "epoch_0002" / "run_config.json").exists()
    part = recipe.main([*args, "--output-dir", str(tmp_path / "cut"), "--stop-after", "1"])
    assert part["completed"] is False
    assert (tmp_path / "cut" / "checkpoints" / "epoch_0001").is_dir()
    resumed = recipe.main([*args, "--output-dir", str(tmp_path / "cut"), "--resume"])
    for key in ("history", "accuracy", "test", "val", "best_epoch", "mask_digests", "sparsity"):
        assert resumed[key] == full[key], key
    on_disk = json.loads((tmp_path / "full" / "results.json").read_text())
    assert {"accuracy", "sparsity", "size_report", "wall_time_s"} <= set(on_disk)
    assert on_disk["size_report"]["totals"]["ticket_bits"] > 0
    # The scores moved: the final masks differ from the freshly frozen ones.
    assert full["history"][0]["train_loss"] != full["history"][1]["train_loss"]
    return full


def test_cifar10_recipe_on_a_saved_dataset_resumes_exactly_and_saves_a_reloadable_ticket(data, tmp_path):
    args = ["--data", str(data["cifar_saved"]), *CONV6, *QUICK]
    full = _end_to_end(cifar10, args, tmp_path)
    assert full["run"]["preset"] == "cifar10_conv6"
    assert full["sparsity"] == pytest.approx(0.7, abs=1e-3)  # the preset's point: P 0.49, L 0.21, K 0.7
    totals = full["size_report"]["totals"]
    assert totals["mask_compression_vs_dense_source"] == pytest.approx(1 / 0.3, rel=1e-3)

    ticket = timm_fslt.load_ticket(full["ticket_dir"])
    test_set = load_cifar10(str(data["cifar_saved"])).test
    acc, loss = _image_metrics(ticket, test_set)
    assert acc == full["accuracy"]["test"]
    assert loss == pytest.approx(full["test"]["loss"], rel=1e-5)


def test_cifar10_recipe_reads_an_image_folder_and_trains_weights_of_resnet18_cifar(data, tmp_path):
    res = cifar10.main(["--data", str(data["cifar_folder"]), "--model", "resnet18_cifar",
                        "--model-kwargs", "width=0.125", "--method", "weights", *QUICK, "--epochs", "1",
                        "--output-dir", str(tmp_path / "w")])
    assert res["run"]["preset"] == "cifar10_resnet18_cifar" and res["config"]["lr"] == 0.5
    assert res["method"] == "weights" and os.path.exists(res["model_file"])
    assert res["run"]["data"] == {"train": 32, "val": 8, "test": 20, "num_classes": 10}


def test_imagenet_recipe_on_an_image_folder_resumes_exactly_and_saves_a_reloadable_ticket(data, tmp_path):
    args = ["--data", str(data["imagenet_folder"]), "--img-size", "32", *TINY_RESNET18, *QUICK]
    full = _end_to_end(imagenet, args, tmp_path)
    freeze = full["run"]["freeze"]
    assert freeze["weight_init"] == "signed_kaiming_constant" and freeze["scale"] == "dynamic"
    assert full["config"]["batch_size"] == 8
    ticket = timm_fslt.load_ticket(full["ticket_dir"])
    test_set = load_imagenet(str(data["imagenet_folder"]), img_size=32).test
    acc, loss = _image_metrics(ticket, test_set)
    assert acc == full["accuracy"]["test"]
    assert loss == pytest.approx(full["test"]["loss"], rel=1e-5)


def test_ogbn_arxiv_recipe_trains_full_graph_resumes_exactly_and_saves_a_reloadable_ticket(data, tmp_path):
    args = ["--data-root", str(data["ogb"]), "--model-kwargs", "hidden=16", "--epochs", "2",
            "--no-progress", "--lr", "0.05"]
    full = _end_to_end(ogbn_arxiv, args, tmp_path)
    assert full["config"]["optimizer"] == "adamw" and full["global_steps"] == 2  # one step per epoch
    graph = load_ogbn_arxiv(str(data["ogb"]))
    assert full["run"]["data"]["train_nodes"] == 36
    ticket = timm_fslt.load_ticket(full["ticket_dir"])
    acc, loss = _graph_metrics(ticket, graph.test)
    assert acc == pytest.approx(full["accuracy"]["test"], abs=1e-12)  # ogb Evaluator's accuracy
    assert loss == pytest.approx(full["test"]["loss"], rel=1e-5)


def test_cifar10_recipe_under_accelerate_launch_with_two_processes_keeps_masks_and_batchnorm_identical(
        data, tmp_path):
    # `accelerate launch --cpu --num_processes 2` starts a single process in accelerate 1.x
    # (it needs MPI for more); torchrun-based launching with the recipe's --cpu gives two.
    # resnet18_cifar has BatchNorm: without DDP's buffer broadcast its statistics must be averaged.
    out, counted = tmp_path / "ddp", tmp_path / "broadcast"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", "29517", os.path.join(recipes_dir(), "cifar10.py"), "--cpu",
           "--data", str(data["cifar_saved"]), "--model", "resnet18_cifar", "--model-kwargs", "width=0.125",
           "--epochs", "1",
           "--limit-train-batches", "2", "--batch-size", "8", "--num-workers", "0", "--no-progress", "--lr", "5.0",
           "--check-sync-every", "1", "--log-every", "1", "--output-dir", str(out)]
    # sitecustomize in that folder counts the bytes DDP broadcasts in each process
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OUTDATED_IGNORE": "1", "HF_HUB_OFFLINE": "1",
           "FSLT_BROADCAST_LOG": str(counted), "PYTHONPATH": os.pathsep.join(
               [os.path.join(repo_root(), "tests", "fixtures", "ddp_broadcast_counter"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, cwd=repo_root(), env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["num_processes"] == 2
    assert len(res["mask_digests"]) == 2 and res["mask_digests"][0] == res["mask_digests"][1]
    assert len(res["batchnorm_digests"]) == 2 and res["batchnorm_digests"][0] == res["batchnorm_digests"][1]
    # masks were compared across the two processes after every optimizer step, not only per epoch
    assert res["step_sync_checks"] == res["global_steps"] == 2
    # only the main process writes: one config record, each step logged once
    from helpers import read_jsonl
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["event"] for r in records].count("config") == 1
    steps = [r["step"] for r in records if "train/step_loss" in r]
    assert steps == [1, 2]
    fresh = timm_fslt.freeze(timm_fslt.create_model("resnet18_cifar", width=0.125, num_classes=10),
                             0.49, 0.21, sparsity=0.7, seed=0)
    from timm_fslt.training import mask_digest
    assert res["mask_digests"][0] != mask_digest(fresh)  # training changed the masks, identically
    # DDP's default would broadcast every buffer (random weights, codes, masks, BN statistics) from
    # rank 0 before each training forward; the frozen model's run broadcasts none.
    per_step_default = sum(b.numel() * b.element_size() for b in fresh.buffers())
    for rank in (0, 1):
        sent = json.loads((counted / f"rank{rank}.json").read_text())
        assert sent["init_bytes"] > 0  # the counter was live: DDP's one-time parameter sync
        assert sent["forward_calls"] == 0 and sent["forward_bytes"] == 0 < per_step_default


@pytest.mark.slow
def test_a_two_process_run_resumes(data, tmp_path):
    # The checkpoint's keys were once compared with the DDP-wrapped model ('module.' prefix),
    # so no multi-process run could resume.
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", "29519", os.path.join(recipes_dir(), "cifar10.py"), "--cpu",
           "--data", str(data["cifar_saved"]), *CONV6, *QUICK, "--output-dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OUTDATED_IGNORE": "1", "HF_HUB_OFFLINE": "1"}
    for extra in (["--stop-after", "1"], ["--resume"]):
        proc = subprocess.run([*cmd, *extra], cwd=repo_root(), env=env, capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "epoch_0001" in proc.stdout
    res = json.loads((out / "results.json").read_text())
    assert res["num_processes"] == 2 and [h["epoch"] for h in res["history"]] == [1, 2]
    assert res["mask_digests"][0] == res["mask_digests"][1]


def test_push_to_hub_uploads_the_runs_ticket_and_a_model_card(data, tmp_path):
    from hub_server import HubServer

    out = tmp_path / "push"
    with HubServer(token="hf_recipe_token", lifetime=300) as hub:
        # huggingface_hub reads HF_ENDPOINT at import: the recipe runs in its own process.
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_recipe_token", "HF_HOME": str(tmp_path / "hf"),
               "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "OMP_NUM_THREADS": "1",
               "OUTDATED_IGNORE": "1"}
        cmd = [sys.executable, os.path.join(recipes_dir(), "cifar10.py"), "--data", str(data["cifar_saved"]),
               *CONV6, *QUICK, "--epochs", "1", "--output-dir", str(out), "--push-to-hub", "tester/conv6-ticket"]
        proc = subprocess.run(cmd, cwd=repo_root(), env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        files = hub.files("tester/conv6-ticket")
    assert sorted(files) == ["README.md", "config.json", "state.safetensors", "supermask.safetensors"]
    assert files["supermask.safetensors"] == (out / "ticket" / "supermask.safetensors").read_bytes()
    res = json.loads((out / "results.json").read_text())
    assert "tester/conv6-ticket" in res["hub_url"]
    assert "test_accuracy" in files["README.md"].decode()


def test_sweep_runs_points_collects_results_and_plots_accuracy_against_ticket_bits(data, tmp_path):
    out = tmp_path / "sweep"
    argv = ["--recipe", "cifar10", "--points", "0,0,0.5", "0.4,0,0.5", "0.3,0.2,0.5", "--weights",
            "--output-dir", str(out), "--", "--data", str(data["cifar_saved"]), *CONV6, *QUICK,
            "--epochs", "1", "--limit-train-batches", "1"]
    summary = sweep.main(argv)
    kinds = [row["kind"] for row in summary["points"]]
    assert kinds == ["dense source", "sparse source", "frozen", "weights"]
    bits = [row["ticket_bits"] for row in summary["points"][:3]]
    assert bits[0] > bits[1] > bits[2]  # fewer free weights, fewer bits
    png = out / "accuracy_vs_size.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "sweep.json").read_text())["points"] == summary["points"]
    # A second call reads the finished points back instead of training them again.
    stamp = os.path.getmtime(out / "p0-l0-k0.5" / "results.json")
    again = sweep.main(argv)
    assert again["points"] == summary["points"]
    assert os.path.getmtime(out / "p0-l0-k0.5" / "results.json") == stamp


def test_train_val_split_is_four_to_one_disjoint_and_fixed_by_the_seed():
    from timm_fslt.training.data import split_train_val

    train, val = split_train_val(50000, 0.2, seed=0)
    assert (len(train), len(val)) == (40000, 10000) and not set(train) & set(val)
    assert split_train_val(50000, 0.2, seed=0) == (train, val)
    assert split_train_val(50000, 0.2, seed=1)[1] != val


def test_imagenet_data_reads_a_saved_dataset_with_image_column_and_validation_split(tmp_path):
    path = write_saved_image_dataset(tmp_path / "inet", image_column="image", test_split="validation",
                                     n_train=10, n_test=4, size=40)
    data = load_imagenet(str(path), img_size=32)
    assert (len(data.train), len(data.val), len(data.test), data.num_classes) == (8, 2, 4, 10)
    x, y = data.test[1]
    assert x.shape == (3, 32, 32) and y == 1


@pytest.mark.parametrize("preset,expected", [
    ("cifar10_conv6", {"model": "conv6", "epochs": 100, "batch_size": 128, "optimizer": "sgd", "lr": 0.01}),
    ("cifar10_resnet18_cifar", {"model": "resnet18_cifar", "epochs": 100, "batch_size": 128, "lr": 0.1}),
    ("imagenet_resnet18", {"model": "resnet18", "epochs": 100, "batch_size": 256, "lr": 0.1}),
    ("ogbn_arxiv_gin", {"model": "gin", "epochs": 400, "optimizer": "adamw", "lr": 0.01}),
])
def test_presets_hold_the_papers_settings_and_valid_sweep_points(preset, expected):
    s = {**R.BASE, **R.load_preset(preset), "_explicit": []}
    assert {k: s[k] for k in expected} == expected
    assert s["momentum"] == 0.9 and s["weight_decay"] == 1e-4 and s["scheduler"] == "cosine"
    assert s["val_fraction"] == 0.2 and s["batchnorm"] == "non_affine" and s["scope"] == "global"
    kinds = set()
    for prune, lock, sparsity in s["sweep"]:
        R.check_settings({**s, "prune": prune, "lock": lock, "sparsity": sparsity})
        kinds.add(sweep.point_kind(prune, lock))
    assert kinds == {"dense source", "sparse source", "frozen"}


# -- bad input: a clear error before anything trains ----------------------------------------
def _no_run(path):
    assert not os.path.exists(os.path.join(path, "checkpoints"))


def test_missing_data_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--data: path '.*missing' does not exist"):
        cifar10.main(["--data", str(tmp_path / "missing"), *CONV6, "--output-dir", str(tmp_path / "o")])
    _no_run(tmp_path / "o")


def test_data_folder_with_another_layout_is_refused(tmp_path):
    (tmp_path / "odd" / "train").mkdir(parents=True)  # no class folders, no test split
    (tmp_path / "odd" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"--data: .*odd' has an unknown layout.*image folder with train/"):
        cifar10.main(["--data", str(tmp_path / "odd"), *CONV6, "--output-dir", str(tmp_path / "o")])
    _no_run(tmp_path / "o")


def test_saved_dataset_without_image_and_label_columns_is_refused(tmp_path):
    path = write_saved_image_dataset(tmp_path / "cols", image_column="pixels", n_train=4, n_test=2)
    with pytest.raises(DataError, match=r"has columns \['pixels', 'label'\]; expected an image column "
                                        r"\(one of \['img', 'image'\]\) and a 'label' column"):
        cifar10.main(["--data", str(path), *CONV6, "--output-dir", str(tmp_path / "o")])
    _no_run(tmp_path / "o")


def test_saved_dataset_without_a_test_split_is_refused(tmp_path):
    path = write_saved_image_dataset(tmp_path / "splits", test_split="holdout", n_train=4, n_test=2)
    with pytest.raises(DataError, match=r"has splits \['holdout', 'train'\]; expected 'train' and a held-out"):
        cifar10.main(["--data", str(path), *CONV6, "--output-dir", str(tmp_path / "o")])


def test_unknown_model_name_is_refused(tmp_path):
    with pytest.raises(R.RecipeError, match="--model: unknown model 'resnet_nonexistent'"):
        imagenet.main(["--data", str(tmp_path), "--model", "resnet_nonexistent"])
    with pytest.raises(R.RecipeError, match="--model: unknown model 'gcn' for ogbn_arxiv"):
        ogbn_arxiv.main(["--data-root", str(tmp_path), "--model", "gcn"])


def test_bad_freezing_and_method_options_are_named(tmp_path):
    with pytest.raises(R.RecipeError, match=r"--prune must lie in \[0, 1\], got 1.5"):
        cifar10.main(["--prune", "1.5", "--data", str(tmp_path)])
    with pytest.raises(R.RecipeError, match=r"--sparsity must lie in \[prune, 1 - lock\]"):
        cifar10.main(["--prune", "0.5", "--lock", "0.2", "--sparsity", "0.9", "--data", str(tmp_path)])
    with pytest.raises(R.RecipeError, match="--prune only apply to --method ticket"):
        cifar10.main(["--method", "weights", "--prune", "0.5", "--data", str(tmp_path)])
    with pytest.raises(R.RecipeError, match="--preset: no preset 'nope'"):
        cifar10.main(["--preset", "nope"])


def test_resume_of_a_run_with_another_configuration_is_refused(data, tmp_path):
    args = ["--data", str(data["cifar_saved"]), *CONV6, *QUICK, "--output-dir", str(tmp_path / "r")]
    cifar10.main([*args, "--stop-after", "1"])
    with pytest.raises(RunConfigError, match=r"belongs to a different configuration: .*train\.lr: 0\.5 "
                                             r"\(checkpoint\) != 0\.25 \(now\)"):
        cifar10.main([*args, "--lr", "0.25", "--resume"])
    with pytest.raises(RunConfigError, match=r"run\.freeze\.lock: 0\.21 \(checkpoint\) != 0\.1 \(now\)"):
        cifar10.main([*args, "--lock", "0.1", "--resume"])
    assert sorted(os.listdir(tmp_path / "r" / "checkpoints")) == ["epoch_0001", "latest"]


def test_resume_option_takes_latest_auto_fallback_or_a_folder_and_refuses_the_rest(tmp_path):
    def resume(*argv):
        return R.resolve_settings(cifar10.parser(), list(argv), recipe="cifar10", default_model="conv6")["resume"]

    assert resume("--resume") is True and resume("--resume", "latest") is True
    assert resume("--resume", "auto") == "auto" and resume("--resume", "fallback") == "fallback"
    assert resume("--resume", str(tmp_path)) == str(tmp_path) and resume() is False
    # Refused before the (missing) data is read.
    for value, message in (("", r"--resume must be .* got an empty string"),
                           ("Fallback", r"--resume must be .* got 'Fallback' \(not a mode, and no such folder\)")):
        with pytest.raises(R.RecipeError, match=message):
            cifar10.main(["--resume", value, "--data", str(tmp_path / "missing")])
    assert "'fallback'" in cifar10.parser().format_help()


def test_a_damaged_newest_checkpoint_stops_the_recipe_until_resume_fallback(data, tmp_path, capsys):
    out = tmp_path / "r"
    args = ["--data", str(data["cifar_saved"]), *CONV6, *QUICK, "--epochs", "3", "--keep-checkpoints", "2",
            "--output-dir", str(out)]
    cifar10.main([*args, "--stop-after", "2"])
    optimizer = out / "checkpoints" / "epoch_0002" / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    with pytest.raises(SystemExit) as exit_info:
        R.main_guard(lambda: cifar10.main([*args, "--resume"]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(r"error: resume: checkpoint '.*epoch_0002' is invalid: optimizer\.bin has 100 bytes, "
                     r"run_config\.json records \d+\..*--resume fallback", err), err
    with pytest.warns(UserWarning, match=r"skipped checkpoint .*epoch_0002"):
        done = cifar10.main([*args, "--resume", "fallback"])
    assert done["completed"] and [h["epoch"] for h in done["history"]] == [1, 2, 3]


def test_ogbn_folder_without_release_file_fails_instead_of_prompting(tmp_path):
    root = write_ogbn_arxiv(tmp_path / "ogb", release_file=False)
    with pytest.raises(DataError, match="lacks RELEASE_v1.txt"):
        ogbn_arxiv.main(["--data-root", str(root), "--output-dir", str(tmp_path / "o")])
    assert (root / "ogbn_arxiv" / "raw" / "edge.csv.gz").exists()  # nothing deleted


def test_ogbn_missing_root_points_at_download(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--data-root: .* does not exist.*--download"):
        ogbn_arxiv.main(["--data-root", str(tmp_path / "nothing")])
    (tmp_path / "half" / "ogbn_arxiv").mkdir(parents=True)
    (tmp_path / "half" / "ogbn_arxiv" / "RELEASE_v1.txt").write_text("v1")
    with pytest.raises(FileNotFoundError, match=r"is not an ogbn-arxiv folder: missing \['raw/edge.csv.gz'"):
        ogbn_arxiv.main(["--data-root", str(tmp_path / "half")])


def test_command_line_errors_exit_with_the_message_not_a_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        R.main_guard(lambda: cifar10.main(["--model", "nosuchnet"]))
    assert exit_info.value.code == 2
    assert "error: --model: unknown model 'nosuchnet'" in capsys.readouterr().err
