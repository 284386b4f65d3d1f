"""Resume never loses a run: stale pointers, damaged checkpoints, cleanup, bad ``resume`` values.

The tiny Conv6 and in-memory data of tests/test_train_loop.py: each run takes well under a second.
A module fixture trains 2 of 3 epochs once (checkpoints epoch_0001 and epoch_0002); each test
works on its own copy.
"""
import json
import os
import re
import shutil

import pytest
import torch

from test_train_loop import TEST, TRAIN, VAL, _config, _model
import helpers
from helpers import read_jsonl
from timm_fslt.training import (CheckpointError, TrainConfig, inspect_checkpoint, latest_checkpoint, list_checkpoints,
                                train)


_reset_accelerate = helpers.reset_accelerate
one_thread_fresh_state = pytest.fixture(autouse=True)(helpers.one_thread_fresh_accelerate)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted 3-epoch run and one stopped after epoch 2 (keep_checkpoints=2)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("resume_safety")
    full = train(_model(), TRAIN, VAL, TEST, _config(root / "full"))
    _reset_accelerate()
    part = train(_model(), TRAIN, VAL, TEST, _config(root / "part", stop_after=2, keep_checkpoints=2))
    _reset_accelerate()
    torch.set_num_threads(threads)
    assert part["completed"] is False
    return {"full": full, "part": root / "part"}


@pytest.fixture
def run(runs, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(runs["part"], out)
    return out


def _ckpt(out, epoch):
    return out / "checkpoints" / f"epoch_{epoch:04d}"


def _epoch_dirs(out):
    return sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("epoch_"))


def _logged_epochs(out):
    return [r["epoch"] for r in read_jsonl(str(out / "metrics.jsonl")) if r["event"] == "metrics" and "epoch" in r]


def _resume(out, resume, **kw):
    return train(_model(), TRAIN, VAL, TEST, _config(out, resume=resume, keep_checkpoints=2, **kw))


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# -- what a checkpoint records ------------------------------------------------------------
def test_a_checkpoint_records_its_epoch_step_and_every_files_size_and_sha256(run):
    import hashlib

    record = json.loads((_ckpt(run, 2) / "run_config.json").read_text())
    assert record["epoch"] == 2 and record["global_step"] == 4 and record["format"] == 2  # 2 batches/epoch
    on_disk = sorted(p.name for p in _ckpt(run, 2).iterdir() if p.name != "run_config.json")
    assert sorted(record["files"]) == on_disk
    assert {"model.safetensors", "optimizer.bin", "custom_checkpoint_0.pkl", "random_states_0.pkl"} <= set(on_disk)
    for name, entry in record["files"].items():
        data = (_ckpt(run, 2) / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name
    info = inspect_checkpoint(str(_ckpt(run, 2)))
    assert info.valid and info.verified and (info.epoch, info.global_step) == (2, 4)
    assert (run / "checkpoints" / "latest").read_text() == "epoch_0002\n"


# -- the `latest` pointer is a hint --------------------------------------------------------
@pytest.mark.parametrize("pointer,note", [
    ("epoch_0009\n", "names 'epoch_0009'"),  # stale: names a deleted folder
    ("", "is empty"),
    (None, "is missing"),
])
@pytest.mark.parametrize("mode", ["auto", True])
def test_a_stale_empty_or_missing_pointer_changes_nothing(runs, run, pointer, note, mode, capsys):
    latest = run / "checkpoints" / "latest"
    if pointer is None:
        latest.unlink()
    else:
        latest.write_text(pointer)
    assert latest_checkpoint(str(run)) == str(_ckpt(run, 2))  # an empty pointer is not the checkpoints root
    res = _resume(run, mode)
    assert f"checkpoints/latest {note}" in capsys.readouterr().out
    assert res["history"] == runs["full"]["history"]  # continued from epoch 2, bit for bit
    assert _logged_epochs(run) == [1, 2, 3]  # no restart at epoch 1
    assert _epoch_dirs(run) == ["epoch_0002", "epoch_0003"] and latest.read_text() == "epoch_0003\n"


def test_a_fresh_run_refuses_checkpoints_even_without_a_pointer(run):
    (run / "checkpoints" / "latest").unlink()
    with pytest.raises(FileExistsError, match=r"already holds a run .*epoch_0002"):
        _resume(run, False)
    assert _epoch_dirs(run) == ["epoch_0001", "epoch_0002"]


def test_auto_without_checkpoints_starts_fresh_but_never_over_a_finished_run(runs, tmp_path):
    res = _resume(tmp_path / "new", "auto")  # nothing there: a fresh run, as before
    assert res["history"] == runs["full"]["history"]
    _reset_accelerate()
    shutil.rmtree(tmp_path / "new" / "checkpoints")
    with pytest.raises(FileExistsError, match=r"already holds a run .*results\.json"):
        _resume(tmp_path / "new", "auto")


# -- cleanup ------------------------------------------------------------------------------
def test_resuming_an_older_checkpoint_while_a_newer_exists_keeps_the_right_ones(tmp_path):
    out = tmp_path / "r"
    part = train(_model(), TRAIN, VAL, TEST, _config(out, epochs=4, stop_after=3, keep_checkpoints=3))
    _reset_accelerate()
    assert _epoch_dirs(out) == ["epoch_0001", "epoch_0002", "epoch_0003"]
    # Back to epoch 1, one epoch, keep 1: the new epoch_0002 must survive (name order deleted it),
    # epoch_0003 is newer and epoch_0001 the source while the run is behind it: both stay.
    train(_model(), TRAIN, VAL, TEST, _config(out, epochs=4, stop_after=1, keep_checkpoints=1,
                                             resume=str(_ckpt(out, 1))))
    _reset_accelerate()
    assert _epoch_dirs(out) == ["epoch_0001", "epoch_0002", "epoch_0003"]
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert latest == "epoch_0002" and inspect_checkpoint(str(out / "checkpoints" / latest)).valid
    # The newest by recorded step is epoch_0003, whatever the pointer says; once the run has
    # passed every other checkpoint, keep=1 leaves only the one just written.  Going back to
    # epoch 1 dropped epoch 3's metric records; jumping forward over them says so.
    with pytest.warns(UserWarning, match=r"metrics\.jsonl has no records after step 4 but the checkpoint is "
                                         r"at step 6"):
        rest = train(_model(), TRAIN, VAL, TEST, _config(out, epochs=4, keep_checkpoints=1, resume="auto"))
    assert rest["completed"] and rest["history"][:3] == part["history"]
    assert _epoch_dirs(out) == ["epoch_0004"]
    assert (out / "checkpoints" / "latest").read_text() == "epoch_0004\n"
    assert _logged_epochs(out) == [1, 2, 4]  # monotonic; results.json has all four epochs
    assert [h["epoch"] for h in rest["history"]] == [1, 2, 3, 4]


# -- damaged checkpoints --------------------------------------------------------------------
def _damage_model_bytes(path):
    data = bytearray(path.read_bytes())
    data[-8:] = bytes(8)  # same size, different tensor bytes
    path.write_bytes(bytes(data))


def _list_outside_file(path):
    record = json.loads(path.read_text())
    record["files"]["../../metrics.jsonl"] = {"bytes": 1, "sha256": "0" * 64}
    path.write_text(json.dumps(record))


DAMAGE = [
    ("model.safetensors", _truncate, r"model\.safetensors has \d+ bytes, run_config\.json records \d+"),
    ("model.safetensors", _damage_model_bytes, r"model\.safetensors has sha256 \w+\.\.\., run_config\.json records"),
    ("optimizer.bin", _truncate, r"optimizer\.bin has \d+ bytes, run_config\.json records \d+"),
    ("custom_checkpoint_0.pkl", _truncate, r"custom_checkpoint_0\.pkl has \d+ bytes, run_config\.json records"),
    ("random_states_0.pkl", lambda p: p.unlink(), r"random_states_0\.pkl is missing \(run_config\.json records"),
    ("run_config.json", lambda p: p.write_text(""), r"run_config\.json is empty"),
    ("run_config.json", lambda p: p.write_text('{"epoch": 2, "iden'), r"run_config\.json cannot be read \(JSONDecodeError"),
    ("run_config.json", lambda p: p.write_text('{"epoch": 2}'), r"run_config\.json has no 'identity'"),
    ("run_config.json", _list_outside_file, r"run_config\.json lists a file outside the checkpoint: '\.\./\.\./"),
]


@pytest.mark.parametrize("name,damage,reason", DAMAGE, ids=[f"{n}-{d.__name__}" for n, d, _ in DAMAGE])
def test_a_damaged_newest_checkpoint_is_named_and_fallback_continues_from_the_previous(
        runs, run, name, damage, reason):
    damage(_ckpt(run, 2) / name)
    metrics_before = (run / "metrics.jsonl").read_bytes()
    where = re.escape(repr(str(_ckpt(run, 2))))
    for mode in (True, "auto"):
        with pytest.raises(CheckpointError, match=rf"checkpoint {where} is invalid: {reason}.*"
                                                  r"resume='fallback' \(--resume fallback\)"):
            _resume(run, mode)
        _reset_accelerate()
    with pytest.raises(CheckpointError, match=rf"checkpoint {where} is invalid: {reason}"):
        _resume(run, str(_ckpt(run, 2)))  # an explicit folder: no fallback, just the reason
    _reset_accelerate()
    assert (run / "metrics.jsonl").read_bytes() == metrics_before  # refused before touching anything
    assert latest_checkpoint(str(run)) == str(_ckpt(run, 1))

    with pytest.warns(UserWarning, match=rf"skipped checkpoint {where} \({reason}.*older .*epoch_0001"):
        res = _resume(run, "fallback")
    assert res["history"] == runs["full"]["history"]
    assert _logged_epochs(run) == [1, 2, 3]  # epoch 2's old record rewound, recomputed once
    # The damaged epoch_0002 was replaced by a good one; keep=2 keeps the two newest.
    assert _epoch_dirs(run) == ["epoch_0002", "epoch_0003"]
    assert all(c.valid for c in list_checkpoints(str(run), verify=True))


def test_auto_with_every_checkpoint_damaged_is_an_error_naming_each(run):
    _truncate(_ckpt(run, 2) / "optimizer.bin")
    (_ckpt(run, 1) / "run_config.json").write_text("")
    for mode in ("auto", "fallback", True):
        with pytest.raises(CheckpointError) as err:
            _resume(run, mode)
        _reset_accelerate()
        message = str(err.value)
        assert "no valid checkpoint in" in message and "overwrite" in message
        assert f"{str(_ckpt(run, 2))!r} is invalid: optimizer.bin has" in message
        assert f"{str(_ckpt(run, 1))!r} is invalid: run_config.json is empty" in message
    assert _epoch_dirs(run) == ["epoch_0001", "epoch_0002"]  # nothing deleted, nothing restarted
    assert _logged_epochs(run) == [1, 2]


def test_a_damaged_older_checkpoint_only_matters_when_it_is_needed(runs, run):
    _truncate(_ckpt(run, 1) / "model.safetensors")
    res = _resume(run, True)  # the newest is fine: resume from it; the damaged one is cleaned up
    assert res["history"] == runs["full"]["history"]
    assert _epoch_dirs(run) == ["epoch_0002", "epoch_0003"]


def _as_format1(folder):
    """What the loop wrote before sizes and checksums were recorded: identity and epoch only."""
    record = json.loads((folder / "run_config.json").read_text())
    (folder / "run_config.json").write_text(json.dumps({"identity": record["identity"], "epoch": record["epoch"]}))


def test_checkpoints_written_before_checksums_still_resume_and_are_checked_lightly(runs, run):
    _as_format1(_ckpt(run, 1))
    _as_format1(_ckpt(run, 2))
    info = inspect_checkpoint(str(_ckpt(run, 2)))
    assert info.valid and (info.epoch, info.global_step) == (2, None)
    _truncate(_ckpt(run, 2) / "model.safetensors")
    problem = inspect_checkpoint(str(_ckpt(run, 2))).problem
    assert problem.startswith("model.safetensors cannot be read (") and "format-1" in problem
    with pytest.warns(UserWarning, match=r"skipped checkpoint .*epoch_0002.*model\.safetensors cannot be read"):
        res = _resume(run, "fallback")
    assert res["history"] == runs["full"]["history"]
    assert json.loads((_ckpt(run, 3) / "run_config.json").read_text())["format"] == 2


# -- bad `resume` values --------------------------------------------------------------------
@pytest.mark.parametrize("value,message", [
    (1, r"resume must be False, True, 'auto', 'fallback' or a checkpoint folder path, got 1$"),
    (None, r"resume must be .* got None"),
    ("", r"resume must be .* got an empty string"),
    ("  ", r"resume must be .* got an empty string"),
    ("Fallback", r"got 'Fallback' \(not a mode, and no such folder\)"),
    ("latest", r"got 'latest' \(not a mode, and no such folder\)"),
])
def test_bad_resume_values_are_named(value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(resume=value)


def test_a_resume_path_that_is_no_checkpoint_lists_the_accepted_values(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'.*fallbak' is not a checkpoint folder \(no run_config\.json\); "
                                                r"resume takes False, True, 'auto', 'fallback'"):
        train(_model(), TRAIN, VAL, TEST, _config(tmp_path / "r", resume=str(tmp_path / "fallbak")))
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_fallback_without_any_checkpoint_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume"):
        _resume(tmp_path / "empty", "fallback")
