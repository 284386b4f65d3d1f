"""What a run carries from step to step and from checkpoint to checkpoint: the progress
(``TrainState``), the optimizer and its per-epoch schedule (timm's), and the best model's state."""
from __future__ import annotations

import math
from typing import Optional

import torch
from timm.scheduler import CosineLRScheduler, StepLRScheduler
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


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig):
    """timm's per-epoch learning-rate scheduler: ``CosineLRScheduler`` (cosine decay to 0 over
    the epochs after the warm-up) or, for "constant", ``StepLRScheduler`` with decay rate 1.

    Warm-up (``warmup_epochs`` = w > 0): timm's linear warm-up from ``lr / (w + 1)``, so epoch
    e < w runs at ``lr * (e + 1) / (w + 1)`` and the schedule proper starts at lr in epoch w
    (``warmup_prefix``).  timm's schedulers are pure functions of the epoch; the loop calls
    ``step(epoch + 1)`` after each epoch, and Accelerate saves their state with a checkpoint.
    """
    warmup = config.warmup_epochs
    common = dict(warmup_t=warmup, warmup_lr_init=config.lr / (warmup + 1) if warmup else 0.0,
                  warmup_prefix=True, t_in_epochs=True)
    if config.scheduler == "cosine":
        return CosineLRScheduler(optimizer, t_initial=config.epochs - warmup, lr_min=0.0, **common)
    return StepLRScheduler(optimizer, decay_t=config.epochs, decay_rate=1.0, **common)


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


def check_running_loss(config, loss_sum: torch.Tensor, model: nn.Module, state) -> None:
    """Off the CPU, the loss check of every step runs here instead, where the host reads a value
    anyway (log steps, the epoch's end): the epoch's running loss sum is non-finite from the first
    non-finite loss on, so nothing is missed, only reported up to ``log_every`` steps later."""
    if config.check_finite and loss_sum.device.type != "cpu" and not math.isfinite(float(loss_sum)):
        raise FloatingPointError(nonfinite_message(model, loss_sum, state, None))


def nonfinite_message(model: nn.Module, loss: torch.Tensor, state, epoch: Optional[int]) -> str:
    bad = [name for name, p in model.named_parameters()
           if p.requires_grad and not bool(torch.isfinite(p.detach()).all())]
    where = (f"non-finite values in {', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}" if bad else
             "every trainable tensor is finite, so the inputs or the learning rate are the likely cause")
    at = (f"loss is {float(loss.detach())} at step {state.global_step + 1} (epoch {epoch + 1})" if epoch is not None
          else f"the epoch's running loss sum is {float(loss.detach())} by step {state.global_step}")
    return (f"{at}: {where}. "
            "Lower the learning rate or check the data; resume from the last checkpoint with --resume. "
            "(TrainConfig(check_finite=False) turns this check off.)")
