"""The demo's output directory: what a run writes there, and when a run may write there at all.

A run never replaces an earlier run's results unless asked (``--overwrite``): the full demo
takes minutes and its results.json, plot and ticket are what a user keeps.  The check runs
before anything is written, so a refused run leaves the directory exactly as it was.
"""
from __future__ import annotations

import json
from pathlib import Path

RESULTS_FILE = "results.json"
PLOT_FILE = "demo.png"
TICKET_DIR = "ticket"
RUNS_DIR = "runs"
OUTPUTS = (RESULTS_FILE, PLOT_FILE, TICKET_DIR, RUNS_DIR)  # what a run writes, hence what it would replace
DEMO_FORMAT = "timm_fslt.demo"  # the results.json format id, not a module path
MARKER_FILE = ".fslt_demo"  # marks a directory as the demo's own


def prepare_out(out: Path, overwrite: bool) -> None:
    """Create ``out`` for a run; refuse, writing nothing, if that would replace anything.

    Refused without ``overwrite``: a directory holding an earlier run's results (any of
    ``OUTPUTS``), or a non-empty directory that is not the demo's.  With ``overwrite`` the new
    run replaces the earlier outputs piece by piece as it writes them (each file atomically),
    so an interrupted rerun leaves readable files behind; nothing else in ``out`` is touched.
    """
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be True or False, got {overwrite!r}")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out: {str(out)!r} exists and is not a directory")
    if out.is_dir() and not overwrite:
        earlier = [name + ("/" if (out / name).is_dir() else "") for name in OUTPUTS if (out / name).exists()]
        if earlier and _is_demo_dir(out):
            raise ValueError(f"--out: {str(out)!r} already holds the results of an earlier demo run "
                             f"({', '.join(earlier)}); pass --overwrite to replace them, or choose another --out")
        others = sorted(p.name for p in out.iterdir() if p.name != MARKER_FILE)
        if others:
            raise ValueError(f"--out: {str(out)!r} is not empty and holds no earlier demo (it contains "
                             f"{', '.join(others[:5])}); choose a new directory or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER_FILE).write_text(DEMO_FORMAT + "\n", encoding="utf-8")


def _is_demo_dir(out: Path) -> bool:
    if (out / MARKER_FILE).is_file():
        return True
    try:
        return json.loads((out / RESULTS_FILE).read_text(encoding="utf-8")).get("format") == DEMO_FORMAT
    except (OSError, ValueError, AttributeError):
        return False
