"""The loaders of a run: per-process batch sizes (``batch_size`` is the global batch), and the
train (seeded per-epoch order, its own generator), val and test DataLoaders before
``accelerator.prepare``."""
from __future__ import annotations

from typing import Optional

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from timm_fslt.training.config import RunConfigError, TrainConfig
from timm_fslt.training.data import EpochShuffleSampler


def batch_sizes(config: TrainConfig, task, n_proc: int) -> tuple[int, int]:
    """Per-process train and eval batch sizes (``batch_size`` is the global batch)."""
    per_step = n_proc * config.grad_accum_steps
    if task.batched and config.batch_size % per_step:
        raise RunConfigError(f"batch_size ({config.batch_size}) is the global batch and must be divisible by "
                             f"num_processes * grad_accum_steps = {n_proc} * {config.grad_accum_steps}")
    per_process_batch = config.batch_size // per_step if task.batched else 1
    return per_process_batch, config.eval_batch_size or per_process_batch


def build_loaders(accelerator, config: TrainConfig, task, batch_sizes: tuple[int, int], sets: tuple) -> list:
    """Train (seeded per-epoch order), val and (if given) test loaders, not yet prepared."""
    n_proc = accelerator.num_processes
    (per_process_batch, eval_batch), (train_set, val_set, test_set) = batch_sizes, sets
    pin = accelerator.device.type == "cuda"

    def loader(dataset, batch_size, shuffle_seed, limit_batches):
        return make_loader(dataset, task, batch_size, shuffle_seed=shuffle_seed, limit_batches=limit_batches,
                            num_processes=n_proc, num_workers=config.num_workers, pin_memory=pin)

    loaders = [loader(train_set, per_process_batch, config.seed, config.limit_train_batches),
               loader(val_set, eval_batch, None, config.limit_eval_batches)]
    if test_set is not None:
        loaders.append(loader(test_set, eval_batch, None, config.limit_eval_batches))
    return loaders


def make_loader(dataset, task, batch_size: int, *, shuffle_seed: Optional[int], limit_batches: Optional[int],
                 num_processes: int, num_workers: int, pin_memory: bool):
    if isinstance(dataset, DataLoader):
        return dataset
    if not isinstance(dataset, Dataset) and not hasattr(dataset, "__getitem__"):
        raise TypeError(f"expected a torch Dataset or DataLoader, got {type(dataset).__name__}")
    if not task.batched:
        batch_size, limit_batches = 1, None
    limit = None if limit_batches is None else limit_batches * batch_size * num_processes
    common = dict(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                  collate_fn=task.collate_fn, persistent_workers=False)
    if shuffle_seed is not None:
        sampler = EpochShuffleSampler(len(dataset), shuffle_seed, num_samples=limit)
        # Its own generator (reseeded each epoch from the seed and the epoch): the workers' base
        # seed is then no draw from the global RNG, which a mid-epoch resume would shift.
        loader = DataLoader(dataset, sampler=sampler, generator=torch.Generator(), **common)
        loader.fslt_epoch_generator = loader.generator  # the loop reseeds it (a caller's own loader: never)
        return loader
    if limit is not None and limit < len(dataset):
        dataset = Subset(dataset, range(limit))
    return DataLoader(dataset, shuffle=False, **common)
