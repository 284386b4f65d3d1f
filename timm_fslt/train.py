"""The one training loop of timm_fslt, built on Hugging Face Accelerate.

    from timm_fslt.train import TrainConfig, train
    results = train(model, train_set, val_set, test_set, TrainConfig(epochs=10, lr=0.1))

``model`` is either a frozen model (``timm_fslt.freeze``: Edge-Popup searches the
scores, nothing else trains) or an ordinary model (weight training, the paper's
upper reference).  Only parameters with ``requires_grad`` reach the optimizer.

The loop runs unchanged on one CPU, one GPU or many processes (``accelerate
launch``): mixed precision, gradient accumulation, a checkpoint after every epoch
(written to a temporary folder, then renamed) and ``resume`` that continues a
killed run exactly (model, scores, optimizer, scheduler, RNG states and the
epoch's data order, which is a pure function of the seed and the epoch).  The
model with the best validation accuracy is kept and evaluated on the test set at
the end; ``results.json``, the metrics JSONL and the ticket land in ``output_dir``.

A ``task`` tells the loop what a batch is: ``ClassificationTask`` (image batches
``(x, y)``) or ``NodeClassificationTask`` (the whole graph, full-graph training).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from accelerate.tracking import GeneralTracker

from .data import EpochShuffleSampler, first_item
from .core import recompute_masked_weights

OPTIMIZERS = ("sgd", "adamw")
SCHEDULERS = ("cosine", "constant")
MIXED_PRECISION = ("no", "fp16", "bf16")
CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
RUN_CONFIG_FILE = "run_config.json"
RESULTS_FILE = "results.json"
METRICS_FILE = "metrics.jsonl"
TICKET_DIR = "ticket"

# TrainConfig fields that do not change what a run computes; a resumed run may change them.
_VOLATILE_FIELDS = ("check_finite", "check_sync_every", "recompute_weights", "output_dir", "resume", "overwrite", "keep_checkpoints", "stop_after", "log_with",
                    "project_name", "progress", "log_every", "save_ticket", "push_to_hub", "hub_private",
                    "num_workers", "cpu", "architecture", "dataset_ids")


@dataclass
class TrainConfig:
    """Settings of one run; the defaults are the paper's CIFAR-10 ResNet-18 score search.

    batch_size is the global batch (all processes and accumulation steps together),
    so a run computes the same thing on 1 or 8 GPUs; it must be divisible by
    ``num_processes * grad_accum_steps``.  ``resume``: False (a fresh run; refuses an
    output_dir that already holds checkpoints unless ``overwrite``), True (continue
    from the latest checkpoint in output_dir), ``"auto"`` (continue if there is one)
    or the path of a checkpoint folder.  ``stop_after``: stop after that many epochs
    in this invocation (for time-limited jobs; continue with ``resume``).
    ``limit_train_batches`` / ``limit_eval_batches`` shorten each epoch (per process).
    ``check_finite``: stop with ``FloatingPointError`` at the first non-finite loss,
    naming the layers whose scores went non-finite (costs one device sync per step).
    ``check_sync_every``: also verify every N optimizer steps that all processes hold
    identical masks (0: once per epoch, which always happens).
    ``recompute_weights``: run each forward inside ``timm_fslt.recompute_masked_weights``
    (the backward rebuilds each layer's ``W * mask`` instead of keeping it: 4 bytes
    less per weight at the peak, one elementwise product more per layer, the same
    gradients); no effect on a model that is not frozen.
    """

    output_dir: str = "runs/fslt"
    epochs: int = 100
    batch_size: int = 128
    eval_batch_size: Optional[int] = None
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False
    scheduler: str = "cosine"
    warmup_epochs: int = 0
    label_smoothing: float = 0.0
    grad_accum_steps: int = 1
    mixed_precision: str = "no"
    seed: int = 0
    num_workers: int = 0
    limit_train_batches: Optional[int] = None
    limit_eval_batches: Optional[int] = None
    resume: Union[bool, str] = False
    overwrite: bool = False
    keep_checkpoints: int = 1
    stop_after: Optional[int] = None
    log_with: Sequence[str] = ()
    log_every: int = 50
    project_name: str = "timm_fslt"
    progress: bool = True
    save_ticket: bool = True
    architecture: Optional[Any] = None
    dataset_ids: Sequence[str] = ()
    push_to_hub: Optional[str] = None
    hub_private: bool = False
    cpu: bool = False
    check_finite: bool = True
    check_sync_every: int = 0
    recompute_weights: bool = False

    def __post_init__(self):
        self.log_with = tuple(self.log_with or ())
        self.dataset_ids = tuple(self.dataset_ids or ())
        self.validate()

    def validate(self) -> None:
        def positive_int(name, allow_none=False):
            value = getattr(self, name)
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")

        for name in ("epochs", "batch_size", "grad_accum_steps", "keep_checkpoints", "log_every"):
            positive_int(name)
        for name in ("eval_batch_size", "limit_train_batches", "limit_eval_batches", "stop_after"):
            positive_int(name, allow_none=True)
        for name, allowed in (("optimizer", OPTIMIZERS), ("scheduler", SCHEDULERS),
                              ("mixed_precision", MIXED_PRECISION)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        for name in ("lr", "momentum", "weight_decay", "label_smoothing"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(f"warmup_epochs must lie in [0, epochs), got {self.warmup_epochs}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if isinstance(self.check_sync_every, bool) or not isinstance(self.check_sync_every, int) \
                or self.check_sync_every < 0:
            raise ValueError(f"check_sync_every must be an int >= 0 (0: once per epoch), got {self.check_sync_every!r}")
        if self.limit_train_batches is not None and self.limit_train_batches % self.grad_accum_steps:
            raise ValueError(f"limit_train_batches ({self.limit_train_batches}) must be a multiple of "
                             f"grad_accum_steps ({self.grad_accum_steps}) so each epoch ends on an optimizer step")
        for name in ("nesterov", "overwrite", "progress", "save_ticket", "hub_private", "cpu", "check_finite",
                     "recompute_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not (isinstance(self.resume, bool) or isinstance(self.resume, (str, os.PathLike))):
            raise ValueError(f"resume must be False, True, 'auto' or a checkpoint path, got {self.resume!r}")

    def to_dict(self) -> dict:
        return _jsonable(dataclasses.asdict(self))


class RunConfigError(ValueError):
    """A run cannot start as configured (e.g. resuming a checkpoint of another configuration)."""


# -- tasks -----------------------------------------------------------------------------
class ClassificationTask:
    """Batches ``(images, labels)``; accuracy over the whole (sharded) eval set."""

    batched = True
    collate_fn: Optional[Callable] = None

    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = label_smoothing

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x).float(), y, label_smoothing=self.label_smoothing)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader, accelerator, desc: str = "eval", progress: bool = True) -> dict:
        from tqdm.auto import tqdm

        correct, total, loss_sum = 0, 0, 0.0
        for x, y in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True,
                         disable=not (progress and accelerator.is_main_process)):
            logits = model(x).float()
            losses = F.cross_entropy(logits, y, reduction="none")
            # gather_for_metrics drops the samples repeated to even out the last batch.
            pred, y, losses = accelerator.gather_for_metrics((logits.argmax(-1), y, losses))
            correct += int((pred == y).sum())
            total += int(y.numel())
            loss_sum += float(losses.double().sum())
        return {"acc": correct / max(total, 1), "loss": loss_sum / max(total, 1), "n": total}


class NodeClassificationTask:
    """Full-graph node classification: every batch is the whole graph plus one split's nodes.

    ``evaluator`` is ogb's ``Evaluator`` (anything with ``eval({"y_true", "y_pred"})``
    returning ``{"acc": ...}``); without one, plain accuracy.  Every process holds
    the whole graph, so evaluation needs no gathering.
    """

    batched = False
    collate_fn = staticmethod(first_item)

    def __init__(self, evaluator=None, label_smoothing: float = 0.0):
        self.evaluator = evaluator
        self.label_smoothing = label_smoothing

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        out = model(batch["x"], batch["edge_index"]).float()
        index = batch["index"]
        return F.cross_entropy(out[index], batch["y"][index], label_smoothing=self.label_smoothing)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader, accelerator, desc: str = "eval", progress: bool = True) -> dict:
        batch = next(iter(loader))
        out = model(batch["x"], batch["edge_index"]).float()
        index = batch["index"]
        y_true = batch["y"][index].view(-1, 1)
        y_pred = out[index].argmax(-1, keepdim=True)
        if self.evaluator is not None:
            acc = float(self.evaluator.eval({"y_true": y_true.cpu(), "y_pred": y_pred.cpu()})["acc"])
        else:
            acc = float((y_true == y_pred).double().mean())
        loss = float(F.cross_entropy(out[index].double(), y_true.view(-1)))
        return {"acc": acc, "loss": loss, "n": int(index.numel())}


# -- metrics tracker -------------------------------------------------------------------
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
            f.write(json.dumps(_jsonable(record), sort_keys=True) + "\n")

    def store_init_configuration(self, values: dict) -> None:
        self._write({"event": "config", "time": time.time(), "config": values})

    def log(self, values: dict, step: Optional[int] = None, **kwargs) -> None:
        self._write({"event": "metrics", "time": time.time(), "step": step, **values})


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def rewind_metrics(path: str, step: int) -> None:
    """Drop the metrics a killed run logged after its last checkpoint (and a torn last line).

    A resumed run recomputes those steps exactly, so without this the log would
    hold them twice; with it, the log of an interrupted-and-resumed run has the
    same metric records as an uninterrupted one.
    """
    if not os.path.exists(path):
        return
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut short by the kill
            if record.get("event") == "metrics" and isinstance(record.get("step"), int) and record["step"] > step:
                continue
            kept.append(json.dumps(record, sort_keys=True) + "\n")
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(tmp, path)


# -- mask agreement across processes ---------------------------------------------------
def mask_digest(model: nn.Module) -> str:
    """sha256 of a frozen model's current masks (of an ordinary model: its parameters)."""
    h = hashlib.sha256()
    group = getattr(model, "_fslt_group", None)
    if group is not None:
        group.refresh()
        for layer in group.layers:
            mask = layer.mask.detach().to("cpu").contiguous()
            h.update(f"{layer.layer_name}:{tuple(mask.shape)}".encode())
            h.update(mask.view(torch.uint8).numpy().tobytes())
    else:
        for name, param in model.named_parameters():
            h.update(f"{name}:{tuple(param.shape)}".encode())
            h.update(param.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_masks_in_sync(accelerator, model: nn.Module) -> list[str]:
    """All-gather every process's ``mask_digest`` and fail loudly unless they agree.

    Scores stay identical because DDP averages their gradients; the global
    threshold (hence every mask) is then identical too.  This checks it.
    Returns the digests, one per process.
    """
    digest = mask_digest(accelerator.unwrap_model(model))
    local = torch.tensor(list(bytes.fromhex(digest)), dtype=torch.int64, device=accelerator.device)
    rows = accelerator.gather(local).view(accelerator.num_processes, -1).cpu()
    digests = [bytes(row.tolist()).hex() for row in rows]
    if len(set(digests)) != 1:
        raise RuntimeError("supermasks differ between processes (the global threshold must be identical "
                           f"everywhere): digests per process {digests}")
    return digests


def _nonfinite_message(model: nn.Module, loss: torch.Tensor, state, epoch: int) -> str:
    bad = [name for name, p in model.named_parameters()
           if p.requires_grad and not bool(torch.isfinite(p.detach()).all())]
    where = (f"non-finite values in {', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}" if bad else
             "every trainable tensor is finite, so the inputs or the learning rate are the likely cause")
    return (f"loss is {float(loss.detach())} at step {state.global_step + 1} (epoch {epoch + 1}): {where}. "
            "Lower the learning rate or check the data; resume from the last checkpoint with --resume. "
            "(TrainConfig(check_finite=False) turns this check off.)")


# -- checkpointed state ----------------------------------------------------------------
class TrainState:
    """Progress of a run that Accelerate stores with each checkpoint."""

    def __init__(self):
        self.epoch = 0
        self.global_step = 0
        self.best_val: Optional[dict] = None
        self.best_epoch = 0
        self.best_state: dict = {}
        self.history: list = []
        self.elapsed = 0.0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "global_step": self.global_step, "best_val": self.best_val,
                "best_epoch": self.best_epoch, "best_state": self.best_state, "history": self.history,
                "elapsed": self.elapsed}

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class _Schedule:
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


def _static_keys(model: nn.Module) -> set:
    """State-dict keys that never change while training (random weights, frozen codes)."""
    from .layers import iter_frozen

    keys = set()
    for name, _ in iter_frozen(model):
        prefix = f"{name}." if name else ""
        keys.add(prefix + "parametrizations.weight.original")
        keys.add(prefix + "parametrizations.weight.0.frozen")
    return keys


def _snapshot(model: nn.Module, static: set) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items() if k not in static}


def _restore(model: nn.Module, state: dict, static: set) -> None:
    result = model.load_state_dict(state, strict=False)
    missing = set(result.missing_keys) - static
    if missing or result.unexpected_keys:
        raise RuntimeError(f"best-model state does not fit the model: missing {sorted(missing)}, "
                           f"unexpected {sorted(result.unexpected_keys)}")


# -- helpers ---------------------------------------------------------------------------
def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return str(value)


def _flat(prefix: str, value, out: dict) -> dict:
    """Flatten nested config into scalar hparams (tensorboard accepts no lists or None)."""
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix}/{k}" if prefix else str(k), v, out)
    elif isinstance(value, (int, float, str, bool)):
        out[prefix] = value
    else:
        out[prefix] = json.dumps(value)
    return out


def write_json_atomic(path: str, payload) -> None:
    """Write JSON to ``path`` through a temporary file and a rename (never half-written)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(_jsonable(payload), f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def _config_differences(stored, current, prefix="") -> list[str]:
    if isinstance(stored, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(stored) | set(current)):
            name = f"{prefix}.{key}" if prefix else key
            if key not in stored or key not in current:
                out.append(f"{name}: {stored.get(key, '<absent>')!r} (checkpoint) != "
                           f"{current.get(key, '<absent>')!r} (now)")
            else:
                out += _config_differences(stored[key], current[key], name)
        return out
    return [] if stored == current else [f"{prefix}: {stored!r} (checkpoint) != {current!r} (now)"]


def latest_checkpoint(output_dir: str) -> Optional[str]:
    """Path of the newest complete checkpoint of a run, or None."""
    pointer = os.path.join(output_dir, CHECKPOINTS_DIR, LATEST_FILE)
    if not os.path.exists(pointer):
        return None
    with open(pointer, encoding="utf-8") as f:
        name = f.read().strip()
    path = os.path.join(output_dir, CHECKPOINTS_DIR, name)
    return path if os.path.isdir(path) else None


def model_fingerprint(model: nn.Module) -> dict:
    config = getattr(model, "fslt_config", None)
    return {"class": type(model).__name__,
            "params": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "freeze": config.to_dict() if config is not None else None}


def dense_size(model: nn.Module) -> dict:
    """Storage of an ordinary (weight-trained) model: every state tensor at its precision."""
    state = model.state_dict()
    bits = sum(t.numel() * t.element_size() * 8 for t in state.values())
    return {"totals": {"params": sum(p.numel() for p in model.parameters()), "model_bits": bits,
                       "model_bytes": (bits + 7) // 8, "sparsity": 0.0}}


def _make_loader(dataset, task, batch_size: int, *, shuffle_seed: Optional[int], limit_batches: Optional[int],
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
        return DataLoader(dataset, sampler=sampler, **common)
    if limit is not None and limit < len(dataset):
        dataset = Subset(dataset, range(limit))
    return DataLoader(dataset, shuffle=False, **common)


def _check_trackers(names: Sequence[str]) -> None:
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, _available_trackers

    available = {str(getattr(t, "value", t)) for t in _available_trackers}
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise RunConfigError(f"log_with: unknown tracker {name!r}; choose from {sorted(LOGGER_TYPE_TO_CLASS)} "
                             "(metrics always go to metrics.jsonl as well)")
        if name not in available:
            # Accelerate would drop it silently; say so instead.
            raise RunConfigError(f"log_with: tracker {name!r} is not installed (pip install {name})")


# -- the loop --------------------------------------------------------------------------
def train(model: nn.Module, train_set, val_set, test_set=None, config: Optional[TrainConfig] = None, *,
          task=None, run_info: Optional[dict] = None) -> dict:
    """Search the scores of a frozen model (or train an ordinary one); return the results.

    Args:
        model: a ``timm_fslt.freeze``-d model or an ordinary one (weight training).
        train_set, val_set, test_set: torch Datasets (the loop builds the loaders,
            with a seeded per-epoch order) or ready DataLoaders.  ``test_set`` may be
            None (no final test evaluation).
        config: ``TrainConfig``.
        task: ``ClassificationTask()`` (default) or ``NodeClassificationTask(...)``.
        run_info: what else identifies the run (model name, data source, method...);
            stored with every checkpoint and in results.json, and compared on resume.

    Returns the results dict that is also written to ``output_dir/results.json``:
    ``accuracy`` ({"val", "test"}), ``best_epoch``, ``sparsity``, ``size_report``,
    ``wall_time_s``, ``history`` (per epoch), ``mask_digests`` (one per process),
    ``ticket_dir``/``hub_url`` when saved.  With ``stop_after`` set and epochs
    left, returns early with ``completed=False`` and writes no results.json.

    A frozen model's ticket needs its architecture: build the model with
    ``timm_fslt.create_model`` (it records it) or set ``config.architecture``; this
    is checked before training.  Bad settings raise ``RunConfigError`` (a
    ValueError), ``FileExistsError`` or ``FileNotFoundError`` before anything trains.
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from tqdm.auto import tqdm

    config = config or TrainConfig()
    config = dataclasses.replace(config)  # revalidate a caller-modified config
    task = task or ClassificationTask(config.label_smoothing)
    run_info = _jsonable(dict(run_info or {}))
    frozen = getattr(model, "_fslt_group", None) is not None
    if config.push_to_hub and not frozen:
        raise RunConfigError("push_to_hub needs a frozen model (a ticket); weight training saves model.safetensors")
    _check_trackers(config.log_with)
    if frozen and config.save_ticket:
        from .ticket import resolve_architecture

        resolve_architecture(model, config.architecture)  # a ticket that cannot be saved fails now
    output_dir = os.path.abspath(os.path.expanduser(str(config.output_dir)))

    accelerator = Accelerator(
        mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.grad_accum_steps,
        cpu=config.cpu, step_scheduler_with_optimizer=False,
        log_with=[JSONLTracker(os.path.join(output_dir, METRICS_FILE)), *config.log_with],
        project_config=ProjectConfiguration(project_dir=output_dir, logging_dir=os.path.join(output_dir, "logs")))
    n_proc = accelerator.num_processes
    if n_proc == 1 and os.environ.get("MASTER_ADDR") and "WORLD_SIZE" not in os.environ \
            and os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        warnings.warn("accelerate launch --cpu --num_processes N starts ONE process unless MPI is set up "
                      "(--mpirun_hostfile); for N CPU processes use torchrun: accelerate launch --multi_gpu "
                      "--num_processes N <recipe> --cpu")
    per_step = n_proc * config.grad_accum_steps
    if task.batched and config.batch_size % per_step:
        raise RunConfigError(f"batch_size ({config.batch_size}) is the global batch and must be divisible by "
                         f"num_processes * grad_accum_steps = {n_proc} * {config.grad_accum_steps}")
    per_process_batch = config.batch_size // per_step if task.batched else 1
    eval_batch = config.eval_batch_size or per_process_batch

    def _len(ds):
        return len(ds.dataset) if isinstance(ds, DataLoader) else len(ds)

    identity = {
        "train": {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_FIELDS},
        "run": run_info, "model": model_fingerprint(model), "num_processes": n_proc,
        "data": {"train": _len(train_set), "val": _len(val_set),
                 "test": None if test_set is None else _len(test_set)},
    }
    identity = _jsonable(identity)

    # -- decide fresh start or resume before anything trains -----------------------
    ckpt_root = os.path.join(output_dir, CHECKPOINTS_DIR)
    resume_from = None
    if config.resume is True or config.resume == "auto":
        resume_from = latest_checkpoint(output_dir)
        if resume_from is None and config.resume is True:
            raise FileNotFoundError(f"resume: no checkpoint to resume in {output_dir!r} "
                                    f"(expected {CHECKPOINTS_DIR}/{LATEST_FILE}); start without resume")
    elif config.resume:
        resume_from = os.path.abspath(os.path.expanduser(str(config.resume)))
        if not os.path.isfile(os.path.join(resume_from, RUN_CONFIG_FILE)):
            raise FileNotFoundError(f"resume: {resume_from!r} is not a checkpoint folder "
                                    f"(no {RUN_CONFIG_FILE})")
    if resume_from is not None:
        with open(os.path.join(resume_from, RUN_CONFIG_FILE), encoding="utf-8") as f:
            stored = json.load(f)
        diffs = _config_differences(stored.get("identity", {}), identity)
        if diffs:
            raise RunConfigError(f"resume: the checkpoint {resume_from!r} belongs to a different configuration: "
                             + "; ".join(diffs) + ". Resume with the same settings, or use a new output dir.")
    elif not config.overwrite:
        clashes = [p for p in (latest_checkpoint(output_dir), os.path.join(output_dir, RESULTS_FILE))
                   if p and os.path.exists(p)]
        if clashes:
            raise FileExistsError(f"output_dir {output_dir!r} already holds a run ({clashes[0]}); pass "
                                  "resume (--resume) to continue it or overwrite (--overwrite) to start over")

    set_seed(config.seed, device_specific=True)
    pin = accelerator.device.type == "cuda"
    loaders = [
        _make_loader(train_set, task, per_process_batch, shuffle_seed=config.seed,
                     limit_batches=config.limit_train_batches, num_processes=n_proc,
                     num_workers=config.num_workers, pin_memory=pin),
        _make_loader(val_set, task, eval_batch, shuffle_seed=None, limit_batches=config.limit_eval_batches,
                     num_processes=n_proc, num_workers=config.num_workers, pin_memory=pin),
    ]
    if test_set is not None:
        loaders.append(_make_loader(test_set, task, eval_batch, shuffle_seed=None,
                                    limit_batches=config.limit_eval_batches, num_processes=n_proc,
                                    num_workers=config.num_workers, pin_memory=pin))
    optimizer = build_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _Schedule(config.scheduler, config.epochs, config.warmup_epochs))
    prepared = accelerator.prepare(model, optimizer, *loaders, scheduler)
    model, optimizer, train_loader, val_loader = prepared[:4]
    test_loader = prepared[4] if test_set is not None else None
    scheduler = prepared[-1]
    unwrapped = accelerator.unwrap_model(model)
    frozen = getattr(unwrapped, "_fslt_group", None) is not None
    recompute = ((lambda: recompute_masked_weights(unwrapped)) if config.recompute_weights and frozen
                 else contextlib.nullcontext)
    static = _static_keys(unwrapped)

    state = TrainState()
    accelerator.register_for_checkpointing(state)
    if resume_from is not None:
        _check_checkpoint_keys(model, resume_from)
        accelerator.load_state(resume_from)
        if accelerator.is_main_process:
            rewind_metrics(os.path.join(output_dir, METRICS_FILE), state.global_step)
        accelerator.print(f"resumed from {resume_from} after epoch {state.epoch}")
    elif accelerator.is_main_process and config.overwrite:
        for stale in (ckpt_root, os.path.join(output_dir, RESULTS_FILE), os.path.join(output_dir, METRICS_FILE)):
            if os.path.isdir(stale):
                shutil.rmtree(stale)
            elif os.path.exists(stale):
                os.remove(stale)
    accelerator.wait_for_everyone()
    accelerator.init_trackers(config.project_name, config=_flat("", {"identity": identity}, {}))

    show = config.progress and accelerator.is_main_process
    digests = check_masks_in_sync(accelerator, model)
    sync_checks = 0  # per-step checks of this invocation (the per-epoch ones always run)
    epochs_this_call = 0
    while state.epoch < config.epochs:
        if config.stop_after is not None and epochs_this_call >= config.stop_after:
            accelerator.end_training()
            return {"completed": False, "stopped_after_epoch": state.epoch, "history": state.history,
                    "output_dir": output_dir}
        epoch, started = state.epoch, time.perf_counter()
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(epoch)
        model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
        n_batches = 0
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False,
                   dynamic_ncols=True, disable=not show)
        for batch in bar:
            with accelerator.accumulate(model):
                with recompute():
                    loss = task.loss(model, batch)
                if config.check_finite and not bool(torch.isfinite(loss.detach())):
                    raise FloatingPointError(_nonfinite_message(unwrapped, loss, state, epoch))
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach().double()
            n_batches += 1
            if accelerator.sync_gradients:
                state.global_step += 1
                if state.global_step % config.log_every == 0:
                    value = float(loss.detach())
                    bar.set_postfix(loss=f"{value:.4f}")
                    accelerator.log({"train/step_loss": value, "lr": scheduler.get_last_lr()[0]},
                                    step=state.global_step)
                if config.check_sync_every and state.global_step % config.check_sync_every == 0:
                    check_masks_in_sync(accelerator, model)
                    sync_checks += 1
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        totals = accelerator.reduce(torch.stack([loss_sum, torch.tensor(
            float(n_batches), dtype=torch.float64, device=accelerator.device)]), "sum")
        train_loss = float(totals[0] / totals[1].clamp(min=1))
        model.eval()
        val = task.evaluate(model, val_loader, accelerator, desc="val", progress=show)
        digests = check_masks_in_sync(accelerator, model)
        record = {"epoch": epoch + 1, "step": state.global_step, "lr": lr, "train_loss": train_loss,
                  "val_acc": val["acc"], "val_loss": val["loss"]}
        if frozen:
            record["sparsity"] = _current_sparsity(unwrapped)
        state.history.append(record)
        if state.best_val is None or val["acc"] > state.best_val["acc"]:
            state.best_val, state.best_epoch = dict(val), epoch + 1
            state.best_state = _snapshot(unwrapped, static)
        state.epoch = epoch + 1
        state.elapsed += time.perf_counter() - started
        accelerator.log({k.replace("_", "/", 1) if k.startswith(("train_", "val_")) else k: v
                         for k, v in record.items() if k != "step"}, step=state.global_step)
        accelerator.print(f"epoch {epoch + 1}/{config.epochs}: train loss {train_loss:.4f}  "
                          f"val acc {val['acc']:.4f}  (best {state.best_val['acc']:.4f} @ {state.best_epoch})")
        _save_checkpoint(accelerator, ckpt_root, state.epoch, identity, config.keep_checkpoints)
        epochs_this_call += 1

    # -- the best-val model, tested ----------------------------------------------------
    started = time.perf_counter()
    if state.best_state:
        _restore(unwrapped, state.best_state, static)
    model.eval()
    test = task.evaluate(model, test_loader, accelerator, desc="test", progress=show) if test_loader else None
    digests = check_masks_in_sync(accelerator, model)
    results = {
        "completed": True,
        "method": run_info.get("method", "ticket" if frozen else "weights"),
        "accuracy": {"val": state.best_val["acc"] if state.best_val else None,
                     "test": test["acc"] if test else None},
        "val": state.best_val, "test": test, "best_epoch": state.best_epoch, "epochs": config.epochs,
        "global_steps": state.global_step, "history": state.history, "mask_digests": digests,
        "step_sync_checks": sync_checks,
        "num_processes": n_proc, "run": run_info, "config": config.to_dict(), "output_dir": output_dir,
    }
    if frozen:
        from .report import size_report

        report = size_report(unwrapped)
        results["sparsity"] = report.sparsity
        results["size_report"] = report.to_dict()
    else:
        results["sparsity"] = 0.0
        results["size_report"] = dense_size(unwrapped)
    if accelerator.is_main_process:
        _save_outputs(unwrapped, results, config, output_dir, frozen, test)
    results["wall_time_s"] = state.elapsed + time.perf_counter() - started
    if accelerator.is_main_process:
        write_json_atomic(os.path.join(output_dir, RESULTS_FILE), results)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


def _check_checkpoint_keys(model: nn.Module, checkpoint: str) -> None:
    from safetensors import safe_open

    path = os.path.join(checkpoint, "model.safetensors")
    if not os.path.exists(path):
        raise FileNotFoundError(f"resume: {checkpoint!r} has no model.safetensors")
    with safe_open(path, "pt") as f:
        stored = set(f.keys())
    expected = set(model.state_dict().keys())
    if stored != expected:
        raise RunConfigError(f"resume: the model in {checkpoint!r} does not match this model: "
                             f"missing {sorted(expected - stored)[:5]}, unexpected {sorted(stored - expected)[:5]}")


def _current_sparsity(model: nn.Module) -> float:
    group = model._fslt_group
    group.refresh()
    kept = sum(int(layer.mask.sum()) for layer in group.layers)
    total = sum(layer.mask.numel() for layer in group.layers)
    return 1.0 - kept / max(total, 1)


def _save_checkpoint(accelerator, ckpt_root: str, epoch: int, identity: dict, keep: int) -> None:
    """accelerator.save_state into a temporary folder, then rename it and move the pointer."""
    name = f"epoch_{epoch:04d}"
    tmp, final = os.path.join(ckpt_root, f".tmp-{name}"), os.path.join(ckpt_root, name)
    if accelerator.is_main_process:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)  # leftover of a run killed while writing
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json_atomic(os.path.join(tmp, RUN_CONFIG_FILE), {"identity": identity, "epoch": epoch})
        if os.path.isdir(final):
            shutil.rmtree(final)  # an orphan written after the pointer last moved
        os.replace(tmp, final)
        pointer = os.path.join(ckpt_root, LATEST_FILE)
        with open(pointer + ".tmp", "w", encoding="utf-8") as f:
            f.write(name + "\n")
        os.replace(pointer + ".tmp", pointer)
        done = sorted(d for d in os.listdir(ckpt_root) if d.startswith("epoch_"))
        for old in done[:-keep]:
            shutil.rmtree(os.path.join(ckpt_root, old))
    accelerator.wait_for_everyone()


def _save_outputs(model: nn.Module, results: dict, config: TrainConfig, output_dir: str, frozen: bool,
                  test: Optional[dict]) -> None:
    metrics = {"val_accuracy": results["accuracy"]["val"], "test_accuracy": results["accuracy"]["test"],
               "sparsity": results["sparsity"]}
    metrics = {k: float(v) for k, v in metrics.items() if v is not None}
    datasets = list(config.dataset_ids) or None
    if frozen and config.save_ticket:
        import timm_fslt  # the ticket API is exported at the top level

        ticket_dir = os.path.join(output_dir, TICKET_DIR)
        timm_fslt.save_ticket(model, ticket_dir, architecture=config.architecture, overwrite=True,
                              metrics=metrics, datasets=datasets)
        results["ticket_dir"] = ticket_dir
        if config.push_to_hub:
            info = timm_fslt.push_to_hub(ticket_dir, config.push_to_hub, private=config.hub_private,
                                         metrics=metrics, datasets=datasets)
            results["hub_url"] = str(getattr(info, "commit_url", None) or info)
    elif not frozen:
        from safetensors.torch import save_file

        path = os.path.join(output_dir, "model.safetensors")
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        save_file(tensors, path + ".tmp", metadata={k: str(v) for k, v in metrics.items()})
        os.replace(path + ".tmp", path)
        results["model_file"] = path
