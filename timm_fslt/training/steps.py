"""How many optimizer steps a run takes: what ``freeze(..., sparsity_schedule=..., schedule_steps=T)``
needs before the run starts (the schedule's length is the run's number of optimizer steps).

``train`` builds its loaders only when it runs, after the model is frozen; these functions give
the same count from the settings: ``TrainConfig``'s global ``batch_size`` (split over processes
and gradient-accumulation steps), ``limit_train_batches`` (per process), the number of processes
and the train set's size.  ``tests/test_method_recipes.py`` checks the count against the
``global_steps`` of real runs.
"""
from __future__ import annotations

import math

from timm_fslt.training.config import TrainConfig, resolve_grad_accum


def steps_per_epoch(n_train: int, config: TrainConfig, *, batched: bool = True, num_processes: int = 1,
                    grad_accum_steps: int = None) -> int:
    """Optimizer steps in one epoch of ``train`` on ``n_train`` examples.

    ``batched=False`` (a ``NodeClassificationTask``: the whole graph is one batch): 1.  Otherwise the
    train loader holds ``ceil(samples / per-process batch)`` batches (the last one partial), Accelerate
    hands each process ``ceil(batches / num_processes)`` of them (even batches), and the last batch of
    an epoch always ends on an optimizer step.  ``grad_accum_steps`` None: the config's, else the
    launcher's (``resolve_grad_accum``)."""
    if isinstance(n_train, bool) or not isinstance(n_train, int) or n_train < 1:
        raise ValueError(f"n_train must be a positive int (the train set's size), got {n_train!r}")
    if not batched:
        return 1
    accum = grad_accum_steps or resolve_grad_accum(config.grad_accum_steps)[0]
    per_process = config.batch_size // (num_processes * accum)
    if per_process < 1:
        raise ValueError(f"batch_size ({config.batch_size}) is smaller than num_processes * grad_accum_steps "
                         f"= {num_processes} * {accum}")
    samples = n_train
    if config.limit_train_batches is not None:
        samples = min(n_train, config.limit_train_batches * per_process * num_processes)
    batches = math.ceil(math.ceil(samples / per_process) / num_processes)
    return math.ceil(batches / accum)


def run_steps(n_train: int, config: TrainConfig, **kwargs) -> int:
    """Optimizer steps of the whole run: ``config.epochs * steps_per_epoch(...)`` (the
    ``schedule_steps`` of a sparsity schedule that spans the run)."""
    return config.epochs * steps_per_epoch(n_train, config, **kwargs)
