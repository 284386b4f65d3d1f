"""The recipes' search methods (issue #18): --method edge_popup | multicoated | iterand and their
options reach FreezeConfig, bad values fail with FreezeConfig's message in the command line's
words before anything trains, a sparsity schedule spans exactly the run's optimizer steps, and a
resumed run continues the schedule and the IteRand rounds (the search_step buffers)."""
import importlib
import json
import sys

import pytest
from safetensors.torch import load_file

import helpers
from fixtures_data import recipes_dir, write_ogbn_arxiv, write_saved_image_dataset

sys.path.insert(0, recipes_dir())
cifar10 = importlib.import_module("cifar10")
ogbn_arxiv = importlib.import_module("ogbn_arxiv")
sweep = importlib.import_module("sweep")
R = importlib.import_module("fslt_recipe")

from timm_fslt.frozen import FreezeConfig, get_group  # noqa: E402
from timm_fslt.training import RunConfigError, TrainConfig  # noqa: E402
from timm_fslt.training.steps import run_steps, steps_per_epoch  # noqa: E402

fresh_accelerate_state = pytest.fixture(autouse=True)(helpers.one_thread_fresh_accelerate)
TINY = ["--model-kwargs", "width=0.0625", "--batch-size", "8", "--num-workers", "0", "--no-progress", "--lr", "0.5"]


def settings(*argv):
    return R.resolve_settings(cifar10.parser(), list(argv), recipe="cifar10", default_model="conv6")


def freeze_config(s):
    return FreezeConfig(**R.M.freeze_kwargs(s, R.FREEZE_KEYS))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {"cifar": write_saved_image_dataset(root / "cifar"), "ogb": write_ogbn_arxiv(root / "ogb")}


def test_method_and_options_reach_freeze_config():
    s = settings("--method", "multicoated", "--coat-sparsities", "0.6", "0.7", "0.75")
    assert (s["method"], s["search_method"], s["sparsity"]) == ("ticket", "multicoated", None)  # preset K gives way
    c = freeze_config(s)
    assert (c.method, c.coat_sparsities, c.sparsity) == ("multicoated", (0.6, 0.7, 0.75), 0.6)

    c = freeze_config(settings("--method", "iterand", "--rerand-period", "7", "--rerand-rate", "0.25"))
    assert (c.method, c.rerand_period, c.rerand_rate, c.sparsity) == ("iterand", 7, 0.25, 0.7)
    c = freeze_config(settings("--method", "iterand"))
    assert (c.rerand_period, c.rerand_rate) == (100, 0.1)  # FreezeConfig's defaults

    s = settings("--sparsity-schedule", "cosine", "0.5", "0.25", "--schedule-steps", "40")
    assert s["search_method"] == "edge_popup" and s["sparsity_schedule"] == ("cosine", 0.5, 0.25)
    c = freeze_config(s)
    assert (c.method, c.sparsity_schedule, c.schedule_steps) == ("edge_popup", ("cosine", 0.5, 0.25), 40)

    for argv in ([], ["--method", "ticket"], ["--method", "edge_popup"]):
        s = settings(*argv)
        assert (s["method"], s["search_method"]) == ("ticket", "edge_popup")
        assert freeze_config(s).to_dict() == FreezeConfig(prune=0.49, lock=0.21, sparsity=0.7).to_dict()
    assert settings("--method", "weights")["method"] == "weights"
    # the default output folder names the method, so runs of two methods never share one
    assert R.default_output_dir("cifar10", settings("--method", "iterand")).endswith("p0.49-l0.21-k0.7-iterand-seed0")
    assert R.default_output_dir("cifar10", settings()).endswith("p0.49-l0.21-k0.7-seed0")


@pytest.mark.parametrize("argv, words", [
    (["--method", "multicoated", "--coat-sparsities", "0.8", "0.75"], "--coat-sparsities must be strictly increasing"),
    (["--method", "multicoated", "--coat-sparsities", "0.7", "0.9"], "--coat-sparsities must lie in [prune, 1 - lock]"),
    (["--method", "multicoated", "--coat-sparsities", "0.6", "0.7", "--sparsity", "0.7"],
     "is the densest coat's sparsity"),
    (["--rerand-period", "5"], "--rerand-period is an option of --method iterand, not of --method edge_popup"),
    (["--method", "multicoated", "--rerand-rate", "0.5"], "--rerand-rate is an option of --method iterand"),
    (["--method", "iterand", "--rerand-rate", "1.5"], "--rerand-rate must lie in (0, 1]"),
    (["--method", "iterand", "--rerand-period", "0"], "--rerand-period must be a number of optimizer steps"),
    (["--sparsity-schedule", "steep", "0.5", "0.5"], "--sparsity-schedule's shape must be one of"),
    (["--sparsity-schedule", "linear", "0.3", "0.5"], "--sparsity-schedule's start must lie in [prune, sparsity]"),
    (["--sparsity-schedule", "linear", "0.5", "1.5"], "--sparsity-schedule's until"),
    (["--sparsity-schedule", "linear", "half", "0.5"], "--sparsity-schedule: START and UNTIL must be numbers"),
    (["--schedule-steps", "10"], "--schedule-steps is the length of a --sparsity-schedule"),
    (["--method", "weights", "--rerand-period", "5"], "--rerand-period only apply to --method ticket"),
])
def test_bad_method_options_fail_before_any_data_naming_the_option(argv, words):
    with pytest.raises(R.RecipeError) as err:
        cifar10.main(["--data", "/nonexistent", *argv])  # refused before the data is looked at
    assert isinstance(err.value, ValueError) and words in str(err.value), str(err.value)


@pytest.mark.parametrize("n, kwargs, expected", [
    (32, dict(batch_size=8), 4), (33, dict(batch_size=8), 5), (32, dict(batch_size=8, grad_accum_steps=2), 4),
    (32, dict(batch_size=8, limit_train_batches=2), 2), (3, dict(batch_size=8), 1),
])
def test_steps_per_epoch(n, kwargs, expected):
    assert steps_per_epoch(n, TrainConfig(**kwargs)) == expected
    assert run_steps(n, TrainConfig(epochs=3, **kwargs)) == 3 * expected
    assert steps_per_epoch(32, TrainConfig(batch_size=8), num_processes=2) == 4  # 4 batches of 4 a process
    assert steps_per_epoch(1, TrainConfig(), batched=False) == 1


def test_schedule_spans_exactly_the_runs_optimizer_steps(data, tmp_path):
    # 32 train examples, global batch 8 in two accumulation steps: 4 optimizer steps an epoch.
    res = cifar10.main(["--data", str(data["cifar"]), *TINY, "--epochs", "2", "--grad-accum", "2",
                        "--sparsity-schedule", "linear", "0.49", "1.0", "--output-dir", str(tmp_path / "run")])
    assert res["run"]["freeze"]["schedule_steps"] == res["global_steps"] == 8
    assert res["history"][0]["sparsity"] < res["history"][1]["sparsity"] == pytest.approx(0.7, abs=1e-3)
    graph = ogbn_arxiv.main(["--data-root", str(data["ogb"]), "--model-kwargs", "hidden=16", "--epochs", "3",
                             "--no-progress", "--sparsity-schedule", "cosine", "0.5", "0.5",
                             "--output-dir", str(tmp_path / "graph")])
    assert graph["run"]["freeze"]["schedule_steps"] == graph["global_steps"] == 3  # one full-graph step an epoch


def _search_steps(checkpoint):
    state = load_file(str(checkpoint / "model.safetensors"))
    steps = {int(v) for k, v in state.items() if k.endswith("search_step")}
    rounds = [v for k, v in state.items() if k.endswith("rerand_round")]
    return steps, rounds


def test_resumed_iterand_run_with_a_schedule_continues_steps_rounds_and_schedule(data, tmp_path):
    args = ["--data", str(data["cifar"]), *TINY, "--epochs", "2", "--method", "iterand", "--rerand-period", "3",
            "--rerand-rate", "0.5", "--sparsity-schedule", "linear", "0.49", "0.75"]
    full = cifar10.main([*args, "--output-dir", str(tmp_path / "full")])
    part = cifar10.main([*args, "--output-dir", str(tmp_path / "cut"), "--stop-after", "1"])
    assert part["completed"] is False
    steps, rounds = _search_steps(tmp_path / "cut" / "checkpoints" / "epoch_0001")
    assert steps == {4} and any(int(r.max()) == 1 for r in rounds)  # round 1 ran at step 3
    resumed = cifar10.main([*args, "--output-dir", str(tmp_path / "cut"), "--resume"])
    for key in ("history", "accuracy", "test", "val", "best_epoch", "mask_digests", "sparsity", "global_steps"):
        assert resumed[key] == full[key], key
    for run in ("full", "cut"):
        steps, rounds = _search_steps(tmp_path / run / "checkpoints" / "epoch_0002")
        assert steps == {8} and any(int(r.max()) == 2 for r in rounds)  # counted on from 4; round 2 at step 6
    record = json.loads((tmp_path / "cut" / "checkpoints" / "epoch_0002" / "run_config.json").read_text())
    identity = record["identity"]
    assert identity["run"]["freeze"]["method"] == "iterand" and identity["run"]["freeze"]["schedule_steps"] == 8
    assert identity["model"]["freeze"]["rerand_period"] == 3
    assert identity["model"]["freeze"]["sparsity_schedule"] == ["linear", 0.49, 0.75]
    # a resume with other method options is refused, naming the difference
    args[args.index("--rerand-period") + 1] = "4"
    with pytest.raises(RunConfigError, match="rerand_period"):
        cifar10.main([*args, "--output-dir", str(tmp_path / "cut"), "--resume"])


def test_sweep_runs_every_point_with_each_method(data, tmp_path):
    summary = sweep.main(["--recipe", "cifar10", "--points", "0.49,0.21,0.7", "--methods", "edge_popup",
                          "multicoated", "--output-dir", str(tmp_path / "sweep"), "--",
                          "--data", str(data["cifar"]), *TINY, "--epochs", "1", "--limit-train-batches", "1"])
    rows = {r["name"]: r for r in summary["points"]}
    assert set(rows) == {"p0.49-l0.21-k0.7", "p0.49-l0.21-k0.7-multicoated"}
    assert rows["p0.49-l0.21-k0.7-multicoated"]["method"] == "multicoated"
    saved = json.loads((tmp_path / "sweep" / "p0.49-l0.21-k0.7-multicoated" / "results.json").read_text())
    assert saved["run"]["freeze"]["method"] == "multicoated"
    assert saved["run"]["freeze"]["coat_sparsities"][0] == 0.7
    assert (tmp_path / "sweep" / "sweep.json").exists()
    with pytest.raises(R.RecipeError, match="densest coat's sparsity"):  # every point checked before any trains
        sweep.main(["--recipe", "cifar10", "--points", "0.49,0.21,0.7", "0.1,0.0,0.2", "--methods", "multicoated",
                    "--output-dir", str(tmp_path / "bad"), "--", "--coat-sparsities", "0.7", "0.75"])
