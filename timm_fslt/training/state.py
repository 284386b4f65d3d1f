"""What a run carries from step to step and from checkpoint to checkpoint: the progress
(``TrainState``), the optimizer and its per-epoch schedule, and the best model's state."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from timm_fslt.nn.modules import iter_frozen
from timm_fslt.training.config import TrainConfig


class TrainState:
    """Progress of a run that Accelerate stores with each checkpoint.

    ``epoch`` counts finished epochs.  A mid-epoch checkpoint (``checkpoint_every_steps``)
    also holds where the epoch in progress stands: ``batches_in_epoch`` (per process; the
    resumed run skips them with ``accelerator.skip_first_batches``), each process's partial
    loss sum (``epoch_loss_sums``, so the epoch's mean loss is summed in the same order as
    in an uninterrupted run) and, for a frozen model on several processes, each process's
    own BatchNorm running statistics (``process_batchnorm``; the model file holds only
    rank 0's, and they are averaged only at epoch ends).  Accelerate saves this object
    from the main process, so per-process values are gathered into lists indexed by rank.
    """

    def __init__(self):
        self.epoch = 0
        self.global_step = 0
        self.best_val: Optional[dict] = None
        self.best_epoch = 0
        self.best_state: dict = {}
        self.history: list = []
        self.elapsed = 0.0
        self.batches_in_epoch = 0
        self.epoch_loss_sums: list = []
        self.epoch_elapsed = 0.0
        self.process_batchnorm: list = []

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "global_step": self.global_step, "best_val": self.best_val,
                "best_epoch": self.best_epoch, "best_state": self.best_state, "history": self.history,
                "elapsed": self.elapsed, "batches_in_epoch": self.batches_in_epoch,
                "epoch_loss_sums": self.epoch_loss_sums, "epoch_elapsed": self.epoch_elapsed,
                "process_batchnorm": self.process_batchnorm}

    def end_epoch(self) -> None:
        """The epoch in progress is over: nothing of it is left to resume."""
        self.batches_in_epoch, self.epoch_loss_sums, self.epoch_elapsed, self.process_batchnorm = 0, [], 0.0, []

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class EpochSchedule:
    """Per-epoch learning-rate factor: linear warm-up, then cosine decay to 0 (or constant)."""

    def __init__(self, kind: str, epochs: int, warmup: int):
        self.kind, self.epochs, self.warmup = kind, epochs, warmup

    def __call__(self, epoch: int) -> float:
        if epoch < self.warmup:
            return (epoch + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        progress = (epoch - self.warmup) / max(self.epochs - self.warmup, 1)
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no parameter with requires_grad=True: nothing to train")
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay, nesterov=config.nesterov)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def model_fingerprint(model: nn.Module) -> dict:
    """What identifies the model among a run's settings (class, sizes, freeze settings)."""
    config = getattr(model, "fslt_config", None)
    return {"class": type(model).__name__,
            "params": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "freeze": config.to_dict() if config is not None else None}


def static_keys(model: nn.Module) -> set:
    """State-dict keys that never change while training (random weights, frozen codes)."""
    keys = set()
    for name, module in iter_frozen(model):
        prefix = f"{name}." if name else ""
        for pname in module.parametrizations:
            keys.add(f"{prefix}parametrizations.{pname}.original")
            keys.add(f"{prefix}parametrizations.{pname}.0.frozen")
    return keys


def snapshot(model: nn.Module, static: set) -> dict:
    """A CPU copy of the state that training changes (the best model so far; ``static`` left out)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items() if k not in static}


def restore(model: nn.Module, state: dict, static: set) -> None:
    """Load a ``snapshot`` back; every key but the ``static`` ones must be in it."""
    result = model.load_state_dict(state, strict=False)
    missing = set(result.missing_keys) - static
    if missing or result.unexpected_keys:
        raise RuntimeError(f"best-model state does not fit the model: missing {sorted(missing)}, "
                           f"unexpected {sorted(result.unexpected_keys)}")
