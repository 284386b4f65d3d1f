"""Training: ``train(model, train_set, val_set, test_set, TrainConfig(...))``, the one loop of
timm_fslt (Accelerate), and what it is made of.

``config`` (TrainConfig, RunConfigError, CheckpointError, the output_dir names, ``deterministic_mode``), ``tasks``
(what a batch is), ``data`` (the recipes' datasets and the seeded order, with ``transforms``:
timm's data config, and ``graphs``: OGBN-Arxiv), ``loaders`` (batch sizes and DataLoaders),
``state`` (progress, optimizer, timm's scheduler, best model), ``checkpoint`` (folders: record, verify, write, prune),
``resume`` (which checkpoint a run continues), ``sync`` (agreement across processes),
``tracking`` (metrics.jsonl), ``records`` (JSON of a run), ``outputs`` (ticket or model
file) and ``loop`` (``train``).
"""
from timm_fslt.training.config import (CHECKPOINT_FORMAT, CHECKPOINT_PREFIX, CHECKPOINTS_DIR, LATEST_FILE,
                                       METRICS_FILE, MIXED_PRECISION, OPTIMIZERS, RESULTS_FILE, RESUME_MODES,
                                       RUN_CONFIG_FILE, SCHEDULERS, TICKET_DIR, CheckpointError, RunConfigError,
                                       TrainConfig, deterministic_mode)
from timm_fslt.training.tasks import ClassificationTask, NodeClassificationTask
from timm_fslt.training.state import TrainState, build_optimizer, model_fingerprint
from timm_fslt.training.records import write_json_atomic
from timm_fslt.training.checkpoint import (CheckpointInfo, inspect_checkpoint, latest_checkpoint, list_checkpoints,
                                           read_latest_pointer)
from timm_fslt.training.sync import check_masks_in_sync, mask_digest
from timm_fslt.training.tracking import JSONLTracker, rewind_metrics
from timm_fslt.training.outputs import dense_size
from timm_fslt.training.loop import train

__all__ = [
    "CHECKPOINT_FORMAT", "CHECKPOINT_PREFIX", "CHECKPOINTS_DIR", "LATEST_FILE", "METRICS_FILE", "MIXED_PRECISION",
    "OPTIMIZERS", "RESULTS_FILE", "RESUME_MODES", "RUN_CONFIG_FILE", "SCHEDULERS", "TICKET_DIR",
    "CheckpointError", "CheckpointInfo", "ClassificationTask", "JSONLTracker", "NodeClassificationTask",
    "RunConfigError", "TrainConfig", "TrainState", "build_optimizer", "check_masks_in_sync", "dense_size",
    "deterministic_mode",
    "inspect_checkpoint", "latest_checkpoint", "list_checkpoints", "mask_digest", "model_fingerprint",
    "read_latest_pointer", "rewind_metrics", "train", "write_json_atomic",
]
