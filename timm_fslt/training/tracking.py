"""Metrics: the JSONL tracker every run writes, its rewind on resume, and the check of the
extra Accelerate trackers a run asks for."""
from __future__ import annotations

import json
import os
import time
import warnings
from typing import Optional, Sequence

from accelerate.tracking import LOGGER_TYPE_TO_CLASS, GeneralTracker, filter_trackers

from timm_fslt.atomic import write_text_atomic
from timm_fslt.training.config import METRICS_FILE, RunConfigError
from timm_fslt.training.records import jsonable


class JSONLTracker(GeneralTracker):
    """Accelerate tracker writing one JSON object per line: the run's config, then metrics."""

    name = "jsonl"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self, path: str):
        super().__init__()
        self.path = str(path)

    @property
    def tracker(self):
        return self.path

    def _write(self, record: dict) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(jsonable(record), sort_keys=True) + "\n")

    def store_init_configuration(self, values: dict) -> None:
        self._write({"event": "config", "time": time.time(), "config": values})

    def log(self, values: dict, step: Optional[int] = None, **kwargs) -> None:
        self._write({"event": "metrics", "time": time.time(), "step": step, **values})


def rewind_metrics(path: str, step: int) -> Optional[int]:
    """Drop the metrics a killed run logged after its last checkpoint (and a torn last line).

    A resumed run recomputes those steps exactly, so without this the log would
    hold them twice; with it, the log of an interrupted-and-resumed run has the
    same metric records as an uninterrupted one.  Returns the highest step still
    logged (None: no metric records).
    """
    if not os.path.exists(path):
        return None
    kept, last = [], None
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut short by the kill
            if record.get("event") == "metrics" and isinstance(record.get("step"), int):
                if record["step"] > step:
                    continue
                last = record["step"] if last is None else max(last, record["step"])
            kept.append(json.dumps(record, sort_keys=True) + "\n")
    write_text_atomic(path, "".join(kept))
    return last


def rewind_metrics_for_resume(path: str, step: int, stacklevel: int = 2) -> None:
    """``rewind_metrics`` to a resumed checkpoint's step; warns where records are missing
    (``stacklevel`` as ``warnings.warn``'s, counted from the caller: 1 names the caller's line)."""
    last = rewind_metrics(path, step)
    if last is not None and last < step:
        # Only after going back to an older checkpoint and then forward to a newer one:
        # the step-back dropped these records and nothing recomputes them.
        warnings.warn(f"resume: {METRICS_FILE} has no records after step {last} but the checkpoint is at "
                      f"step {step} (an earlier resume from an older checkpoint dropped "
                      "them); results.json's history still holds every epoch", stacklevel=stacklevel + 1)


def check_trackers(names: Sequence[str]) -> None:
    """Refuse an unknown tracker by name, before anything is built."""
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise RunConfigError(f"log_with: unknown tracker {name!r}; choose from {sorted(LOGGER_TYPE_TO_CLASS)} "
                                 "(metrics always go to metrics.jsonl as well)")


def check_trackers_installed(names: Sequence[str], logging_dir: str) -> None:
    """Refuse a requested tracker that is not installed, before anything trains.

    ``accelerate.tracking.filter_trackers`` (what ``Accelerator(log_with=...)`` runs) decides
    which trackers are available; it drops an uninstalled one with a debug-level message
    only, so a requested tracker it leaves out is reported here.  Needs Accelerate's state
    (filter_trackers logs through it): call it once the Accelerator exists."""
    try:
        kept = {str(getattr(t, "value", t)) for t in filter_trackers(list(names), logging_dir)}
    except ValueError as err:  # accelerate's own refusal: name the option
        raise RunConfigError(f"log_with: {err}") from None
    for name in names:
        if name not in kept:
            raise RunConfigError(f"log_with: tracker {name!r} is not installed (pip install {name})")
