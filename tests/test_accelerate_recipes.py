"""Accelerate's own settings reach the recipes: the launcher's (or a config file's) mixed precision,
overridden by a recipe's --mixed-precision, and the example config files in recipes/accelerate/.

The config files are read by accelerate's own loader and its launcher's argument handling (the
code `accelerate launch --config_file` runs), so they must say what they claim: processes,
machines, machine rank and bf16.
"""
import importlib
import os
import sys

import pytest
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType

import helpers
from fixtures_data import recipes_dir, write_saved_image_dataset

sys.path.insert(0, recipes_dir())
cifar10 = importlib.import_module("cifar10")

fresh_accelerate_state = pytest.fixture(autouse=True)(helpers.one_thread_fresh_accelerate)
CONFIGS = os.path.join(recipes_dir(), "accelerate")
QUICK = ["--model-kwargs", "width=0.0625", "--epochs", "1", "--limit-train-batches", "1", "--batch-size", "8",
         "--num-workers", "0", "--no-progress"]


def _launch_args(config_file, *extra):
    """The arguments `accelerate launch --config_file FILE ... recipes/imagenet.py` ends up with."""
    args = launch_command_parser().parse_args(["--config_file", config_file, *extra,
                                               os.path.join(recipes_dir(), "imagenet.py"), "--data", "/data"])
    _validate_launch_command(args)
    return args


@pytest.mark.parametrize("name,processes,machines", [("8gpu.yaml", 8, 1), ("2x8gpu.yaml", 16, 2)])
def test_the_example_accelerate_configs_parse_and_say_what_they_claim(name, processes, machines):
    path = os.path.join(CONFIGS, name)
    config = load_config_from_file(path)
    assert isinstance(config, ClusterConfig) and config.distributed_type == DistributedType.MULTI_GPU
    assert (config.num_processes, config.num_machines, config.machine_rank) == (processes, machines, 0)
    assert config.mixed_precision == "bf16" and config.use_cpu is False
    args = _launch_args(path)
    assert args.multi_gpu and (args.num_processes, args.num_machines, args.machine_rank) == (processes, machines, 0)
    assert args.mixed_precision == "bf16"  # what the launcher hands the recipe as ACCELERATE_MIXED_PRECISION
    if machines > 1:
        assert config.main_process_ip and isinstance(config.main_process_port, int)
        # the second machine runs the same file with its rank (and the real address) on the command line
        second = _launch_args(path, "--machine_rank", "1", "--main_process_ip", "192.168.1.7")
        assert (second.machine_rank, second.main_process_ip, second.num_processes) == (1, "192.168.1.7", 16)


def test_an_unreadable_accelerate_config_is_named(tmp_path):
    missing = str(tmp_path / "nosuch.yaml")
    with pytest.raises(FileNotFoundError, match=r"configuration file `.*nosuch\.yaml` does not exist"):
        _launch_args(missing)
    bad = tmp_path / "bad.yaml"
    bad.write_text("distributed_type: MULTI_GPU\nnum_processes: 8\nnum_gpus: 8\n")
    with pytest.raises(ValueError, match=r"bad\.yaml had unknown keys \(\['num_gpus'\]\)"):
        _launch_args(str(bad))


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    return str(write_saved_image_dataset(tmp_path_factory.mktemp("data") / "cifar"))


def test_a_recipe_runs_in_the_launchers_precision_and_its_flag_overrides_it(cifar, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # accelerate launch --mixed_precision bf16
    res = cifar10.main(["--data", cifar, *QUICK, "--output-dir", str(tmp_path / "launcher")])
    assert res["mixed_precision"] == "bf16" and "overrides the launcher" not in capsys.readouterr().out
    helpers.reset_accelerate()
    res = cifar10.main(["--data", cifar, *QUICK, "--mixed-precision", "no", "--output-dir", str(tmp_path / "flag")])
    assert res["mixed_precision"] == "no"
    assert "mixed precision: no (mixed_precision / --mixed-precision) overrides the launcher's bf16" \
        in capsys.readouterr().out


def test_a_bad_precision_is_named_on_the_command_line_and_from_the_launcher(cifar, tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit):
        cifar10.main(["--data", cifar, *QUICK, "--mixed-precision", "fp8"])
    assert "argument --mixed-precision: invalid choice: 'fp8'" in capsys.readouterr().err
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf17")
    from fslt_recipe import main_guard
    with pytest.raises(SystemExit) as exit_info:
        # no such data folder: the precision is checked before any data is read
        main_guard(lambda: cifar10.main(["--data", str(tmp_path / "none"), *QUICK, "--output-dir", str(tmp_path)]))
    assert exit_info.value.code == 2
    assert "error: ACCELERATE_MIXED_PRECISION='bf17' (accelerate launch --mixed_precision" in capsys.readouterr().err
