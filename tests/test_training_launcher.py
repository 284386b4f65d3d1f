"""The launcher's settings against a recipe's flags: honoured with a note where the flag can win,
a clear error naming both sides (nothing written) where it cannot."""
import importlib
import re
import sys

import pytest
import torch
from torch.utils.data import TensorDataset

import helpers
import timm_fslt
from fixtures_data import recipes_dir, write_saved_image_dataset
from timm_fslt.training import RunConfigError, TrainConfig, train

sys.path.insert(0, recipes_dir())
cifar10 = importlib.import_module("cifar10")

fresh_accelerate_state = pytest.fixture(autouse=True)(helpers.one_thread_fresh_accelerate)
QUICK = ["--model-kwargs", "width=0.0625", "--epochs", "1", "--limit-train-batches", "2", "--batch-size", "8",
         "--num-workers", "0", "--no-progress"]


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    return TensorDataset(torch.randn(n, 3, 32, 32, generator=g), y)


def _run(out, **kw):
    model = timm_fslt.freeze(timm_fslt.create_model("conv6", width=0.0625, num_classes=4), 0.3, 0.2, seed=3)
    config = TrainConfig(**{**dict(output_dir=str(out), epochs=1, batch_size=16, limit_train_batches=2,
                                   progress=False, save_ticket=False), **kw})
    return train(model, _data(32, 0), _data(16, 1), None, config)


def test_the_launchers_gradient_accumulation_is_used_and_a_setting_overrides_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "2")  # accelerate launch --gradient_accumulation_steps 2
    res = _run(tmp_path / "launcher")
    assert res["config"]["grad_accum_steps"] == 2 and res["global_steps"] == 1  # 2 batches, one optimizer step
    assert "overrides the launcher" not in capsys.readouterr().out
    helpers.reset_accelerate()
    res = _run(tmp_path / "flag", grad_accum_steps=1)
    assert res["config"]["grad_accum_steps"] == 1 and res["global_steps"] == 2  # Accelerate did not take the env's 2
    assert "gradient accumulation: 1 (grad_accum_steps / --grad-accum) overrides the launcher's 2" \
        in capsys.readouterr().out


def test_a_bad_launcher_accumulation_value_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "zero")
    with pytest.raises(RunConfigError, match=r"ACCELERATE_GRADIENT_ACCUMULATION_STEPS='zero' .* must be a positive int"):
        _run(tmp_path / "r")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("flags, env, message", [
    (["--grad-accum", "2"], {"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"},
     r"grad_accum_steps / --grad-accum 2 conflicts with the launcher's gradient_accumulation_steps 4 "
     r"\(ACCELERATE_GRADIENT_ACCUMULATION_STEPS\) under DeepSpeed"),
    (["--bf16"], {"ACCELERATE_MIXED_PRECISION": "fp16"},
     r"mixed_precision / --mixed-precision bf16 conflicts with the launcher's fp16 \(ACCELERATE_MIXED_PRECISION\) "
     r"under DeepSpeed"),
])
def test_a_flag_deepspeeds_config_overrules_is_an_error_before_any_data_is_read(flags, env, message, tmp_path,
                                                                               monkeypatch, capsys):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    from fslt_recipe import main_guard

    out = tmp_path / "never"
    with pytest.raises(SystemExit) as exit_info:  # the data folder does not exist: checked before it is read
        main_guard(lambda: cifar10.main(["--data", str(tmp_path / "none"), *QUICK, *flags, "--output-dir", str(out)]))
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()


def test_fp16_on_the_cpu_is_an_error_naming_both_sides_and_writes_nothing(tmp_path, monkeypatch):
    with pytest.raises(RunConfigError, match=r"mixed_precision / --mixed-precision fp16 cannot run on the CPU "
                                             r"\(cpu / --cpu\): .*use bf16 or no"):
        _run(tmp_path / "a", mixed_precision="fp16", cpu=True)
    assert not (tmp_path / "a").exists()
    helpers.reset_accelerate()
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    with pytest.raises(RunConfigError, match=r"the launcher's mixed_precision fp16 \(ACCELERATE_MIXED_PRECISION\) "
                                             r"cannot run on the CPU \(the launcher's --cpu \(ACCELERATE_USE_CPU\)\)"):
        _run(tmp_path / "b")
    assert not (tmp_path / "b").exists()
    helpers.reset_accelerate()
    # The recipe flag can win over the launcher here: bf16 runs on the CPU, with the note.
    res = _run(tmp_path / "c", mixed_precision="bf16")
    assert res["mixed_precision"] == "bf16"


def test_the_recipe_passes_the_launchers_accumulation_through(tmp_path, monkeypatch):
    data = write_saved_image_dataset(tmp_path / "cifar")
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "2")
    res = cifar10.main(["--data", str(data), *QUICK, "--output-dir", str(tmp_path / "run")])
    assert res["config"]["grad_accum_steps"] == 2 and res["global_steps"] == 1
