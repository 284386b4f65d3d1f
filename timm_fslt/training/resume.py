"""Fresh start or resume: which checkpoint a run continues from, decided before anything
trains, and the checks that it belongs to this run (identity, model keys)."""
from __future__ import annotations

import json
import os
import warnings
from typing import Optional

from safetensors import safe_open
from torch import nn

from timm_fslt.training.checkpoint import (CheckpointInfo, inspect_checkpoint, list_checkpoints,
                                           read_latest_pointer)
from timm_fslt.training.config import (CHECKPOINT_PREFIX, CHECKPOINTS_DIR, IDENTITY_DEFAULTS, LATEST_FILE,
                                       RESULTS_FILE, RESUME_MODES, RUN_CONFIG_FILE, CheckpointError,
                                       RunConfigError, TrainConfig)
from timm_fslt.training.sync import decided_by_main


def decide_resume(accelerator, config: TrainConfig, output_dir: str, identity: dict) -> Optional[str]:
    """``choose_resume`` on the main process, its answer (or error) given to every process; the
    main process reports what the choice skipped (a warning) or corrected (a note)."""
    resume_from, notes = decided_by_main(accelerator, lambda: choose_resume(config, output_dir, identity))
    if accelerator.is_main_process:
        for note in notes:  # a skipped (damaged) checkpoint is a warning; a stale pointer only a note
            if note.startswith("resume: skipped"):
                warnings.warn(note, stacklevel=3)  # names the line that called train()
            else:
                print(note)
    return resume_from


def load_checkpoint(accelerator, model: nn.Module, checkpoint: str) -> None:
    """``accelerator.load_state`` of a chosen checkpoint, its failures named after it."""
    check_checkpoint_keys(model, checkpoint)  # DDP's wrapper would prefix every key with 'module.'
    try:
        accelerator.load_state(checkpoint)
    except Exception as err:  # verified files that still do not load: name the checkpoint
        raise CheckpointError(f"resume: checkpoint {checkpoint!r} does not load: "
                              f"{type(err).__name__}: {err}") from err


def choose_resume(config: TrainConfig, output_dir: str, identity: dict) -> tuple[Optional[str], list[str]]:
    """The checkpoint to resume (None: a fresh run) and notes to print; raises before anything trains."""
    mode, notes = config.resume, []
    if mode is False:
        return _fresh_start(config, output_dir), notes
    if mode is True or mode in RESUME_MODES:
        found = list_checkpoints(output_dir)
        if not found:
            if mode == "auto":
                return _fresh_start(config, output_dir), notes
            raise FileNotFoundError(f"resume: no checkpoint to resume in {output_dir!r} (no "
                                    f"{CHECKPOINTS_DIR}/{CHECKPOINT_PREFIX}* folder); start without resume")
        resume_from = _newest_valid(found, mode, output_dir, notes)
    else:
        resume_from = _named_checkpoint(mode)
    with open(os.path.join(resume_from, RUN_CONFIG_FILE), encoding="utf-8") as f:
        stored = json.load(f)
    diffs = _config_differences(_with_identity_defaults(stored.get("identity", {})), identity)
    if diffs:
        raise RunConfigError(f"resume: the checkpoint {resume_from!r} belongs to a different configuration: "
                             + "; ".join(diffs) + ". Resume with the same settings, or use a new output dir.")
    return resume_from, notes


def _fresh_start(config: TrainConfig, output_dir: str) -> None:
    """None (no checkpoint to resume), once a fresh run cannot overwrite another run."""
    if not config.overwrite:
        # Any checkpoint folder counts, valid or not: a fresh run would overwrite it.
        clashes = [c.path for c in list_checkpoints(output_dir)]
        clashes += [p for p in (os.path.join(output_dir, RESULTS_FILE),) if os.path.exists(p)]
        if clashes:
            raise FileExistsError(f"output_dir {output_dir!r} already holds a run ({clashes[-1]}); pass "
                                  "resume (--resume) to continue it or overwrite (--overwrite) to start over")
    return None


def _newest_valid(found: list[CheckpointInfo], mode, output_dir: str, notes: list[str]) -> str:
    """The newest checkpoint that verifies; a damaged newer one is an error unless ``mode`` is
    'fallback' (then a note).  Appends to ``notes`` what the choice skipped or corrected."""
    chosen, skipped = None, []
    for info in reversed(found):  # newest first; hash only until one holds
        if info.valid:
            info = inspect_checkpoint(info.path, verify=True)
        if info.valid:
            chosen = info
            break
        skipped.append(info)
    reasons = "; ".join(f"checkpoint {c.path!r} is invalid: {c.problem}" for c in skipped)
    if chosen is None:
        # Starting over would overwrite these folders: never do that silently.
        ckpt_root = os.path.join(output_dir, CHECKPOINTS_DIR)
        raise CheckpointError(f"resume: no valid checkpoint in {ckpt_root!r}: {reasons}. Repair or move "
                              "them away, or start over with resume=False and overwrite=True (--overwrite)")
    if skipped and mode != "fallback":
        raise CheckpointError(f"resume: {reasons}. The newest valid checkpoint is {chosen.describe()}; pass "
                              "resume='fallback' (--resume fallback) to continue from it")
    for c in skipped:
        notes.append(f"resume: skipped checkpoint {c.path!r} ({c.problem}); continuing from the older "
                     f"{chosen.describe()}")
    pointer = read_latest_pointer(output_dir)
    if pointer != os.path.basename(chosen.path):
        said = ("is missing" if pointer is None else "is empty" if not pointer else f"names {pointer!r}")
        notes.append(f"resume: {CHECKPOINTS_DIR}/{LATEST_FILE} {said}; the newest valid checkpoint by "
                     f"recorded epoch and step is {chosen.describe()}")
    return chosen.path


def _named_checkpoint(folder) -> str:
    """The checkpoint folder ``resume`` names, once it verifies."""
    resume_from = os.path.abspath(os.path.expanduser(str(folder)))
    if not os.path.isfile(os.path.join(resume_from, RUN_CONFIG_FILE)):
        raise FileNotFoundError(f"resume: {resume_from!r} is not a checkpoint folder (no {RUN_CONFIG_FILE}); "
                                "resume takes False, True, 'auto', 'fallback' or a checkpoint folder")
    info = inspect_checkpoint(resume_from, verify=True)
    if not info.valid:
        raise CheckpointError(f"resume: checkpoint {resume_from!r} is invalid: {info.problem}")
    return resume_from


def _with_identity_defaults(stored):
    """A checkpoint's identity with the fields it predates (``IDENTITY_DEFAULTS``) at the value its run had."""
    if isinstance(stored, dict) and isinstance(stored.get("train"), dict):
        return {**stored, "train": {**IDENTITY_DEFAULTS, **stored["train"]}}
    return stored


def _config_differences(stored, current, prefix="") -> list[str]:
    """Each leaf where the checkpoint's identity and this run's differ, named by its dotted path."""
    if isinstance(stored, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(stored) | set(current)):
            name = f"{prefix}.{key}" if prefix else key
            if key not in stored or key not in current:
                out.append(f"{name}: {stored.get(key, '<absent>')!r} (checkpoint) != "
                           f"{current.get(key, '<absent>')!r} (now)")
            else:
                out += _config_differences(stored[key], current[key], name)
        return out
    return [] if stored == current else [f"{prefix}: {stored!r} (checkpoint) != {current!r} (now)"]


def check_checkpoint_keys(model: nn.Module, checkpoint: str) -> None:
    """The checkpoint's model.safetensors holds exactly this model's state-dict keys."""
    path = os.path.join(checkpoint, "model.safetensors")
    if not os.path.exists(path):
        raise FileNotFoundError(f"resume: {checkpoint!r} has no model.safetensors")
    try:
        with safe_open(path, "pt") as f:
            stored = set(f.keys())
    except Exception as err:  # SafetensorError / OSError: say which file
        raise CheckpointError(f"resume: checkpoint {checkpoint!r} is invalid: model.safetensors cannot be "
                              f"read ({type(err).__name__}: {err})") from err
    expected = set(model.state_dict().keys())
    if stored != expected:
        raise RunConfigError(f"resume: the model in {checkpoint!r} does not match this model: "
                             f"missing {sorted(expected - stored)[:5]}, unexpected {sorted(stored - expected)[:5]}")
