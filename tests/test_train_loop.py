"""The shared training loop (timm_fslt.training): resume, checkpoints, selection, trackers, errors.

Small in-memory data and a Conv6 at 1/16 width, so each run takes a second or two.
"""
import json
import os

import pytest
import torch
from torch.utils.data import TensorDataset

import timm
import timm_fslt
import helpers
from helpers import four_class_images, killed_at, layer_scores, read_jsonl
from timm_fslt.training import (ClassificationTask, RunConfigError, TrainConfig, build_optimizer, check_masks_in_sync,
                                latest_checkpoint, mask_digest, train)


fresh_accelerate_state = pytest.fixture(autouse=True)(helpers.one_thread_fresh_accelerate)


TRAIN, VAL, TEST = four_class_images(48, 0), four_class_images(16, 1), four_class_images(16, 2)


def _model(prune=0.3, lock=0.2, sparsity=None, seed=3):
    # timm_fslt.create_model records the architecture, so the run can save a ticket.
    model = timm_fslt.create_model("conv6", width=0.0625, num_classes=4)
    return timm_fslt.freeze(model, prune, lock, sparsity=sparsity, seed=seed)


def _config(out, **kw):
    base = dict(output_dir=str(out), epochs=3, batch_size=16, lr=0.2, limit_train_batches=2, progress=False,
                save_ticket=False, num_workers=0)
    return TrainConfig(**{**base, **kw})


def test_resume_after_a_kill_mid_epoch_reproduces_the_uninterrupted_run_bit_for_bit(tmp_path):
    full_model = _model()
    full = train(full_model, TRAIN, VAL, TEST, _config(tmp_path / "full"))

    with pytest.raises(KeyboardInterrupt):  # dies in epoch 2, after the epoch-1 checkpoint
        train(_model(), TRAIN, VAL, TEST, _config(tmp_path / "killed"), task=killed_at(3))
    ckpt = latest_checkpoint(str(tmp_path / "killed"))
    assert ckpt is not None and ckpt.endswith("epoch_0001")
    assert not any(d.startswith(".tmp") for d in os.listdir(os.path.dirname(ckpt)))

    resumed_model = _model()
    resumed = train(resumed_model, TRAIN, VAL, TEST, _config(tmp_path / "killed", resume=True))
    assert resumed["history"] == full["history"]  # losses, accuracies, lr: identical floats
    assert resumed["accuracy"] == full["accuracy"] and resumed["test"] == full["test"]
    assert resumed["best_epoch"] == full["best_epoch"]
    assert resumed["mask_digests"] == full["mask_digests"]
    for name, s in layer_scores(full_model).items():
        assert torch.equal(layer_scores(resumed_model)[name], s), name
    # The scores really moved, so the comparison above is not between two initial states.
    assert any(not torch.equal(s, layer_scores(_model())[n]) for n, s in layer_scores(full_model).items())


def test_stop_after_then_resume_equals_one_run_and_writes_results_only_at_the_end(tmp_path):
    full = train(_model(), TRAIN, VAL, TEST, _config(tmp_path / "a", epochs=2))
    part = train(_model(), TRAIN, VAL, TEST, _config(tmp_path / "b", epochs=2, stop_after=1))
    assert part["completed"] is False and part["stopped_after_epoch"] == 1
    assert not (tmp_path / "b" / "results.json").exists()
    rest = train(_model(), TRAIN, VAL, TEST, _config(tmp_path / "b", epochs=2, resume="auto"))
    assert rest["history"] == full["history"] and rest["accuracy"] == full["accuracy"]
    on_disk = json.loads((tmp_path / "b" / "results.json").read_text())
    assert on_disk["accuracy"] == full["accuracy"] and on_disk["completed"] is True


def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one_usable(tmp_path, monkeypatch):
    from accelerate import Accelerator

    real_save = Accelerator.save_state
    calls = {"n": 0}

    def dying_save(self, output_dir=None, **kw):
        calls["n"] += 1
        if calls["n"] == 2:  # epoch 2: half a checkpoint, then the process dies
            os.makedirs(output_dir, exist_ok=True)
            with open(os.path.join(output_dir, "model.safetensors"), "wb") as f:
                f.write(b"partial")
            raise KeyboardInterrupt("killed while saving")
        return real_save(self, output_dir, **kw)

    monkeypatch.setattr(Accelerator, "save_state", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train(_model(), TRAIN, VAL, TEST, _config(tmp_path / "run", epochs=2))
    monkeypatch.setattr(Accelerator, "save_state", real_save)
    assert latest_checkpoint(str(tmp_path / "run")).endswith("epoch_0001")
    resumed = train(_model(), TRAIN, VAL, TEST, _config(tmp_path / "run", epochs=2, resume=True))
    full = train(_model(), TRAIN, VAL, TEST, _config(tmp_path / "ref", epochs=2))
    assert resumed["history"] == full["history"]
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["epoch_0002", "latest"]


def test_best_val_epoch_is_the_one_tested_and_saved(tmp_path):
    res = train(_model(), TRAIN, VAL, TEST, _config(tmp_path / "r", epochs=3, save_ticket=True))
    accs = [h["val_acc"] for h in res["history"]]
    assert res["best_epoch"] == accs.index(max(accs)) + 1
    assert res["accuracy"]["val"] == max(accs)
    ticket = timm_fslt.load_ticket(res["ticket_dir"])
    x, y = TEST.tensors
    with torch.no_grad():
        logits = ticket(x)
    # The saved ticket is the best-val model: it reproduces the reported test metrics.
    assert (logits.argmax(-1) == y).float().mean().item() == pytest.approx(res["accuracy"]["test"], abs=1e-9)
    loss = torch.nn.functional.cross_entropy(logits.double(), y).item()
    assert loss == pytest.approx(res["test"]["loss"], rel=1e-5)


def test_results_hold_accuracy_sparsity_size_report_and_wall_time(tmp_path):
    res = train(_model(0.3, 0.2, 0.6), TRAIN, VAL, TEST, _config(tmp_path / "r", epochs=1))
    on_disk = json.loads((tmp_path / "r" / "results.json").read_text())
    assert set(on_disk["accuracy"]) == {"val", "test"}
    assert on_disk["sparsity"] == pytest.approx(0.6, abs=1e-3)
    totals = on_disk["size_report"]["totals"]
    assert totals["mask_bits"] == totals["free"] and totals["ticket_bits"] >= totals["mask_bits"]
    assert on_disk["wall_time_s"] > 0 and res["wall_time_s"] == on_disk["wall_time_s"]


def test_jsonl_tracker_records_config_and_each_epoch(tmp_path):
    train(_model(), TRAIN, VAL, TEST, _config(tmp_path / "r", epochs=2, log_every=1))
    records = read_jsonl(str(tmp_path / "r" / "metrics.jsonl"))
    assert records[0]["event"] == "config" and records[0]["config"]["identity/train/lr"] == 0.2
    epochs = [r for r in records if r["event"] == "metrics" and "epoch" in r]
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert all({"train/loss", "val/acc", "val/loss", "lr", "sparsity"} <= set(r) for r in epochs)
    steps = [r for r in records if r["event"] == "metrics" and "train/step_loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]


def test_tensorboard_tracker_writes_event_files_when_asked(tmp_path):
    train(_model(), TRAIN, VAL, TEST, _config(tmp_path / "r", epochs=1, log_with=["tensorboard"]))
    events = [f for _, _, files in os.walk(tmp_path / "r" / "logs") for f in files if "tfevents" in f]
    assert events


def test_unknown_tracker_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="log_with: unknown tracker 'nosuchtracker'"):
        train(_model(), TRAIN, VAL, TEST, _config(tmp_path / "r", log_with=["nosuchtracker"]))
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_only_parameters_that_require_grad_reach_the_optimizer():
    model = _model()
    opt = build_optimizer(model, TrainConfig())
    in_opt = {id(p) for group in opt.param_groups for p in group["params"]}
    scores = {id(layer.scores) for layer in timm_fslt.get_group(model).layers}
    assert in_opt == scores
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9
    assert opt.defaults["weight_decay"] == 1e-4
    adamw = build_optimizer(model, TrainConfig(optimizer="adamw", lr=0.01))
    assert isinstance(adamw, torch.optim.AdamW)


def test_gradient_accumulation_takes_one_optimizer_step_per_global_batch(tmp_path):
    one = _model()
    a = train(one, TRAIN, VAL, TEST, _config(tmp_path / "a", epochs=1, limit_train_batches=2))
    acc = _model()
    b = train(acc, TRAIN, VAL, TEST, _config(tmp_path / "b", epochs=1, grad_accum_steps=2,
                                             limit_train_batches=4))
    # Same 32 samples, same 2 optimizer steps: 2 batches of 16, or 4 micro-batches of 8.
    assert a["global_steps"] == b["global_steps"] == 2
    for name, s in layer_scores(one).items():
        torch.testing.assert_close(layer_scores(acc)[name], s, rtol=1e-4, atol=1e-6)


def test_bf16_mixed_precision_trains_on_cpu(tmp_path):
    res = train(_model(), TRAIN, VAL, TEST, _config(tmp_path / "r", epochs=1, mixed_precision="bf16"))
    assert res["completed"] and all(torch.isfinite(torch.tensor(h["train_loss"])) for h in res["history"])


def test_recompute_weights_trains_the_same_scores_and_may_change_on_resume(tmp_path):
    plain_model, recomputed_model = _model(), _model()
    plain = train(plain_model, TRAIN, VAL, TEST, _config(tmp_path / "a", epochs=2))
    part = train(recomputed_model, TRAIN, VAL, TEST,
                 _config(tmp_path / "b", epochs=2, stop_after=1, recompute_weights=True))
    assert part["completed"] is False
    # A memory setting, not a result-changing one: resuming without it is allowed.
    rest = train(recomputed_model, TRAIN, VAL, TEST, _config(tmp_path / "b", epochs=2, resume=True))
    assert rest["history"] == plain["history"] and rest["mask_digests"] == plain["mask_digests"]
    for name, s in layer_scores(plain_model).items():
        assert torch.equal(layer_scores(recomputed_model)[name], s), name
    # A weight-trained model has no masked weights: the option is accepted and ignored.
    dense = timm.create_model("conv6", width=0.0625, num_classes=4)
    assert train(dense, TRAIN, VAL, TEST, _config(tmp_path / "w", epochs=1, recompute_weights=True))["completed"]


def test_weight_training_saves_a_plain_model_and_reports_its_size(tmp_path):
    model = timm.create_model("conv6", width=0.0625, num_classes=4)
    res = train(model, TRAIN, VAL, TEST, _config(tmp_path / "w", epochs=1))
    assert res["method"] == "weights" and res["sparsity"] == 0.0
    assert res["size_report"]["totals"]["model_bits"] == 32 * sum(p.numel() for p in model.parameters())
    assert os.path.exists(res["model_file"]) and "ticket_dir" not in res


def test_resume_with_another_configuration_is_refused_naming_what_differs(tmp_path):
    train(_model(), TRAIN, VAL, TEST, _config(tmp_path / "r", epochs=2, stop_after=1))
    with pytest.raises(RunConfigError, match=r"different configuration: .*train\.lr: 0\.2 \(checkpoint\) != 0\.05"):
        train(_model(), TRAIN, VAL, TEST, _config(tmp_path / "r", epochs=2, lr=0.05, resume=True))
    with pytest.raises(RunConfigError, match=r"model\.freeze\.prune: 0\.3 \(checkpoint\) != 0\.4"):
        train(_model(prune=0.4), TRAIN, VAL, TEST, _config(tmp_path / "r", epochs=2, resume=True))


def test_a_fresh_run_refuses_an_output_dir_holding_another_run(tmp_path):
    train(_model(), TRAIN, VAL, TEST, _config(tmp_path / "r", epochs=1))
    with pytest.raises(FileExistsError, match="already holds a run.*--resume.*--overwrite"):
        train(_model(), TRAIN, VAL, TEST, _config(tmp_path / "r", epochs=1))
    again = train(_model(), TRAIN, VAL, TEST, _config(tmp_path / "r", epochs=1, overwrite=True))
    assert again["completed"]


def test_resume_without_a_checkpoint_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume"):
        train(_model(), TRAIN, VAL, TEST, _config(tmp_path / "empty", resume=True))


def test_global_batch_must_split_over_processes_and_accumulation(tmp_path):
    with pytest.raises(ValueError, match=r"batch_size \(10\) is the global batch .* 1 \* 4"):
        train(_model(), TRAIN, VAL, TEST, _config(tmp_path / "r", batch_size=10, grad_accum_steps=4,
                                                  limit_train_batches=4))


@pytest.mark.parametrize("field,value,message", [
    ("optimizer", "adam", "optimizer must be one of"),
    ("epochs", 0, "epochs must be a positive int"),
    ("mixed_precision", "fp8", "mixed_precision must be one of"),
    ("limit_train_batches", 3, "multiple of grad_accum_steps"),
    ("recompute_weights", "yes", "recompute_weights must be True or False, got 'yes'"),
    ("check_finite", 1, "check_finite must be True or False, got 1"),
])
def test_bad_train_config_values_are_named(field, value, message):
    kw = {field: value}
    if field == "limit_train_batches":
        kw["grad_accum_steps"] = 2
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kw)


def test_mask_digest_follows_the_masks_and_the_sync_check_gathers_one_per_process():
    from accelerate import Accelerator

    model = _model()
    before = mask_digest(model)
    assert mask_digest(_model()) == before  # regenerated from the seed: same masks
    layer = timm_fslt.get_group(model).layers[0]
    with torch.no_grad():
        layer.scores.mul_(-1).add_(torch.linspace(-3, 3, layer.scores.numel()).view_as(layer.scores))
    assert mask_digest(model) != before
    assert check_masks_in_sync(Accelerator(cpu=True), model) == [mask_digest(model)]


def test_a_nonfinite_loss_stops_the_run_naming_the_cause(tmp_path):
    x, y = TRAIN.tensors
    poisoned = TensorDataset(torch.where(torch.arange(len(x)).view(-1, 1, 1, 1) == 3, float("nan"), x), y)
    with pytest.raises(FloatingPointError, match=r"loss is nan at step \d \(epoch 1\): every trainable tensor "
                                                 r"is finite, so the inputs .*check_finite=False"):
        train(_model(), poisoned, VAL, config=_config(tmp_path / "nan"))


def test_nonfinite_scores_are_named_when_the_loss_blows_up(tmp_path):
    model = _model()
    layer = timm_fslt.get_group(model).layers[2]

    class Poison(ClassificationTask):
        def loss(self, model, batch):
            with torch.no_grad():
                layer.scores[0] = float("inf")
            return super().loss(model, batch) * float("inf")

    with pytest.raises(FloatingPointError, match=r"non-finite .*features\.5"):
        train(model, TRAIN, VAL, config=_config(tmp_path / "inf"), task=Poison())


def test_the_finite_check_can_be_turned_off(tmp_path):
    x, y = TRAIN.tensors
    poisoned = TensorDataset(torch.where(torch.arange(len(x)).view(-1, 1, 1, 1) == 3, float("nan"), x), y)
    config = _config(tmp_path / "off", check_finite=False, epochs=1)
    model = _model()
    train(model, poisoned, VAL, config=config)  # runs to the end, however meaningless
    # (the scores went NaN after the poisoned batch: the group's own check is off too)
    assert not timm_fslt.get_group(model).check_finite
    assert any(not bool(torch.isfinite(layer.scores).all()) for layer in timm_fslt.get_group(model).layers)


def test_off_the_cpu_the_loss_check_runs_on_the_running_sum_at_log_steps():
    from types import SimpleNamespace
    from timm_fslt.training.state import TrainState, check_running_loss

    class DeviceSum:  # a running loss sum held by a GPU (reading it is what the check defers)
        device = torch.device("cuda")

        def __init__(self, value):
            self.value = value

        def __float__(self):
            return self.value

        def detach(self):
            return torch.tensor(self.value)
    state, model = TrainState(), _model()
    state.global_step = 7
    on = SimpleNamespace(check_finite=True)
    check_running_loss(on, DeviceSum(12.5), model, state)  # finite: nothing
    check_running_loss(on, torch.tensor(float("nan")), model, state)  # CPU: each step was checked already
    check_running_loss(SimpleNamespace(check_finite=False), DeviceSum(float("nan")), model, state)
    with pytest.raises(FloatingPointError, match=r"running loss sum is nan by step 7: every trainable tensor"):
        check_running_loss(on, DeviceSum(float("nan")), model, state)


def _autocast_probe(model):
    """Records, for each training forward of the first frozen layer, whether it ran under CPU autocast
    and in which dtype it answered."""
    seen = []
    layer = model.get_submodule(timm_fslt.get_group(model).layers[0].layer_name)

    def hook(module, args, output):
        if module.training:
            seen.append((torch.is_autocast_enabled("cpu"), output.dtype))
    layer.register_forward_hook(hook)
    return seen


def test_the_launchers_mixed_precision_is_used_and_an_explicit_setting_overrides_it(tmp_path, monkeypatch, capsys):
    # `accelerate launch --mixed_precision bf16` (or a config file saying bf16) sets this for the script.
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    model = _model()
    seen = _autocast_probe(model)
    res = train(model, TRAIN, VAL, TEST, _config(tmp_path / "launcher", epochs=1, cpu=True))
    assert res["config"]["mixed_precision"] is None and res["mixed_precision"] == "bf16"
    assert json.loads((tmp_path / "launcher" / "results.json").read_text())["mixed_precision"] == "bf16"
    assert seen == [(True, torch.bfloat16)] * 2
    assert "overrides the launcher" not in capsys.readouterr().out
    helpers.reset_accelerate()
    model = _model()
    seen = _autocast_probe(model)
    res = train(model, TRAIN, VAL, TEST, _config(tmp_path / "flag", epochs=1, cpu=True, mixed_precision="no"))
    assert res["mixed_precision"] == "no" and seen == [(False, torch.float32)] * 2
    assert ("mixed precision: no (mixed_precision / --mixed-precision) overrides the launcher's bf16 "
            "(ACCELERATE_MIXED_PRECISION)") in capsys.readouterr().out


def test_resume_compares_the_precision_in_effect_not_the_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    train(_model(), TRAIN, VAL, TEST, _config(tmp_path / "r", stop_after=1))
    stored = json.loads(open(os.path.join(latest_checkpoint(str(tmp_path / "r")), "run_config.json")).read())
    assert stored["identity"]["train"]["mixed_precision"] == "bf16"
    helpers.reset_accelerate()
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    with pytest.raises(RunConfigError, match=r"train\.mixed_precision: 'bf16' \(checkpoint\) != 'no' \(now\)"):
        train(_model(), TRAIN, VAL, TEST, _config(tmp_path / "r", resume=True))
    helpers.reset_accelerate()
    # the same precision given explicitly instead of by the launcher is the same run
    res = train(_model(), TRAIN, VAL, TEST, _config(tmp_path / "r", resume=True, mixed_precision="bf16"))
    assert res["completed"] and res["mixed_precision"] == "bf16"


def test_a_bad_launcher_precision_is_named_with_its_source(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf17")
    with pytest.raises(RunConfigError, match=r"ACCELERATE_MIXED_PRECISION='bf17' \(accelerate launch "
                                             r"--mixed_precision or its config file's mixed_precision\) must be one of"):
        train(_model(), TRAIN, VAL, TEST, _config(tmp_path / "r", epochs=1))
