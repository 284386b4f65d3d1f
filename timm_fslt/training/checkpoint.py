"""Checkpoint folders: what their run_config.json records, whether they are intact, which
is newest, and how one is written (temporary folder, rename, pointer, pruning).

A checkpoint is ``output_dir/checkpoints/epoch_NNNN``: Accelerate's files plus a
run_config.json (format 2) with the run's identity, epoch, global step and every
file's size and sha256.  ``checkpoints/latest`` names the newest, but only as a hint:
the order is the recorded epoch and step.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from typing import Optional

from safetensors import safe_open

from timm_fslt.atomic import fsync_dir, write_text_atomic
from timm_fslt.training.config import (CHECKPOINT_FORMAT, CHECKPOINT_PREFIX, CHECKPOINTS_DIR, LATEST_FILE,
                                       RUN_CONFIG_FILE, CheckpointError)
from timm_fslt.training.records import write_json_atomic
from timm_fslt.training.state import TrainState


@dataclass
class CheckpointInfo:
    """One ``checkpoints/epoch_*`` folder as its run_config.json describes it.

    ``problem`` is None for a usable checkpoint, else why it cannot be resumed.  When
    run_config.json cannot be read, ``epoch`` comes from the folder name (to place
    the folder among the others) and ``global_step`` is None.
    """

    path: str
    epoch: Optional[int]
    global_step: Optional[int]
    problem: Optional[str] = None
    verified: bool = False  # sha256 of every file checked (not only sizes)

    @property
    def valid(self) -> bool:
        return self.problem is None

    @property
    def order(self) -> tuple:
        # Epoch and global step grow together within a run (steps per epoch are part of
        # the identity); the step breaks no real tie but keeps the order on the record.
        return (self.epoch if self.epoch is not None else -1,
                self.global_step if self.global_step is not None else -1, os.path.basename(self.path))

    def describe(self) -> str:
        partial = " and part of the next" if "_step_" in os.path.basename(self.path) else ""
        where = f"epoch {self.epoch}{partial}" + (f", step {self.global_step}" if self.global_step is not None else "")
        return f"{self.path!r} ({where})"


def checkpoint_name(epoch: int, global_step: int, batches_in_epoch: int) -> str:
    """``epoch_EEEE`` at an epoch's end, ``epoch_EEEE_step_SSSSSSSS`` inside the epoch after E
    (``checkpoint_every_steps``: E epochs finished, global step S)."""
    name = f"{CHECKPOINT_PREFIX}{epoch:04d}"
    return f"{name}_step_{global_step:08d}" if batches_in_epoch else name


def _name_epoch(name: str) -> Optional[int]:
    match = re.fullmatch(re.escape(CHECKPOINT_PREFIX) + r"(\d+)(_step_\d+)?", name)
    return int(match.group(1)) if match else None


def _hash_file(path: str, fsync: bool = False) -> tuple[int, str]:
    """Size and sha256 of a file; with ``fsync``, the file is flushed to the disk on the way."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
            size += len(chunk)
        if fsync:
            with contextlib.suppress(OSError):  # not every platform fsyncs a read-only handle
                os.fsync(f.fileno())
    return size, h.hexdigest()


def _checkpoint_files(folder: str) -> dict:
    """Every file accelerate wrote into ``folder`` (relative POSIX path -> size and sha256)."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, folder).replace(os.sep, "/")
            if rel != RUN_CONFIG_FILE and not rel.startswith(f"{RUN_CONFIG_FILE}.tmp"):
                size, digest = _hash_file(full, fsync=True)  # just written: flush it now
                out[rel] = {"bytes": size, "sha256": digest}
    return dict(sorted(out.items()))


def _positive_int(value, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum



def inspect_checkpoint(path: str, verify: bool = True) -> CheckpointInfo:
    """Read a checkpoint folder's run_config.json and check its files against it.

    Checks that run_config.json parses and holds the run's identity, epoch and global
    step, and that every file it lists is present with the recorded size (and, with
    ``verify``, the recorded sha256).  Never raises for a damaged checkpoint: the
    returned ``problem`` says what is wrong.  A format-1 checkpoint (written before
    sizes and checksums were recorded) gets a lighter check of its main files.
    """
    path = os.path.abspath(path)
    info = CheckpointInfo(path, _name_epoch(os.path.basename(path)), None)
    record, info.problem = _read_run_config(path)
    if info.problem is not None:
        return info
    info.epoch = record["epoch"]
    if not isinstance(record.get("identity"), dict) or not record["identity"]:
        info.problem = f"{RUN_CONFIG_FILE} has no 'identity' (the run's configuration)"
        return info
    if "files" not in record:
        info.problem = _check_format1(path)
        return info
    if not _positive_int(record.get("global_step"), 0):
        info.problem = (f"{RUN_CONFIG_FILE}: 'global_step' must be an int >= 0, "
                        f"got {record.get('global_step', '<absent>')!r}")
        return info
    info.global_step = record["global_step"]
    info.problem = _check_sizes(path, record["files"])
    if info.problem is None and verify:
        info.problem = _check_digests(path, record["files"])
        info.verified = info.problem is None
    return info


def _read_run_config(path: str) -> tuple[Optional[dict], Optional[str]]:
    """The run_config.json of a checkpoint folder as a dict with a valid epoch, or why not."""
    if not os.path.isdir(path):
        return None, "it is not a directory"
    config_path = os.path.join(path, RUN_CONFIG_FILE)
    if not os.path.isfile(config_path):
        return None, f"{RUN_CONFIG_FILE} is missing"
    try:
        with open(config_path, "rb") as f:
            raw = f.read()
        record = json.loads(raw.decode("utf-8")) if raw.strip() else None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        return None, f"{RUN_CONFIG_FILE} cannot be read ({type(err).__name__}: {err})"
    if record is None:
        return None, f"{RUN_CONFIG_FILE} is empty"
    if not isinstance(record, dict):
        return None, f"{RUN_CONFIG_FILE} holds a {type(record).__name__}, not a JSON object"
    # epoch counts finished epochs: 0 only for a mid-epoch checkpoint of the first epoch.
    minimum = 0 if _positive_int(record.get("batches_in_epoch"), 1) else 1
    if not _positive_int(record.get("epoch"), minimum):
        return None, (f"{RUN_CONFIG_FILE}: 'epoch' must be an int >= {minimum}, "
                      f"got {record.get('epoch', '<absent>')!r}")
    return record, None


def _check_sizes(path: str, files) -> Optional[str]:
    """Every file run_config.json lists is inside the folder, present, and of the recorded size."""
    if not isinstance(files, dict) or not files:
        return f"{RUN_CONFIG_FILE}: 'files' must list the checkpoint's files, got {files!r}"
    for name, entry in files.items():
        parts = name.split("/")
        # A record naming files elsewhere (absolute, '..') is not ours: refuse rather than read outside.
        if not name or name.startswith("/") or ".." in parts or "\\" in name or ":" in parts[0]:
            return f"{RUN_CONFIG_FILE} lists a file outside the checkpoint: {name!r}"
        if not (isinstance(entry, dict) and _positive_int(entry.get("bytes"), 0)
                and isinstance(entry.get("sha256"), str) and len(entry["sha256"]) == 64):
            return f"{RUN_CONFIG_FILE}: files[{name!r}] must hold 'bytes' and a 'sha256', got {entry!r}"
        full = os.path.join(path, *parts)
        if not os.path.isfile(full):
            return f"{name} is missing ({RUN_CONFIG_FILE} records {entry['bytes']} bytes)"
        size = os.path.getsize(full)
        if size != entry["bytes"]:
            return f"{name} has {size} bytes, {RUN_CONFIG_FILE} records {entry['bytes']}"
    return None


def _check_digests(path: str, files: dict) -> Optional[str]:
    """Every listed file has the recorded sha256 (run after ``_check_sizes``)."""
    for name, entry in files.items():
        try:
            _, digest = _hash_file(os.path.join(path, *name.split("/")))
        except OSError as err:
            return f"{name} cannot be read ({err})"
        if digest != entry["sha256"]:
            return (f"{name} has sha256 {digest[:12]}..., {RUN_CONFIG_FILE} records "
                    f"{entry['sha256'][:12]}... (the file was altered or partly overwritten)")
    return None


def _check_format1(path: str) -> Optional[str]:
    """The files a format-1 checkpoint must hold, non-empty, and a model file that opens."""
    for name in ("model.safetensors", "optimizer.bin", "custom_checkpoint_0.pkl"):
        full = os.path.join(path, name)
        if not os.path.isfile(full) or os.path.getsize(full) == 0:
            return f"{name} is {'empty' if os.path.isfile(full) else 'missing'} (format-1 checkpoint)"
    try:
        with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
            list(f.keys())
    except Exception as err:  # safetensors raises its own SafetensorError and OSError
        return f"model.safetensors cannot be read ({type(err).__name__}: {err}) (format-1 checkpoint)"
    return None


def list_checkpoints(output_dir: str, verify: bool = False) -> list[CheckpointInfo]:
    """Every ``checkpoints/epoch_*`` folder of a run, oldest first by recorded epoch and step.

    Without ``verify`` only sizes are checked (fast); ``problem`` says what is wrong
    with each damaged one.  Leftover ``.tmp-*`` folders of a killed save are not listed.
    """
    root = os.path.join(os.path.abspath(os.path.expanduser(str(output_dir))), CHECKPOINTS_DIR)
    if not os.path.isdir(root):
        return []
    found = [inspect_checkpoint(os.path.join(root, name), verify=verify)
             for name in os.listdir(root) if name.startswith(CHECKPOINT_PREFIX)]
    return sorted(found, key=lambda c: c.order)


def read_latest_pointer(output_dir: str) -> Optional[str]:
    """The folder name ``checkpoints/latest`` holds ('' when empty), None when it is missing."""
    pointer = os.path.join(os.path.abspath(os.path.expanduser(str(output_dir))), CHECKPOINTS_DIR, LATEST_FILE)
    try:
        with open(pointer, encoding="utf-8") as f:
            return f.read().strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError):
        return ""


def latest_checkpoint(output_dir: str) -> Optional[str]:
    """Path of the newest valid (fully verified) checkpoint of a run, or None.

    Chosen by the epoch and step each run_config.json records, never by the
    ``latest`` pointer alone: a stale, empty or missing pointer changes nothing.
    """
    for info in reversed(list_checkpoints(output_dir)):
        if info.valid and inspect_checkpoint(info.path).valid:
            return info.path
    return None



def save_checkpoint(accelerator, ckpt_root: str, state: TrainState, identity: dict, keep: int,
                     resumed_from: Optional[str]) -> None:
    """accelerator.save_state into a temporary folder (named by ``checkpoint_name``), record every
    file's size and sha256, rename it into place, move the pointer, then delete what ``keep`` no
    longer covers."""
    name = checkpoint_name(state.epoch, state.global_step, state.batches_in_epoch)
    tmp, final = os.path.join(ckpt_root, f".tmp-{name}"), os.path.join(ckpt_root, name)
    if accelerator.is_main_process:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)  # leftover of a run killed while writing
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json_atomic(os.path.join(tmp, RUN_CONFIG_FILE), {
            "format": CHECKPOINT_FORMAT, "identity": identity, "epoch": state.epoch,
            "global_step": state.global_step, "batches_in_epoch": state.batches_in_epoch,
            "files": _checkpoint_files(tmp)})
        if os.path.isdir(final):
            # A folder of this epoch from an abandoned branch (a resume from an older checkpoint) or a
            # corrupted one: move it aside first, so a kill in between never leaves neither.
            trash = os.path.join(ckpt_root, f".old-{name}-{os.getpid()}")
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash)
        else:
            os.replace(tmp, final)
        fsync_dir(ckpt_root)
        write_text_atomic(os.path.join(ckpt_root, LATEST_FILE), name + "\n")
        prune_checkpoints(ckpt_root, final, keep, resumed_from)
    accelerator.wait_for_everyone()


def prune_checkpoints(ckpt_root: str, head: str, keep: int, resumed_from: Optional[str]) -> None:
    """Keep the ``keep`` newest checkpoints up to ``head`` (the one just written), by recorded order.

    Never deleted: ``head``; every checkpoint newer than it (a resume from an older
    checkpoint: the run replaces them as it reaches their epochs); and, while such
    newer ones exist, the checkpoint this run resumed from.  Damaged checkpoints
    older than ``head`` do not count towards ``keep`` and are deleted.
    """
    found = list_checkpoints(os.path.dirname(ckpt_root))
    head_info = next((c for c in found if c.path == head), None)
    if head_info is None or not head_info.valid:
        raise CheckpointError(f"checkpoint {head!r} was just written but is invalid: "
                              f"{head_info.problem if head_info else 'it is gone'}")
    newer = [c for c in found if c.order > head_info.order]
    protected = {head} | {c.path for c in newer}
    if newer and resumed_from:
        protected.add(os.path.abspath(resumed_from))
    older_valid = [c for c in found if c.order < head_info.order and c.valid]
    if keep > 1:  # the head is the first of the `keep`
        protected |= {c.path for c in older_valid[-(keep - 1):]}
    for c in found:
        if c.path not in protected:
            shutil.rmtree(c.path) if os.path.isdir(c.path) else os.remove(c.path)
    for leftover in os.listdir(ckpt_root):  # halves of saves killed before their rename
        if leftover.startswith(".old-"):
            shutil.rmtree(os.path.join(ckpt_root, leftover), ignore_errors=True)
