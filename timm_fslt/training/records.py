"""How a run's records become JSON: results.json, run_config.json, metrics lines, hparams."""
from __future__ import annotations

import json
import os

import torch

from timm_fslt import atomic


def jsonable(value):
    """``value`` with every part JSON can hold as is (tuples as lists, paths and other objects as
    strings, one-element tensors as numbers, keys as strings)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return str(value)


def write_json_atomic(path: str, payload) -> None:
    """Write JSON to ``path`` through a temporary file and a rename (never half-written).

    ``timm_fslt.atomic.write_json_atomic`` after ``jsonable``, so any payload of a run
    (tensors, paths, the architecture) can be written; the name of 0.1."""
    atomic.write_json_atomic(path, jsonable(payload))


def flat_hparams(prefix: str, value, out: dict) -> dict:
    """Flatten nested config into scalar hparams (tensorboard accepts no lists or None)."""
    if isinstance(value, dict):
        for k, v in value.items():
            flat_hparams(f"{prefix}/{k}" if prefix else str(k), v, out)
    elif isinstance(value, (int, float, str, bool)):
        out[prefix] = value
    else:
        out[prefix] = json.dumps(value)
    return out
