"""Mid-epoch checkpoints (checkpoint_every_steps): a run killed after one and resumed ends
bit-identical to an uninterrupted run (scores, masks, metrics); bad values are named and
nothing is written.  Tiny conv6 on CPU, in-memory data."""
import importlib
import json
import os
import sys

import pytest
import torch
from torch.utils.data import TensorDataset

import helpers
import timm_fslt
from fixtures_data import recipes_dir
from helpers import killed_at, layer_scores
from timm_fslt.training import TrainConfig, latest_checkpoint, list_checkpoints, train

fresh_accelerate_state = pytest.fixture(autouse=True)(helpers.one_thread_fresh_accelerate)


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    return TensorDataset(torch.randn(n, 3, 32, 32, generator=g) * 0.5 + y.view(-1, 1, 1, 1).float() * 0.3, y)


TRAIN, VAL, TEST = _data(48, 0), _data(16, 1), _data(16, 2)


def _model(num_classes=4):
    return timm_fslt.freeze(timm_fslt.create_model("conv6", width=0.0625, num_classes=num_classes), 0.3, 0.2, seed=3)


def _config(out, **kw):
    # 3 batches an epoch; a checkpoint at steps 2 and 4 inside epochs 1 and 2, and at each epoch end.
    base = dict(output_dir=str(out), epochs=2, batch_size=16, lr=0.2, progress=False, save_ticket=False,
                num_workers=0, checkpoint_every_steps=2, keep_checkpoints=10, log_every=1)
    return TrainConfig(**{**base, **kw})


def _metrics(path):
    return [{k: v for k, v in json.loads(line).items() if k != "time"}
            for line in open(path, encoding="utf-8") if json.loads(line)["event"] == "metrics"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = _model()
        results = train(model, TRAIN, VAL, TEST, _config(out))
    finally:
        torch.set_num_threads(threads)
        helpers.reset_accelerate()
    return results, layer_scores(model), out


def test_checkpoints_are_written_inside_epochs_and_ordered_by_epoch_and_step(uninterrupted):
    results, _, out = uninterrupted
    names = [os.path.basename(c.path) for c in list_checkpoints(str(out), verify=True) if c.valid]
    assert names == ["epoch_0000_step_00000002", "epoch_0001", "epoch_0001_step_00000004", "epoch_0002"]
    record = json.loads((out / "checkpoints" / "epoch_0001_step_00000004" / "run_config.json").read_text())
    assert (record["epoch"], record["global_step"], record["batches_in_epoch"]) == (1, 4, 1)
    assert results["global_steps"] == 6


@pytest.mark.parametrize("kill_at, newest", [(3, "epoch_0000_step_00000002"), (5, "epoch_0001_step_00000004")])
def test_a_run_killed_after_a_mid_epoch_checkpoint_resumes_bit_identical(uninterrupted, tmp_path, kill_at, newest):
    full, full_scores, full_out = uninterrupted
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        train(_model(), TRAIN, VAL, TEST, _config(out), task=killed_at(kill_at))
    assert os.path.basename(latest_checkpoint(str(out))) == newest
    model = _model()
    resumed = train(model, TRAIN, VAL, TEST, _config(out, resume=True))
    for key in ("history", "accuracy", "val", "test", "best_epoch", "mask_digests", "global_steps", "sparsity"):
        assert resumed[key] == full[key], key
    for name, scores in full_scores.items():
        assert torch.equal(layer_scores(model)[name], scores), name
    assert _metrics(out / "metrics.jsonl") == _metrics(full_out / "metrics.jsonl")
    # The comparison is not between two initial states: the scores moved.
    assert any(not torch.equal(s, layer_scores(_model())[n]) for n, s in full_scores.items())


@pytest.mark.parametrize("value", [0, -3, 1.5, True, "2"])
def test_bad_checkpoint_every_steps_is_named(value, tmp_path):
    with pytest.raises(ValueError, match=r"checkpoint_every_steps must be a positive int"):
        TrainConfig(output_dir=str(tmp_path / "x"), checkpoint_every_steps=value)
    assert not (tmp_path / "x").exists()


def test_the_recipe_names_checkpoint_every_steps_and_writes_nothing(tmp_path, capsys):
    sys.path.insert(0, recipes_dir())
    cifar10 = importlib.import_module("cifar10")
    R = importlib.import_module("fslt_recipe")
    out = tmp_path / "never"
    for value in ("0", "-1"):
        with pytest.raises(R.RecipeError, match=r"^--checkpoint-every-steps must be a positive int"):
            cifar10.main(["--data", str(tmp_path / "nodata"), "--checkpoint-every-steps", value,
                          "--output-dir", str(out)])
    with pytest.raises(SystemExit):
        cifar10.main(["--checkpoint-every-steps", "two", "--output-dir", str(out)])
    assert "argument --checkpoint-every-steps: invalid int value: 'two'" in capsys.readouterr().err
    assert not out.exists()


def test_augmented_images_resume_mid_epoch_exactly_even_with_another_number_of_workers(tmp_path):
    """Random crops and flips are seeded per (seed, epoch, example): the same in the main process
    and in a worker, so a mid-epoch resume with a data worker equals a run without one."""
    from fixtures_data import write_saved_image_dataset
    from timm_fslt.training.data import load_cifar10

    data = load_cifar10(str(write_saved_image_dataset(tmp_path / "cifar", n_train=40)), seed=1)
    config = dict(batch_size=8, limit_train_batches=4, checkpoint_every_steps=3)
    full_model = _model(10)
    full = train(full_model, data.train, data.val, data.test, _config(tmp_path / "full", **config))
    helpers.reset_accelerate()
    with pytest.raises(KeyboardInterrupt):  # dies in epoch 2, after its step-6 checkpoint
        train(_model(10), data.train, data.val, data.test, _config(tmp_path / "cut", **config), task=killed_at(8))
    assert os.path.basename(latest_checkpoint(str(tmp_path / "cut"))) == "epoch_0001_step_00000006"
    helpers.reset_accelerate()
    model = _model(10)
    resumed = train(model, data.train, data.val, data.test,
                    _config(tmp_path / "cut", **config, resume=True, num_workers=1))
    assert resumed["history"] == full["history"] and resumed["mask_digests"] == full["mask_digests"]
    for name, scores in layer_scores(full_model).items():
        assert torch.equal(layer_scores(model)[name], scores), name
    # The augmentation is random across epochs and examples, yet fixed for one (epoch, example).
    data.train.set_epoch(0)
    a, b = data.train[0][0], data.train[0][0]
    data.train.set_epoch(1)
    assert torch.equal(a, b) and not torch.equal(a, data.train[0][0])


def test_dropout_draws_the_same_numbers_after_a_mid_epoch_resume(tmp_path):
    """Dropout uses the global torch generator: a resumed run must not shift it (the train loader's
    own generator, reseeded per epoch, gives its workers' base seed instead of a global draw)."""
    def model():
        net = timm_fslt.create_model("conv6", width=0.0625, num_classes=4, drop_rate=0.5)
        return timm_fslt.freeze(net, 0.3, 0.2, seed=3)

    full_model = model()
    full = train(full_model, TRAIN, VAL, TEST, _config(tmp_path / "full"))
    helpers.reset_accelerate()
    with pytest.raises(KeyboardInterrupt):
        train(model(), TRAIN, VAL, TEST, _config(tmp_path / "cut"), task=killed_at(5))
    helpers.reset_accelerate()
    resumed_model = model()
    resumed = train(resumed_model, TRAIN, VAL, TEST, _config(tmp_path / "cut", resume=True))
    assert resumed["history"] == full["history"]
    for name, scores in layer_scores(full_model).items():
        assert torch.equal(layer_scores(resumed_model)[name], scores), name


def test_a_mid_epoch_resume_with_gradient_accumulation(tmp_path):
    """With 2 accumulation steps a mid-epoch checkpoint follows an optimizer step; the resumed run
    continues Accelerate's accumulation counter from it and ends the same."""
    config = dict(grad_accum_steps=2)  # 6 batches an epoch, 3 optimizer steps; checkpoints at steps 2, 4
    full_model = _model()
    full = train(full_model, TRAIN, VAL, TEST, _config(tmp_path / "full", **config))
    helpers.reset_accelerate()
    with pytest.raises(KeyboardInterrupt):  # batch 3 of epoch 2, after the step-4 checkpoint
        train(_model(), TRAIN, VAL, TEST, _config(tmp_path / "cut", **config), task=killed_at(9))
    assert os.path.basename(latest_checkpoint(str(tmp_path / "cut"))) == "epoch_0001_step_00000004"
    helpers.reset_accelerate()
    model = _model()
    resumed = train(model, TRAIN, VAL, TEST, _config(tmp_path / "cut", **config, resume=True))
    assert resumed["history"] == full["history"] and resumed["global_steps"] == full["global_steps"] == 6
    for name, scores in layer_scores(full_model).items():
        assert torch.equal(layer_scores(model)[name], scores), name
