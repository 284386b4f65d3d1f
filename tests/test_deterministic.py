"""Deterministic mode (issue #19): ``deterministic_mode``, ``TrainConfig(deterministic=True)`` and
the recipes' ``--deterministic``.

No GPU here: the tests check that every global setting is made and restored, that the option
travels through configs, checkpoints and the command line, and that on the CPU it changes no
result.  Small in-memory data and a Conv6 at 1/16 width, as in tests/test_train_loop.py.
"""
import importlib
import json
import os
import sys

import pytest
import torch

import helpers
import timm_fslt
from fixtures_data import recipes_dir
from helpers import four_class_images, layer_scores
from timm_fslt.training import ClassificationTask, RunConfigError, TrainConfig, deterministic_mode, train
from timm_fslt.training.config import CUBLAS_WORKSPACE_ENV

sys.path.insert(0, recipes_dir())
cifar10 = importlib.import_module("cifar10")
R = importlib.import_module("fslt_recipe")

fresh_accelerate_state = pytest.fixture(autouse=True)(helpers.one_thread_fresh_accelerate)


def _flags() -> dict:
    """Every global setting deterministic_mode touches, as readable here."""
    b = torch.backends
    out = {"algorithms": torch.are_deterministic_algorithms_enabled(),
           "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
           "cudnn.deterministic": b.cudnn.deterministic, "cudnn.benchmark": b.cudnn.benchmark,
           "matmul_precision": torch.get_float32_matmul_precision(),
           "cuda.matmul.allow_tf32": b.cuda.matmul.allow_tf32, "cudnn.allow_tf32": b.cudnn.allow_tf32}
    nodes = {"top": b, "mkldnn": b.mkldnn, "cudnn": b.cudnn, "cudnn.conv": getattr(b.cudnn, "conv", None),
             "cudnn.rnn": getattr(b.cudnn, "rnn", None), "cuda.matmul": b.cuda.matmul}
    out.update({f"{name}.fp32_precision": node.fp32_precision for name, node in nodes.items()
                if node is not None and hasattr(node, "fp32_precision")})
    return out


@pytest.fixture
def nondefault_flags():
    """Settings unlike both torch's defaults and deterministic mode, put back afterwards."""
    b = torch.backends
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              b.cudnn.deterministic, b.cudnn.benchmark, torch.get_float32_matmul_precision(), b.cudnn.allow_tf32)
    torch.use_deterministic_algorithms(True, warn_only=True)
    b.cudnn.benchmark = True
    torch.set_float32_matmul_precision("medium")
    b.cudnn.allow_tf32 = True
    yield _flags()
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    b.cudnn.deterministic, b.cudnn.benchmark = before[2], before[3]
    torch.set_float32_matmul_precision(before[4])
    b.cudnn.allow_tf32 = before[5]


def _assert_deterministic():
    b = torch.backends
    assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
    assert b.cudnn.deterministic is True and b.cudnn.benchmark is False
    assert b.cuda.matmul.allow_tf32 is False and b.cudnn.allow_tf32 is False
    assert torch.get_float32_matmul_precision() == "highest"
    for node in (getattr(b.cudnn, "conv", None), getattr(b.cudnn, "rnn", None), b.cuda.matmul):
        if node is not None and hasattr(node, "fp32_precision"):  # torch >= 2.9: no operator left at TF32
            assert node.fp32_precision in ("ieee", "none")


def test_the_context_sets_every_flag_and_restores_all_of_them(nondefault_flags, monkeypatch):
    monkeypatch.delenv(CUBLAS_WORKSPACE_ENV, raising=False)
    assert nondefault_flags["cudnn.benchmark"] and nondefault_flags["matmul_precision"] == "medium"
    with deterministic_mode(True):
        _assert_deterministic()
        assert torch.backends.cuda.matmul.allow_tf32 is False
        assert os.environ[CUBLAS_WORKSPACE_ENV] == ":4096:8"
    assert _flags() == nondefault_flags
    assert CUBLAS_WORKSPACE_ENV not in os.environ  # it set the variable, so it removes it


def test_the_flags_are_restored_when_the_body_raises(nondefault_flags, monkeypatch):
    monkeypatch.delenv(CUBLAS_WORKSPACE_ENV, raising=False)
    with pytest.raises(ZeroDivisionError):
        with deterministic_mode(True):
            _assert_deterministic()
            1 / 0
    assert _flags() == nondefault_flags and CUBLAS_WORKSPACE_ENV not in os.environ


def test_a_workspace_config_already_set_is_kept(monkeypatch):
    monkeypatch.setenv(CUBLAS_WORKSPACE_ENV, ":16:8")
    before = _flags()
    with deterministic_mode(True):
        assert os.environ[CUBLAS_WORKSPACE_ENV] == ":16:8"
    assert os.environ[CUBLAS_WORKSPACE_ENV] == ":16:8" and _flags() == before
    monkeypatch.setenv(CUBLAS_WORKSPACE_ENV, "")  # set but empty: cuBLAS would not be deterministic
    with deterministic_mode(True):
        assert os.environ[CUBLAS_WORKSPACE_ENV] == ":4096:8"
    assert os.environ[CUBLAS_WORKSPACE_ENV] == ""


def test_disabled_it_changes_nothing(nondefault_flags, monkeypatch):
    monkeypatch.delenv(CUBLAS_WORKSPACE_ENV, raising=False)
    with deterministic_mode(False):
        assert _flags() == nondefault_flags and CUBLAS_WORKSPACE_ENV not in os.environ
    assert _flags() == nondefault_flags


def test_nested_contexts_restore_the_outer_one():
    before = _flags()
    with deterministic_mode(True):
        inside = _flags()
        with deterministic_mode(True):
            _assert_deterministic()
        assert _flags() == inside
    assert _flags() == before


# -- TrainConfig --------------------------------------------------------------------------
def test_train_config_round_trips_through_its_json_record():
    config = TrainConfig(deterministic=True)
    record = json.loads(json.dumps(config.to_dict()))
    assert record["deterministic"] is True
    assert TrainConfig(**record) == config and TrainConfig().deterministic is False


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_a_non_bool_value_is_refused_naming_the_field(value):
    with pytest.raises(ValueError, match=rf"deterministic must be True or False, got {value!r}"):
        TrainConfig(deterministic=value)


# -- the command line ---------------------------------------------------------------------
def _settings(*argv):
    return R.resolve_settings(cifar10.parser(), list(argv), recipe="cifar10", default_model="conv6")


def test_the_flag_parses_and_reaches_the_train_config(tmp_path):
    assert _settings()["deterministic"] is False
    s = _settings("--deterministic")
    assert s["deterministic"] is True
    assert R.train_config(s, str(tmp_path)).deterministic is True
    assert "--deterministic" in cifar10.parser().format_help()


def test_a_presets_bad_value_fails_before_any_data_is_read(tmp_path):
    preset = tmp_path / "mine.yaml"
    preset.write_text("deterministic: 'on'\n")
    with pytest.raises(R.RecipeError, match=r"--deterministic must be True or False, got 'on'"):
        cifar10.main(["--preset", str(preset), "--data", str(tmp_path / "missing")])
    preset.write_text("deterministic: true\n")
    assert _settings("--preset", str(preset))["deterministic"] is True


# -- a training run ----------------------------------------------------------------------
TRAIN, VAL, TEST = four_class_images(48, 0), four_class_images(16, 1), four_class_images(16, 2)


def _model():
    model = timm_fslt.create_model("conv6", width=0.0625, num_classes=4)
    return timm_fslt.freeze(model, 0.3, 0.2, seed=3)


def _config(out, **kw):
    base = dict(output_dir=str(out), epochs=2, batch_size=16, lr=0.2, limit_train_batches=2, progress=False,
                save_ticket=False, num_workers=0)
    return TrainConfig(**{**base, **kw})


class _RecordsFlags(ClassificationTask):
    """Notes, at every training batch, whether the deterministic settings are in effect."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def loss(self, model, batch):
        self.seen.append((torch.are_deterministic_algorithms_enabled(), torch.backends.cuda.matmul.allow_tf32,
                          torch.backends.cudnn.benchmark))
        return super().loss(model, batch)


def test_on_the_cpu_a_deterministic_run_equals_the_default_one_and_restores_the_flags(tmp_path, monkeypatch):
    import accelerate
    import timm_fslt.training.loop as loop

    class DynamoLikeAccelerator(accelerate.Accelerator):  # Accelerate turns TF32 on for a dynamo backend
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            torch.backends.cuda.matmul.allow_tf32 = True

    plain_model, det_model = _model(), _model()
    plain = train(plain_model, TRAIN, VAL, TEST, _config(tmp_path / "plain"))
    before = _flags()
    monkeypatch.setattr(loop, "Accelerator", DynamoLikeAccelerator)
    task = _RecordsFlags()
    det = train(det_model, TRAIN, VAL, TEST, _config(tmp_path / "det", deterministic=True), task=task)
    assert task.seen and all(s == (True, False, False) for s in task.seen), task.seen
    assert _flags() == before  # also what the patched Accelerator changed inside the mode
    assert det["history"] == plain["history"] and det["accuracy"] == plain["accuracy"]
    assert det["mask_digests"] == plain["mask_digests"]
    for name, s in layer_scores(plain_model).items():
        assert torch.equal(layer_scores(det_model)[name], s), name
    # Recorded: results.json's config and the checkpoint's identity.
    on_disk = json.loads((tmp_path / "det" / "results.json").read_text())
    assert on_disk["config"]["deterministic"] is True
    record = json.loads((tmp_path / "det" / "checkpoints" / "epoch_0002" / "run_config.json").read_text())
    assert record["identity"]["train"]["deterministic"] is True


def test_the_flags_are_restored_when_train_raises(tmp_path):
    before = _flags()
    with pytest.raises(KeyboardInterrupt):
        train(_model(), TRAIN, VAL, TEST, _config(tmp_path / "k", deterministic=True), task=helpers.killed_at(2))
    assert _flags() == before


def test_resume_needs_the_same_setting_and_old_checkpoints_resume_as_not_deterministic(tmp_path):
    full = train(_model(), TRAIN, VAL, TEST, _config(tmp_path / "full", deterministic=True))
    train(_model(), TRAIN, VAL, TEST, _config(tmp_path / "r", deterministic=True, stop_after=1))
    with pytest.raises(RunConfigError, match=r"train\.deterministic: True \(checkpoint\) != False \(now\)"):
        train(_model(), TRAIN, VAL, TEST, _config(tmp_path / "r", resume=True))
    rest = train(_model(), TRAIN, VAL, TEST, _config(tmp_path / "r", deterministic=True, resume=True))
    assert rest["history"] == full["history"] and rest["mask_digests"] == full["mask_digests"]

    # A checkpoint written before the option existed records no "deterministic": it ran without.
    train(_model(), TRAIN, VAL, TEST, _config(tmp_path / "old", stop_after=1))
    ckpt = tmp_path / "old" / "checkpoints" / "epoch_0001"
    record = json.loads((ckpt / "run_config.json").read_text())
    del record["identity"]["train"]["deterministic"]
    (ckpt / "run_config.json").write_text(json.dumps(record))  # run_config.json itself is not in 'files'
    with pytest.raises(RunConfigError, match=r"train\.deterministic: False \(checkpoint\) != True \(now\)"):
        train(_model(), TRAIN, VAL, TEST, _config(tmp_path / "old", deterministic=True, resume=True))
    assert train(_model(), TRAIN, VAL, TEST, _config(tmp_path / "old", resume=True))["completed"]
