"""The one training loop of timm_fslt, built on Hugging Face Accelerate.

    from timm_fslt.training import TrainConfig, train
    results = train(model, train_set, val_set, test_set, TrainConfig(epochs=10, lr=0.1))

``model`` is either a frozen model (``timm_fslt.freeze``: Edge-Popup searches the
scores, nothing else trains) or an ordinary model (weight training, the paper's
upper reference).  Only parameters with ``requires_grad`` reach the optimizer.

The loop runs unchanged on one CPU, one GPU or many processes (``accelerate
launch``): mixed precision, gradient accumulation, a checkpoint after every epoch
and, with ``checkpoint_every_steps``, every N steps inside one (written to a temporary
folder, then renamed) and ``resume`` that continues a killed run exactly (model,
scores, optimizer, timm's scheduler, RNG states, the position inside the epoch and
the epoch's data order and augmentation, pure functions of the seed and the epoch).  Each
checkpoint's run_config.json records its epoch, global step and every file's size
and sha256; resume takes the newest checkpoint that verifies (``checkpoints/latest``
is only a hint), refuses a damaged newest one unless ``resume="fallback"``, and
never starts over silently.  The model with the best validation accuracy is kept
and evaluated on the test set at the end; ``results.json``, the metrics JSONL and
the ticket land in ``output_dir``.

A ``task`` tells the loop what a batch is: ``ClassificationTask`` (image batches
``(x, y)``) or ``NodeClassificationTask`` (the whole graph, full-graph training).

Its parts live next to it: ``config``, ``tasks``, ``state`` (progress, optimizer, best model),
``checkpoint``, ``resume``, ``sync`` (across processes), ``tracking`` and ``outputs``.  ``train``
is a sequence of named steps: check the settings, build the accelerator, decide the resume,
prepare loaders and optimizer, load or start the state, run epochs (train, validate, checkpoint),
finish (test the best model, save the ticket and results.json).  On a GPU no step reads a value
back except at log steps (``log_every``), where the loss checks run (``state.check_running_loss``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import (DistributedDataParallelKwargs, GradientAccumulationPlugin, ProjectConfiguration,
                               set_seed)
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from timm_fslt.frozen import get_group, is_frozen, recompute_masked_weights
from timm_fslt.ticket.architecture import resolve_architecture
from timm_fslt.training.checkpoint import save_checkpoint
from timm_fslt.training.config import (CHECKPOINTS_DIR, METRICS_FILE, RESULTS_FILE, VOLATILE_FIELDS, RunConfigError,
                                       TrainConfig, check_precision_on_device, deterministic_mode,
                                       resolve_grad_accum, resolve_mixed_precision, set_deterministic_flags)
from timm_fslt.training.data import epoch_seed
from timm_fslt.training.outputs import current_sparsity, save_outputs, size_results
from timm_fslt.training.records import flat_hparams, jsonable, write_json_atomic
from timm_fslt.training.resume import decide_resume, load_checkpoint
from timm_fslt.training.loaders import batch_sizes, build_loaders
from timm_fslt.training.state import (TrainState, build_optimizer, build_scheduler, check_running_loss,
                                      model_fingerprint, nonfinite_message, restore, snapshot, static_keys)
from timm_fslt.training.sync import (average_batchnorm_stats, batchnorm_digests, batchnorm_vector,
                                     check_masks_in_sync, load_batchnorm_vector)
from timm_fslt.training.tasks import ClassificationTask
from timm_fslt.training.tracking import (JSONLTracker, check_trackers, check_trackers_installed,
                                         rewind_metrics_for_resume)


def train(model: nn.Module, train_set, val_set, test_set=None, config: Optional[TrainConfig] = None, *,
          task=None, run_info: Optional[dict] = None) -> dict:
    """Search the scores of a frozen model (or train an ordinary one); return the results.

    Args:
        model: a ``timm_fslt.freeze``-d model or an ordinary one (weight training).
        train_set, val_set, test_set: torch Datasets (the loop builds the loaders, with a seeded
            per-epoch order) or ready DataLoaders.  ``test_set`` may be None (no final test).
        config: ``TrainConfig``.
        task: ``ClassificationTask()`` (default) or ``NodeClassificationTask(...)``.
        run_info: what else identifies the run (model name, data source, method...);
            stored with every checkpoint and in results.json, and compared on resume.

    Returns the results dict that is also written to ``output_dir/results.json``:
    ``accuracy`` ({"val", "test"}), ``best_epoch``, ``sparsity``, ``size_report``,
    ``wall_time_s``, ``history`` (per epoch), ``mask_digests`` (one per process), ``ticket_dir``/``hub_url``
    when saved.  With ``stop_after`` set and epochs left, returns early with ``completed=False``.

    A frozen model's ticket needs its architecture: build the model with
    ``timm_fslt.create_model`` (it records it) or set ``config.architecture``; this
    is checked before training.  Bad settings raise ``RunConfigError`` (a
    ValueError), ``FileExistsError`` or ``FileNotFoundError`` before anything trains.
    ``config.deterministic``: runs inside ``deterministic_mode`` (its settings restored on return or error).
    """
    config = dataclasses.replace(config or TrainConfig())  # revalidate a caller-modified config
    with deterministic_mode(config.deterministic):
        return _train(model, train_set, val_set, test_set, config, task, run_info)


def _train(model: nn.Module, train_set, val_set, test_set, config: TrainConfig, task, run_info) -> dict:
    accum, accum_note = resolve_grad_accum(config.grad_accum_steps)  # None: the launcher's
    config = dataclasses.replace(config, grad_accum_steps=accum)
    task = task or ClassificationTask(config.label_smoothing)
    run_info = jsonable(dict(run_info or {}))
    _check_before_start(model, config)
    output_dir = os.path.abspath(os.path.expanduser(str(config.output_dir)))
    accelerator = _make_accelerator(config, output_dir, is_frozen(model), accum_note)
    check_trackers_installed(config.log_with, os.path.join(output_dir, "logs"))
    sizes = batch_sizes(config, task, accelerator.num_processes)
    identity = _identity(model, config, run_info, accelerator, (train_set, val_set, test_set))
    # Decided before anything trains; every process gets the same answer (or the same error).
    resume_from = decide_resume(accelerator, config, output_dir, identity)
    set_seed(config.seed, device_specific=True)
    loaders = build_loaders(accelerator, config, task, sizes, (train_set, val_set, test_set))
    run = _prepare(accelerator, model, config, task, loaders, output_dir)
    run.identity, run.resume_from = identity, resume_from
    state = _start_state(run, resume_from)
    accelerator.init_trackers(config.project_name, config=flat_hparams("", {"identity": identity}, {}))
    check_masks_in_sync(accelerator, run.model)
    ckpt_root = run.ckpt_root
    epochs_this_call = 0
    while state.epoch < config.epochs:
        if config.stop_after is not None and epochs_this_call >= config.stop_after:
            accelerator.end_training()
            return {"completed": False, "stopped_after_epoch": state.epoch, "history": state.history,
                    "output_dir": output_dir}
        _run_epoch(run, state)
        save_checkpoint(accelerator, ckpt_root, state, identity, config.keep_checkpoints, resume_from)
        epochs_this_call += 1
    return _finish(run, state, run_info)


@dataclass
class _Run:
    """What one invocation of ``train`` works with once Accelerate has prepared it."""

    config: TrainConfig
    task: Any
    accelerator: Any
    model: nn.Module  # as prepared (wrapped by DDP when there are several processes)
    unwrapped: nn.Module
    optimizer: Any
    scheduler: Any
    train_loader: Any
    val_loader: Any
    test_loader: Any
    output_dir: str
    frozen: bool
    static: set  # state-dict keys left out of the best-model snapshot
    show: bool  # progress bars (main process only)
    sync_checks: int = 0  # per-step checks of this invocation (the per-epoch ones always run)
    identity: Optional[dict] = None  # what every checkpoint records
    resume_from: Optional[str] = None
    loader_generator: Optional[torch.Generator] = None  # the train loader's, reseeded every epoch
    epoch_clock: tuple = (0.0, 0.0)  # (perf_counter at the epoch's start here, seconds carried from a checkpoint)

    @property
    def ckpt_root(self) -> str:
        return os.path.join(self.output_dir, CHECKPOINTS_DIR)

    def forward_context(self):
        if self.config.recompute_weights and self.frozen:
            return recompute_masked_weights(self.unwrapped)
        return contextlib.nullcontext()


# -- before anything trains --------------------------------------------------------------
def _check_before_start(model: nn.Module, config: TrainConfig) -> None:
    frozen = is_frozen(model)
    if config.push_to_hub and not frozen:
        raise RunConfigError("push_to_hub needs a frozen model (a ticket); weight training saves model.safetensors")
    check_trackers(config.log_with)
    if frozen and config.save_ticket:
        resolve_architecture(model, config.architecture)  # a ticket that cannot be saved fails now


def _make_accelerator(config: TrainConfig, output_dir: str, frozen: bool,
                      accum_note: Optional[str] = None) -> Accelerator:
    precision, note = resolve_mixed_precision(config.mixed_precision)
    # A frozen model's buffers (random weights, codes, masks: 4.26 MB a step for resnet18_cifar at
    # width 0.25) are regenerated identically on every process, so DDP need not broadcast them
    # from rank 0 before each forward; BatchNorm statistics are averaged instead (_run_epoch).
    handlers = [DistributedDataParallelKwargs(broadcast_buffers=False)] if frozen else []
    accelerator = Accelerator(
        # A plugin, not gradient_accumulation_steps=: Accelerate would let the launcher's env var replace that.
        mixed_precision=precision, gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=config.grad_accum_steps),
        cpu=config.cpu, step_scheduler_with_optimizer=False, kwargs_handlers=handlers,
        log_with=[JSONLTracker(os.path.join(output_dir, METRICS_FILE)), *config.log_with],
        project_config=ProjectConfiguration(project_dir=output_dir, logging_dir=os.path.join(output_dir, "logs")))
    if accelerator.num_processes == 1 and os.environ.get("MASTER_ADDR") and "WORLD_SIZE" not in os.environ \
            and os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        warnings.warn("accelerate launch --cpu --num_processes N starts ONE process unless MPI is set up "
                      "(--mpirun_hostfile); for N CPU processes use torchrun: accelerate launch --multi_gpu "
                      "--num_processes N <recipe> --cpu")
    check_precision_on_device(accelerator.mixed_precision, accelerator.device.type, config.cpu,
                              config.mixed_precision)
    if config.deterministic:  # Accelerate turns TF32 matmuls on for a dynamo backend without mixed precision
        set_deterministic_flags()
    for line in (note, accum_note):
        if line:
            accelerator.print(line)
    return accelerator


def _identity(model: nn.Module, config: TrainConfig, run_info: dict, accelerator, sets: tuple) -> dict:
    """What a checkpoint must share with the run that resumes it (stored in run_config.json)."""
    def size(ds):
        return None if ds is None else len(ds.dataset) if isinstance(ds, DataLoader) else len(ds)

    train_set, val_set, test_set = sets
    train = {k: v for k, v in config.to_dict().items() if k not in VOLATILE_FIELDS}
    train["mixed_precision"] = accelerator.mixed_precision  # in effect (the launcher's if config says None)
    return jsonable({
        "train": train, "run": run_info, "model": model_fingerprint(model),
        "num_processes": accelerator.num_processes,
        "data": {"train": size(train_set), "val": size(val_set), "test": size(test_set)},
    })


def _prepare(accelerator, model: nn.Module, config: TrainConfig, task, loaders: list, output_dir: str) -> _Run:
    """Optimizer and schedule, then everything through ``accelerator.prepare``."""
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config)
    generator = getattr(loaders[0], "fslt_epoch_generator", None)
    # timm's scheduler is no torch LRScheduler: prepare leaves it as is (stepped by the loop, once an
    # epoch, whatever the number of processes) and _start_state registers it for checkpointing.
    prepared = accelerator.prepare(model, optimizer, *loaders)
    model, optimizer, train_loader, val_loader = prepared[:4]
    unwrapped = accelerator.unwrap_model(model)
    if is_frozen(unwrapped):  # (TrainConfig(check_finite=False) turns off the scores' check too)
        get_group(unwrapped).check_finite = config.check_finite
    return _Run(config=config, task=task, accelerator=accelerator, model=model, unwrapped=unwrapped,
                optimizer=optimizer, scheduler=scheduler, train_loader=train_loader, val_loader=val_loader,
                test_loader=prepared[4] if len(loaders) == 3 else None, output_dir=output_dir,
                frozen=is_frozen(unwrapped), static=static_keys(unwrapped),
                show=config.progress and accelerator.is_main_process, loader_generator=generator)


def _start_state(run: _Run, resume_from: Optional[str]) -> TrainState:
    """A fresh ``TrainState``, or the checkpoint's (with metrics.jsonl rewound to it)."""
    accelerator, output_dir = run.accelerator, run.output_dir
    state = TrainState()
    accelerator.register_for_checkpointing(state)  # custom_checkpoint_0.pkl
    accelerator.register_for_checkpointing(run.scheduler)  # custom_checkpoint_1.pkl
    if resume_from is not None:
        load_checkpoint(accelerator, run.unwrapped, resume_from)
        if accelerator.is_main_process:
            # stacklevel 3 from here (_start_state < train < its caller): the warning names the caller's line
            rewind_metrics_for_resume(os.path.join(output_dir, METRICS_FILE), state.global_step, stacklevel=3)
        accelerator.print(f"resumed from {resume_from} after epoch {state.epoch}")
    elif accelerator.is_main_process and run.config.overwrite:
        for stale in (os.path.join(output_dir, CHECKPOINTS_DIR), os.path.join(output_dir, RESULTS_FILE),
                      os.path.join(output_dir, METRICS_FILE)):
            if os.path.isdir(stale):
                shutil.rmtree(stale)
            elif os.path.exists(stale):
                os.remove(stale)
    accelerator.wait_for_everyone()
    return state


# -- one epoch ----------------------------------------------------------------------------
def _run_epoch(run: _Run, state: TrainState) -> None:
    epoch = state.epoch
    run.epoch_clock = (time.perf_counter(), state.epoch_elapsed)  # a mid-epoch checkpoint carries its time
    lr, train_loss = _train_pass(run, state, epoch)
    if run.frozen:  # DDP did not broadcast buffers: average BatchNorm statistics before val and checkpoint
        average_batchnorm_stats(run.accelerator, run.model)
    _validate_and_record(run, state, epoch, lr, train_loss)
    state.elapsed += _epoch_seconds(run)
    state.end_epoch()


def _epoch_seconds(run: _Run) -> float:
    started, carried = run.epoch_clock
    return carried + time.perf_counter() - started


def _start_epoch_data(run: _Run, epoch: int) -> None:
    """The epoch's data order, worker seeds and per-sample augmentation seeds: pure functions of
    the seed and the epoch, however the run got here (fresh, or resumed mid-epoch)."""
    if hasattr(run.train_loader, "set_epoch"):
        run.train_loader.set_epoch(epoch)
    if run.loader_generator is not None:
        run.loader_generator.manual_seed(epoch_seed(run.config.seed, epoch))
    dataset = getattr(run.train_loader, "dataset", None)
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)


def _train_pass(run: _Run, state: TrainState, epoch: int) -> tuple[float, float]:
    """The epoch's optimizer steps; returns its learning rate and mean train loss (all processes).

    Resumed from a mid-epoch checkpoint, it skips the batches already trained
    (``accelerator.skip_first_batches``) and continues each process's loss sum and
    BatchNorm statistics where the checkpoint left them."""
    accelerator = run.accelerator
    _start_epoch_data(run, epoch)
    run.model.train()
    skip, rank = state.batches_in_epoch, accelerator.process_index
    loader = accelerator.skip_first_batches(run.train_loader, skip) if skip else run.train_loader
    carried = state.epoch_loss_sums[rank] if skip and state.epoch_loss_sums else 0.0
    if skip and state.process_batchnorm:
        load_batchnorm_vector(run.unwrapped, state.process_batchnorm[rank])
    loss_sum = torch.tensor(carried, dtype=torch.float64, device=accelerator.device)
    n_batches, total = skip, len(run.train_loader)
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{run.config.epochs}", leave=False, initial=skip, total=total,
               dynamic_ncols=True, disable=not run.show)
    for batch in bar:
        loss = _train_step(run, state, batch, epoch)
        loss_sum += loss.detach().double()
        n_batches += 1
        if accelerator.sync_gradients:  # an optimizer step happened (the last of grad_accum_steps)
            _after_optimizer_step(run, state, loss, bar, loss_sum)
            every = run.config.checkpoint_every_steps
            if every and state.global_step % every == 0 and n_batches < total:
                _save_mid_epoch(run, state, n_batches, loss_sum)
    check_running_loss(run.config, loss_sum, run.unwrapped, state)
    lr = run.optimizer.param_groups[0]["lr"]
    run.scheduler.step(epoch + 1)  # timm's scheduler: the learning rate of the next epoch
    totals = accelerator.reduce(torch.stack([loss_sum, torch.tensor(
        float(n_batches), dtype=torch.float64, device=accelerator.device)]), "sum")
    return lr, float(totals[0] / totals[1].clamp(min=1))


def _save_mid_epoch(run: _Run, state: TrainState, n_batches: int, loss_sum: torch.Tensor) -> None:
    """A checkpoint inside the epoch (``checkpoint_every_steps``): where the epoch stands, and each
    process's partial loss sum and (frozen, several processes) BatchNorm statistics, gathered."""
    accelerator = run.accelerator
    state.batches_in_epoch = n_batches
    state.epoch_loss_sums = [float(v) for v in accelerator.gather(loss_sum.detach().reshape(1)).cpu()]
    state.process_batchnorm = []
    if run.frozen and accelerator.num_processes > 1:
        local = batchnorm_vector(run.unwrapped).to(accelerator.device)
        state.process_batchnorm = list(accelerator.gather(local).view(accelerator.num_processes, -1).cpu())
    state.epoch_elapsed = _epoch_seconds(run)
    save_checkpoint(accelerator, run.ckpt_root, state, run.identity, run.config.keep_checkpoints, run.resume_from)
    run.model.train()


def _train_step(run: _Run, state: TrainState, batch, epoch: int) -> torch.Tensor:
    with run.accelerator.accumulate(run.model):
        with run.forward_context():
            loss = run.task.loss(run.model, batch)
        if run.config.check_finite and loss.device.type == "cpu" and not bool(torch.isfinite(loss.detach())):
            raise FloatingPointError(nonfinite_message(run.unwrapped, loss, state, epoch))
        run.accelerator.backward(loss)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    return loss


def _after_optimizer_step(run: _Run, state: TrainState, loss: torch.Tensor, bar, loss_sum: torch.Tensor) -> None:
    config = run.config
    state.global_step += 1
    if state.global_step % config.log_every == 0:
        value = float(loss.detach())
        check_running_loss(config, loss_sum, run.unwrapped, state)
        bar.set_postfix(loss=f"{value:.4f}")
        run.accelerator.log({"train/step_loss": value, "lr": run.optimizer.param_groups[0]["lr"]},
                            step=state.global_step)
    if config.check_sync_every and state.global_step % config.check_sync_every == 0:
        check_masks_in_sync(run.accelerator, run.model)
        run.sync_checks += 1


def _validate_and_record(run: _Run, state: TrainState, epoch: int, lr: float, train_loss: float) -> None:
    """Validate, check the masks agree, keep the best model, log and print the epoch."""
    accelerator = run.accelerator
    run.model.eval()
    val = run.task.evaluate(run.model, run.val_loader, accelerator, desc="val", progress=run.show)
    check_masks_in_sync(accelerator, run.model)
    record = {"epoch": epoch + 1, "step": state.global_step, "lr": lr, "train_loss": train_loss,
              "val_acc": val["acc"], "val_loss": val["loss"]}
    if run.frozen:
        record["sparsity"] = current_sparsity(run.unwrapped)
    state.history.append(record)
    if state.best_val is None or val["acc"] > state.best_val["acc"]:
        state.best_val, state.best_epoch = dict(val), epoch + 1
        state.best_state = snapshot(run.unwrapped, run.static)
    state.epoch = epoch + 1
    accelerator.log({k.replace("_", "/", 1) if k.startswith(("train_", "val_")) else k: v
                     for k, v in record.items() if k != "step"}, step=state.global_step)
    accelerator.print(f"epoch {epoch + 1}/{run.config.epochs}: train loss {train_loss:.4f}  "
                      f"val acc {val['acc']:.4f}  (best {state.best_val['acc']:.4f} @ {state.best_epoch})")


# -- the best-val model, tested -------------------------------------------------------------
def _finish(run: _Run, state: TrainState, run_info: dict) -> dict:
    """Restore the best-val model, test it, save the ticket (or model) and results.json."""
    accelerator, config = run.accelerator, run.config
    started = time.perf_counter()
    if state.best_state:
        restore(run.unwrapped, state.best_state, run.static)
    run.model.eval()
    test = (run.task.evaluate(run.model, run.test_loader, accelerator, desc="test", progress=run.show)
            if run.test_loader else None)
    digests = check_masks_in_sync(accelerator, run.model)
    results = {
        "completed": True,
        "method": run_info.get("method", "ticket" if run.frozen else "weights"),
        "accuracy": {"val": state.best_val["acc"] if state.best_val else None,
                     "test": test["acc"] if test else None},
        "val": state.best_val, "test": test, "best_epoch": state.best_epoch, "epochs": config.epochs,
        "global_steps": state.global_step, "history": state.history, "mask_digests": digests,
        "step_sync_checks": run.sync_checks, "num_processes": accelerator.num_processes, "run": run_info,
        "mixed_precision": accelerator.mixed_precision,
        "batchnorm_digests": batchnorm_digests(accelerator, run.model) if run.frozen else None,
        "config": config.to_dict(), "output_dir": run.output_dir,
        **size_results(run.unwrapped, run.frozen),
    }
    save_outputs(accelerator, run.model, results, config, run.output_dir, run.frozen)
    results["wall_time_s"] = state.elapsed + time.perf_counter() - started
    if accelerator.is_main_process:
        write_json_atomic(os.path.join(run.output_dir, RESULTS_FILE), results)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results
