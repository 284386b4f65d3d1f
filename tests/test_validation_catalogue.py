"""Every public entry point refuses wrong input with a specific message (README: Troubleshooting).

Each row: the call, the kind of mistake, the exception and the message it must carry.
``freeze``'s own catalogue is tests/test_freeze_bad_input.py; the recipes' options are in
tests/test_recipes.py. The last test keeps the README's troubleshooting table in step
with this catalogue.
"""
import json
import os
import re
import tempfile
from pathlib import Path

import pytest
import torch

import timm_fslt
from timm_fslt.apps.demo_out import DEMO_FORMAT, RESULTS_FILE, TICKET_DIR, prepare_out
from timm_fslt.errors import TicketError
from timm_fslt.training import RunConfigError, TrainConfig
from timm_fslt.training.config import resolve_mixed_precision


@pytest.fixture(scope="module")
def models():
    plain = timm_fslt.create_model("conv6", width=0.125)
    frozen = timm_fslt.freeze(timm_fslt.create_model("conv6", width=0.125), prune=0.2, lock=0.2)
    return plain, frozen


@pytest.fixture
def junk_dir(tmp_path):
    (tmp_path / "notes.txt").write_text("not a ticket")
    return tmp_path


def _forward_with_scores_that_do_not_fit():
    model = timm_fslt.freeze(timm_fslt.create_model("conv6", width=0.125), prune=0.2, lock=0.2)
    layer = timm_fslt.get_group(model).layers[0]
    layer._parameters["scores"] = torch.nn.Parameter(torch.zeros(layer.numel))  # weight-sized, not free-sized
    timm_fslt.refresh_masks(model)


# (id, call(plain, frozen, junk_dir), exception, message regex, README phrase)
CATALOGUE = [
    ("size_report/not-frozen", lambda p, f, d: timm_fslt.size_report(p), ValueError,
     r"model is not frozen: call timm_fslt.freeze", "model is not frozen"),
    ("recompute_masked_weights/not-frozen", lambda p, f, d: timm_fslt.recompute_masked_weights(p), ValueError,
     r"model is not frozen", "model is not frozen"),
    ("materialize/not-frozen", lambda p, f, d: timm_fslt.materialize(p), ValueError,
     r"model is not frozen", "model is not frozen"),
    ("save_ticket/not-frozen", lambda p, f, d: timm_fslt.save_ticket(p, d / "t"), TicketError,
     r"model is not frozen", "model is not frozen"),
    ("save_ticket/non-empty-dir", lambda p, f, d: timm_fslt.save_ticket(f, d), TicketError,
     r"is not empty and does not hold a ticket .*pass overwrite=True", "is not empty and does not hold a ticket"),
    ("save_ticket/overwrite-type", lambda p, f, d: timm_fslt.save_ticket(f, d / "t", overwrite="yes"),
     TicketError, r"overwrite must be True or False, got 'yes'", "overwrite must be True or False"),
    ("save_ticket/metrics-nan", lambda p, f, d: timm_fslt.save_ticket(f, d / "t", metrics={"acc": float("nan")}),
     TicketError, r"metrics\['acc'\] must be a finite number", "must be a finite number"),
    ("save_ticket/architecture-type", lambda p, f, d: timm_fslt.save_ticket(f, d / "t", architecture="conv6"),
     TicketError, r"architecture= must be a dict|architecture must be a dict", "must be a dict"),
    ("load_ticket/missing", lambda p, f, d: timm_fslt.load_ticket(d / "nope"), TicketError,
     r"no ticket directory at .*nope', and it is not a Hub repo id", "no ticket directory at"),
    ("load_ticket/not-a-ticket", lambda p, f, d: timm_fslt.load_ticket(d), TicketError,
     r"is not a ticket: it has no config.json", "is not a ticket: it has no config.json"),
    ("load_ticket/a-file", lambda p, f, d: timm_fslt.load_ticket(d / "notes.txt"), TicketError,
     r"is a file; a ticket is a directory", "is a file; a ticket is a directory"),
    ("load_ticket/max-params", lambda p, f, d: timm_fslt.load_ticket(d, max_params=0), TicketError,
     r"max_params must be a positive int, got 0", "max_params must be a positive int"),
    ("load_ticket/offline-repo", lambda p, f, d: timm_fslt.load_ticket("nobody/nothing"), TicketError,
     r"could not be fetched \(nor found in the local Hub cache\)", "could not be fetched"),
    ("push_to_hub/repo-id", lambda p, f, d: timm_fslt.push_to_hub(f, "not a repo id"), TicketError,
     r"repo_id must be a Hub repo id 'user/name', got 'not a repo id'", "repo_id must be a Hub repo id"),
    ("push_to_hub/missing-dir", lambda p, f, d: timm_fslt.push_to_hub(d / "nope", "me/x"), TicketError,
     r"model_or_ticket_dir must be a frozen model or a ticket directory",
     "model_or_ticket_dir must be a frozen model or a ticket directory"),
    ("push_to_hub/not-frozen", lambda p, f, d: timm_fslt.push_to_hub(p, "me/x"), TicketError,
     r"model is not frozen", "model is not frozen"),
    ("compact/not-frozen", lambda p, f, d: timm_fslt.compact(p, torch.randn(1, 3, 32, 32)), ValueError,
     r"model is not frozen", "model is not frozen"),
    ("compact/inputs-type", lambda p, f, d: timm_fslt.compact(f, "abc"), TypeError,
     r"example_inputs must be a tensor, a tuple of positional inputs or a dict",
     "example_inputs must be a tensor"),
    ("compact/inputs-shape", lambda p, f, d: timm_fslt.compact(f, torch.randn(1, 5, 32, 32)), ValueError,
     r"example_inputs do not run through the model: RuntimeError", "example_inputs do not run through the model"),
    ("refresh/scores-size", lambda p, f, d: _forward_with_scores_that_do_not_fit(), RuntimeError,
     r"layer 'features.0': scores has shape \(\d+,\) but the frozen code has \d+ free weights",
     "scores has shape (..) but the frozen code has"),
    ("create_model/unknown", lambda p, f, d: timm_fslt.create_model("no_such_model"), ValueError,
     r"model_name must be a timm model name .*'no_such_model'", "model_name must be a timm model name"),
    ("TrainConfig/epochs", lambda p, f, d: TrainConfig(epochs=0), ValueError,
     r"epochs must be a positive int, got 0", "must be a positive int"),
    ("TrainConfig/lr", lambda p, f, d: TrainConfig(lr=-1), ValueError,
     r"lr must be a finite number >= 0, got -1", "lr must be a finite number"),
    ("TrainConfig/mixed-precision", lambda p, f, d: TrainConfig(mixed_precision="fp8"), ValueError,
     r"mixed_precision must be one of \['no', 'fp16', 'bf16'\], got 'fp8'", "mixed_precision must be one of"),
    ("TrainConfig/resume", lambda p, f, d: TrainConfig(resume=""), ValueError,
     r"resume must be False, True, 'auto', 'fallback' or a checkpoint folder path, got an empty string",
     "resume must be False, True, 'auto', 'fallback'"),
    ("load_ticket/relative-path", lambda p, f, d: _load_relative(d), TicketError, r"its parent folder .* exists here, so it is read as a local path; for a Hub "
     r"repo write 'hf-hub:", "so it is read as a local path"),
    ("load_ticket/expected-sha256", lambda p, f, d: timm_fslt.load_ticket(d, expected_sha256="xyz"), TicketError,
     r"expected_sha256 must be 64 lowercase hex digits", "expected_sha256"),
    ("load_ticket/max-build-seconds", lambda p, f, d: timm_fslt.load_ticket(d, max_build_seconds=-1), TicketError,
     r"max_build_seconds must be a positive number of seconds, got -1", "max_build_seconds"),
    ("train/launcher-precision", lambda p, f, d: _launcher_precision("bf17"), RunConfigError,
     r"ACCELERATE_MIXED_PRECISION='bf17' \(accelerate launch --mixed_precision or its config file's "
     r"mixed_precision\) must be one of \['no', 'fp16', 'bf16'\]", "its config file's mixed_precision) must be one of"),
    ("register_builder/colon", lambda p, f, d: timm_fslt.register_builder("os:system", print), ValueError,
     r"name must be a builder name .*\(no ':'\), got 'os:system'", "name must be a builder name"),
    ("register_builder/taken", lambda p, f, d: timm_fslt.register_builder("gin", print), ValueError,
     r"builder name 'gin' is already registered to .*pass replace=True", "is already registered to"),
    ("fslt demo/earlier-run", lambda p, f, d: _demo_into_an_earlier_run(), ValueError,
     r"--out: '.*' already holds the results of an earlier demo run \(results.json, ticket/\); pass --overwrite",
     "already holds the results of an earlier demo run"),
    ("fslt demo/foreign-dir", lambda p, f, d: prepare_out(d, overwrite=False), ValueError,
     r"--out: '.*' is not empty and holds no earlier demo \(it contains notes.txt\); .*pass --overwrite",
     "is not empty and holds no earlier demo"),
    ("fslt demo/out-is-a-file", lambda p, f, d: prepare_out(d / "notes.txt", overwrite=True), ValueError,
     r"--out: '.*notes.txt' exists and is not a directory", "exists and is not a directory"),
]


def _demo_into_an_earlier_run():
    """``fslt demo`` into a directory an earlier demo wrote: refused, and nothing there changes."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / RESULTS_FILE).write_text(json.dumps({"format": DEMO_FORMAT}))
        (out / TICKET_DIR).mkdir()
        try:
            prepare_out(out, overwrite=False)
        finally:
            assert sorted(x.name for x in out.iterdir()) == [RESULTS_FILE, TICKET_DIR]


def _launcher_precision(value):
    """What a run does first with the precision ``accelerate launch`` passed on."""
    old = os.environ.get("ACCELERATE_MIXED_PRECISION")
    os.environ["ACCELERATE_MIXED_PRECISION"] = value
    try:
        return resolve_mixed_precision(None)
    finally:
        if old is None:
            del os.environ["ACCELERATE_MIXED_PRECISION"]
        else:
            os.environ["ACCELERATE_MIXED_PRECISION"] = old


def _load_relative(directory):
    """A relative path spelled like a repo id whose parent folder exists: a local path, never the Hub."""
    cwd = os.getcwd()
    os.chdir(directory.parent)
    try:
        return timm_fslt.load_ticket(f"{directory.name}/nope")
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("case", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_wrong_input_gets_a_specific_message(case, models, junk_dir):
    _, call, error, message, _ = case
    plain, frozen = models
    before = sorted(p.name for p in junk_dir.iterdir())
    with pytest.raises(error, match=message):
        call(plain, frozen, junk_dir)
    assert sorted(p.name for p in junk_dir.iterdir()) == before  # nothing written, nothing lost


def test_readme_troubleshooting_table_lists_every_catalogued_message():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Troubleshooting", 1)[1]
    missing = sorted({phrase for *_, phrase in CATALOGUE if phrase not in section})
    assert not missing, f"README troubleshooting lacks: {missing}"
    for phrase in ("prune must lie in [0, 1]", "sparsity must lie in [prune, 1 - lock]", "trust_builder=True",
                   "lazy and not initialised yet", "--data: path", "belongs to a different configuration"):
        assert phrase in section, phrase
