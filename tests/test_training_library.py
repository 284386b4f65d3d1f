"""Library features in place of hand-written ones: timm's schedulers (exact resume kept),
accelerate's filter_trackers and save_model.  Tiny conv6 on CPU."""
import math

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import TensorDataset

import helpers
import timm
import timm_fslt
from timm_fslt.training import RunConfigError, TrainConfig, train

fresh_accelerate_state = pytest.fixture(autouse=True)(helpers.one_thread_fresh_accelerate)


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    return TensorDataset(torch.randn(n, 3, 32, 32, generator=g) * 0.5 + y.view(-1, 1, 1, 1).float() * 0.3, y)


TRAIN, VAL = _data(32, 0), _data(16, 1)


def _model():
    return timm_fslt.freeze(timm_fslt.create_model("conv6", width=0.0625, num_classes=4), 0.3, 0.2, seed=3)


def _config(out, **kw):
    base = dict(output_dir=str(out), epochs=5, batch_size=16, lr=0.3, limit_train_batches=1, progress=False,
                save_ticket=False, num_workers=0)
    return TrainConfig(**{**base, **kw})


def test_cosine_with_warmup_is_timms_schedule_and_resumes_exactly(tmp_path):
    full = train(_model(), TRAIN, VAL, None, _config(tmp_path / "a", warmup_epochs=2))
    lrs = [h["lr"] for h in full["history"]]
    expected = [0.1, 0.2, 0.3, 0.15 * (1 + math.cos(math.pi / 3)), 0.15 * (1 + math.cos(2 * math.pi / 3))]
    assert lrs == pytest.approx(expected, rel=1e-12)
    helpers.reset_accelerate()
    part = train(_model(), TRAIN, VAL, None, _config(tmp_path / "b", warmup_epochs=2, stop_after=3))
    assert part["completed"] is False
    helpers.reset_accelerate()
    rest = train(_model(), TRAIN, VAL, None, _config(tmp_path / "b", warmup_epochs=2, resume=True))
    assert rest["history"] == full["history"]


def test_cosine_without_warmup_and_constant(tmp_path):
    cosine = train(_model(), TRAIN, VAL, None, _config(tmp_path / "c", epochs=4))
    assert [h["lr"] for h in cosine["history"]] == pytest.approx(
        [0.15 * (1 + math.cos(math.pi * e / 4)) for e in range(4)], rel=1e-12)
    helpers.reset_accelerate()
    constant = train(_model(), TRAIN, VAL, None, _config(tmp_path / "k", epochs=3, scheduler="constant"))
    assert [h["lr"] for h in constant["history"]] == [0.3, 0.3, 0.3]


def test_an_uninstalled_tracker_is_refused_by_name(tmp_path):
    from accelerate.tracking import get_available_trackers

    missing = next((t for t in ("wandb", "comet_ml", "aim", "mlflow") if t not in
                    {str(getattr(a, "value", a)) for a in get_available_trackers()}), None)
    if missing is None:
        pytest.skip("every tracker is installed here")
    with pytest.raises(RunConfigError, match=f"log_with: tracker '{missing}' is not installed"):
        train(_model(), TRAIN, VAL, None, _config(tmp_path / "r", log_with=[missing]))
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_weight_training_saves_through_accelerator_save_model_atomically(tmp_path):
    model = timm.create_model("conv6", width=0.0625, num_classes=4)
    res = train(model, TRAIN, VAL, None, _config(tmp_path / "w", epochs=1))
    assert res["model_file"] == str(tmp_path / "w" / "model.safetensors")
    stored = load_file(res["model_file"])
    assert stored.keys() == model.state_dict().keys()
    assert all(torch.equal(stored[k], v) for k, v in model.state_dict().items())
    assert not (tmp_path / "w" / ".tmp-model").exists()
