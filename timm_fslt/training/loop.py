"""The one training loop of timm_fslt, built on Hugging Face Accelerate.

    from timm_fslt.training.loop import TrainConfig, train
    results = train(model, train_set, val_set, test_set, TrainConfig(epochs=10, lr=0.1))

``model`` is either a frozen model (``timm_fslt.freeze``: Edge-Popup searches the
scores, nothing else trains) or an ordinary model (weight training, the paper's
upper reference).  Only parameters with ``requires_grad`` reach the optimizer.

The loop runs unchanged on one CPU, one GPU or many processes (``accelerate
launch``): mixed precision, gradient accumulation, a checkpoint after every epoch
(written to a temporary folder, then renamed) and ``resume`` that continues a
killed run exactly (model, scores, optimizer, scheduler, RNG states and the
epoch's data order, which is a pure function of the seed and the epoch).  Each
checkpoint's run_config.json records its epoch, global step and every file's size
and sha256; resume takes the newest checkpoint that verifies (``checkpoints/latest``
is only a hint), refuses a damaged newest one unless ``resume="fallback"``, and
never starts over silently.  The model with the best validation accuracy is kept
and evaluated on the test set at the end; ``results.json``, the metrics JSONL and
the ticket land in ``output_dir``.

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

from timm_fslt.training.data import EpochShuffleSampler, first_item
from timm_fslt.frozen import recompute_masked_weights

OPTIMIZERS = ("sgd", "adamw")
SCHEDULERS = ("cosine", "constant")
MIXED_PRECISION = ("no", "fp16", "bf16")
CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
RUN_CONFIG_FILE = "run_config.json"
RESULTS_FILE = "results.json"
METRICS_FILE = "metrics.jsonl"
TICKET_DIR = "ticket"
CHECKPOINT_PREFIX = "epoch_"
# run_config.json format 2 records epoch, global_step and every file's size and sha256
# (format 1, before: identity and epoch only).
CHECKPOINT_FORMAT = 2
RESUME_MODES = ("auto", "fallback")
_MODE_LOOKALIKES = {"auto", "fallback", "true", "false", "yes", "no", "latest", "1", "0", "none"}

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
    from the newest checkpoint in output_dir), ``"auto"`` (continue if there is one,
    start fresh if there is none), ``"fallback"`` (like True, but if the newest
    checkpoint is corrupted, continue from the newest valid older one) or the path
    of a checkpoint folder.  Checkpoints are ordered by the epoch and global step
    their run_config.json records and verified (each file's size and sha256) before
    use; ``checkpoints/latest`` is only a hint.  ``stop_after``: stop after that many
    epochs in this invocation (for time-limited jobs; continue with ``resume``).
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
        self._validate_resume()

    def _validate_resume(self) -> None:
        allowed = "resume must be False, True, 'auto', 'fallback' or a checkpoint folder path"
        value = self.resume
        if isinstance(value, bool) or value in RESUME_MODES:
            return
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str):
            raise ValueError(f"{allowed}, got {self.resume!r}")
        if not value.strip():
            raise ValueError(f"{allowed}, got an empty string")
        # 'Auto', 'latest', 'true' ... would otherwise be taken for a folder and fail later, less clearly.
        if value.strip().lower() in _MODE_LOOKALIKES and not os.path.exists(os.path.expanduser(value)):
            raise ValueError(f"{allowed}, got {value!r} (not a mode, and no such folder)")

    def to_dict(self) -> dict:
        return _jsonable(dataclasses.asdict(self))


class RunConfigError(ValueError):
    """A run cannot start as configured (e.g. resuming a checkpoint of another configuration)."""


class CheckpointError(RunConfigError):
    """A checkpoint cannot be resumed (a file missing, truncated or altered), or none can.

    The message names each checkpoint folder and what is wrong with it."""


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
    from timm_fslt.nn.modules import iter_frozen

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


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a flushed temporary file and a rename (never half-written)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())  # the rename must not reach the disk before the data
    os.replace(tmp, path)


def write_json_atomic(path: str, payload) -> None:
    """Write JSON to ``path`` through a temporary file and a rename (never half-written)."""
    write_text_atomic(path, json.dumps(_jsonable(payload), indent=2, sort_keys=True) + "\n")


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


# -- checkpoint folders: what they record, whether they are intact, which is newest -----
@dataclass
class CheckpointInfo:
    """One ``checkpoints/epoch_*`` folder as its run_config.json describes it.

    ``problem`` is None for a usable checkpoint, else why it cannot be resumed.  When
    run_config.json cannot be read, ``epoch`` comes from the folder name (to place
    the folder among the others) and ``global_step`` is None.
    """

    path: str
    epoch: Optional[int]
    global_step: Optional[int]
    problem: Optional[str] = None
    verified: bool = False  # sha256 of every file checked (not only sizes)

    @property
    def valid(self) -> bool:
        return self.problem is None

    @property
    def order(self) -> tuple:
        # Epoch and global step grow together within a run (steps per epoch are part of
        # the identity); the step breaks no real tie but keeps the order on the record.
        return (self.epoch if self.epoch is not None else -1,
                self.global_step if self.global_step is not None else -1, os.path.basename(self.path))

    def describe(self) -> str:
        where = f"epoch {self.epoch}" + (f", step {self.global_step}" if self.global_step is not None else "")
        return f"{self.path!r} ({where})"


def _name_epoch(name: str) -> Optional[int]:
    digits = name[len(CHECKPOINT_PREFIX):]
    return int(digits) if name.startswith(CHECKPOINT_PREFIX) and digits.isdigit() else None


def _file_record(path: str) -> dict:
    """Size and sha256 of a file just written, flushed to the disk on the way."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
            size += len(chunk)
        with contextlib.suppress(OSError):  # not every platform fsyncs a read-only handle
            os.fsync(f.fileno())
    return {"bytes": size, "sha256": h.hexdigest()}


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _checkpoint_files(folder: str) -> dict:
    """Every file accelerate wrote into ``folder`` (relative POSIX path -> size and sha256)."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, folder).replace(os.sep, "/")
            if rel != RUN_CONFIG_FILE and not rel.startswith(f"{RUN_CONFIG_FILE}.tmp"):
                out[rel] = _file_record(full)
    return dict(sorted(out.items()))


def _positive_int(value, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def inspect_checkpoint(path: str, verify: bool = True) -> CheckpointInfo:
    """Read a checkpoint folder's run_config.json and check its files against it.

    Checks that run_config.json parses and holds the run's identity, epoch and global
    step, and that every file it lists is present with the recorded size (and, with
    ``verify``, the recorded sha256).  Never raises for a damaged checkpoint: the
    returned ``problem`` says what is wrong.  A format-1 checkpoint (written before
    sizes and checksums were recorded) gets a lighter check of its main files.
    """
    path = os.path.abspath(path)
    info = CheckpointInfo(path, _name_epoch(os.path.basename(path)), None)
    if not os.path.isdir(path):
        info.problem = "it is not a directory"
        return info
    config_path = os.path.join(path, RUN_CONFIG_FILE)
    if not os.path.isfile(config_path):
        info.problem = f"{RUN_CONFIG_FILE} is missing"
        return info
    try:
        with open(config_path, "rb") as f:
            raw = f.read()
        record = json.loads(raw.decode("utf-8")) if raw.strip() else None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        info.problem = f"{RUN_CONFIG_FILE} cannot be read ({type(err).__name__}: {err})"
        return info
    if record is None:
        info.problem = f"{RUN_CONFIG_FILE} is empty"
        return info
    if not isinstance(record, dict):
        info.problem = f"{RUN_CONFIG_FILE} holds a {type(record).__name__}, not a JSON object"
        return info
    if not _positive_int(record.get("epoch"), 1):
        info.problem = f"{RUN_CONFIG_FILE}: 'epoch' must be an int >= 1, got {record.get('epoch', '<absent>')!r}"
        return info
    info.epoch = record["epoch"]
    if not isinstance(record.get("identity"), dict) or not record["identity"]:
        info.problem = f"{RUN_CONFIG_FILE} has no 'identity' (the run's configuration)"
        return info
    if "files" not in record:
        info.problem = _check_format1(path)
        return info
    if not _positive_int(record.get("global_step"), 0):
        info.problem = (f"{RUN_CONFIG_FILE}: 'global_step' must be an int >= 0, "
                        f"got {record.get('global_step', '<absent>')!r}")
        return info
    info.global_step = record["global_step"]
    files = record["files"]
    if not isinstance(files, dict) or not files:
        info.problem = f"{RUN_CONFIG_FILE}: 'files' must list the checkpoint's files, got {files!r}"
        return info
    for name, entry in files.items():
        parts = name.split("/")
        # A record naming files elsewhere (absolute, '..') is not ours: refuse rather than read outside.
        if not name or name.startswith("/") or ".." in parts or "\\" in name or ":" in parts[0]:
            info.problem = f"{RUN_CONFIG_FILE} lists a file outside the checkpoint: {name!r}"
            return info
        if not (isinstance(entry, dict) and _positive_int(entry.get("bytes"), 0)
                and isinstance(entry.get("sha256"), str) and len(entry["sha256"]) == 64):
            info.problem = f"{RUN_CONFIG_FILE}: files[{name!r}] must hold 'bytes' and a 'sha256', got {entry!r}"
            return info
        full = os.path.join(path, *parts)
        if not os.path.isfile(full):
            info.problem = f"{name} is missing ({RUN_CONFIG_FILE} records {entry['bytes']} bytes)"
            return info
        size = os.path.getsize(full)
        if size != entry["bytes"]:
            info.problem = f"{name} has {size} bytes, {RUN_CONFIG_FILE} records {entry['bytes']}"
            return info
    if verify:
        for name, entry in files.items():
            try:
                digest = _sha256(os.path.join(path, *name.split("/")))
            except OSError as err:
                info.problem = f"{name} cannot be read ({err})"
                return info
            if digest != entry["sha256"]:
                info.problem = (f"{name} has sha256 {digest[:12]}..., {RUN_CONFIG_FILE} records "
                                f"{entry['sha256'][:12]}... (the file was altered or partly overwritten)")
                return info
        info.verified = True
    return info


def _check_format1(path: str) -> Optional[str]:
    """The files a format-1 checkpoint must hold, non-empty, and a model file that opens."""
    for name in ("model.safetensors", "optimizer.bin", "custom_checkpoint_0.pkl"):
        full = os.path.join(path, name)
        if not os.path.isfile(full) or os.path.getsize(full) == 0:
            return f"{name} is {'empty' if os.path.isfile(full) else 'missing'} (format-1 checkpoint)"
    from safetensors import safe_open

    try:
        with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
            list(f.keys())
    except Exception as err:  # safetensors raises its own SafetensorError and OSError
        return f"model.safetensors cannot be read ({type(err).__name__}: {err}) (format-1 checkpoint)"
    return None


def list_checkpoints(output_dir: str, verify: bool = False) -> list[CheckpointInfo]:
    """Every ``checkpoints/epoch_*`` folder of a run, oldest first by recorded epoch and step.

    Without ``verify`` only sizes are checked (fast); ``problem`` says what is wrong
    with each damaged one.  Leftover ``.tmp-*`` folders of a killed save are not listed.
    """
    root = os.path.join(os.path.abspath(os.path.expanduser(str(output_dir))), CHECKPOINTS_DIR)
    if not os.path.isdir(root):
        return []
    found = [inspect_checkpoint(os.path.join(root, name), verify=verify)
             for name in os.listdir(root) if name.startswith(CHECKPOINT_PREFIX)]
    return sorted(found, key=lambda c: c.order)


def read_latest_pointer(output_dir: str) -> Optional[str]:
    """The folder name ``checkpoints/latest`` holds ('' when empty), None when it is missing."""
    pointer = os.path.join(os.path.abspath(os.path.expanduser(str(output_dir))), CHECKPOINTS_DIR, LATEST_FILE)
    try:
        with open(pointer, encoding="utf-8") as f:
            return f.read().strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError):
        return ""


def latest_checkpoint(output_dir: str) -> Optional[str]:
    """Path of the newest valid (fully verified) checkpoint of a run, or None.

    Chosen by the epoch and step each run_config.json records, never by the
    ``latest`` pointer alone: a stale, empty or missing pointer changes nothing.
    """
    for info in reversed(list_checkpoints(output_dir)):
        if info.valid and inspect_checkpoint(info.path).valid:
            return info.path
    return None


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
        from timm_fslt.ticket.io import resolve_architecture

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
    # The main process decides and every process gets the same answer (or the same error).
    ckpt_root = os.path.join(output_dir, CHECKPOINTS_DIR)
    resume_from, notes = _decided_by_main(accelerator, lambda: _choose_resume(config, output_dir, identity))
    if accelerator.is_main_process:
        for note in notes:  # a skipped (damaged) checkpoint is a warning; a stale pointer only a note
            if note.startswith("resume: skipped"):
                warnings.warn(note, stacklevel=2)
            else:
                print(note)

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
        _check_checkpoint_keys(unwrapped, resume_from)  # DDP's wrapper would prefix every key with 'module.'
        try:
            accelerator.load_state(resume_from)
        except Exception as err:  # verified files that still do not load: name the checkpoint
            raise CheckpointError(f"resume: checkpoint {resume_from!r} does not load: "
                                  f"{type(err).__name__}: {err}") from err
        if accelerator.is_main_process:
            last = rewind_metrics(os.path.join(output_dir, METRICS_FILE), state.global_step)
            if last is not None and last < state.global_step:
                # Only after going back to an older checkpoint and then forward to a newer one:
                # the step-back dropped these records and nothing recomputes them.
                warnings.warn(f"resume: {METRICS_FILE} has no records after step {last} but the checkpoint is at "
                              f"step {state.global_step} (an earlier resume from an older checkpoint dropped "
                              "them); results.json's history still holds every epoch", stacklevel=2)
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
        _save_checkpoint(accelerator, ckpt_root, state, identity, config.keep_checkpoints, resume_from)
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
        from timm_fslt.report import size_report

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


def _decided_by_main(accelerator, decide: Callable[[], Any]):
    """Run ``decide`` on the main process only and give its result, or its exception, to all.

    Every process must resume from the same checkpoint; reading and hashing the
    checkpoints once also spares the other processes that work.
    """
    outcome = None
    if accelerator.is_main_process:
        try:
            outcome = ("ok", decide())
        except Exception as err:
            outcome = ("error", err)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        outcome = broadcast_object_list([outcome])[0]
    if outcome[0] == "error":
        raise outcome[1]
    return outcome[1]


def _choose_resume(config: TrainConfig, output_dir: str, identity: dict) -> tuple[Optional[str], list[str]]:
    """The checkpoint to resume (None: a fresh run) and notes to print; raises before anything trains."""
    ckpt_root = os.path.join(output_dir, CHECKPOINTS_DIR)
    mode, notes = config.resume, []

    def fresh_start():
        if not config.overwrite:
            # Any checkpoint folder counts, valid or not: a fresh run would overwrite it.
            clashes = [c.path for c in list_checkpoints(output_dir)]
            clashes += [p for p in (os.path.join(output_dir, RESULTS_FILE),) if os.path.exists(p)]
            if clashes:
                raise FileExistsError(f"output_dir {output_dir!r} already holds a run ({clashes[-1]}); pass "
                                      "resume (--resume) to continue it or overwrite (--overwrite) to start over")
        return None, notes

    if mode is False:
        return fresh_start()
    if mode is True or mode in RESUME_MODES:
        found = list_checkpoints(output_dir)
        if not found:
            if mode == "auto":
                return fresh_start()
            raise FileNotFoundError(f"resume: no checkpoint to resume in {output_dir!r} (no "
                                    f"{CHECKPOINTS_DIR}/{CHECKPOINT_PREFIX}* folder); start without resume")
        chosen, skipped = None, []
        for info in reversed(found):  # newest first; hash only until one holds
            if info.valid:
                info = inspect_checkpoint(info.path, verify=True)
            if info.valid:
                chosen = info
                break
            skipped.append(info)
        reasons = "; ".join(f"checkpoint {c.path!r} is invalid: {c.problem}" for c in skipped)
        if chosen is None:
            # Starting over would overwrite these folders: never do that silently.
            raise CheckpointError(f"resume: no valid checkpoint in {ckpt_root!r}: {reasons}. Repair or move "
                                  "them away, or start over with resume=False and overwrite=True (--overwrite)")
        if skipped and mode != "fallback":
            raise CheckpointError(f"resume: {reasons}. The newest valid checkpoint is {chosen.describe()}; pass "
                                  "resume='fallback' (--resume fallback) to continue from it")
        for c in skipped:
            notes.append(f"resume: skipped checkpoint {c.path!r} ({c.problem}); continuing from the older "
                         f"{chosen.describe()}")
        pointer = read_latest_pointer(output_dir)
        if pointer != os.path.basename(chosen.path):
            said = ("is missing" if pointer is None else "is empty" if not pointer else f"names {pointer!r}")
            notes.append(f"resume: {CHECKPOINTS_DIR}/{LATEST_FILE} {said}; the newest valid checkpoint by "
                         f"recorded epoch and step is {chosen.describe()}")
        resume_from = chosen.path
    else:
        resume_from = os.path.abspath(os.path.expanduser(str(mode)))
        if not os.path.isfile(os.path.join(resume_from, RUN_CONFIG_FILE)):
            raise FileNotFoundError(f"resume: {resume_from!r} is not a checkpoint folder (no {RUN_CONFIG_FILE}); "
                                    "resume takes False, True, 'auto', 'fallback' or a checkpoint folder")
        info = inspect_checkpoint(resume_from, verify=True)
        if not info.valid:
            raise CheckpointError(f"resume: checkpoint {resume_from!r} is invalid: {info.problem}")
    with open(os.path.join(resume_from, RUN_CONFIG_FILE), encoding="utf-8") as f:
        stored = json.load(f)
    diffs = _config_differences(stored.get("identity", {}), identity)
    if diffs:
        raise RunConfigError(f"resume: the checkpoint {resume_from!r} belongs to a different configuration: "
                             + "; ".join(diffs) + ". Resume with the same settings, or use a new output dir.")
    return resume_from, notes


def _check_checkpoint_keys(model: nn.Module, checkpoint: str) -> None:
    from safetensors import safe_open

    path = os.path.join(checkpoint, "model.safetensors")
    if not os.path.exists(path):
        raise FileNotFoundError(f"resume: {checkpoint!r} has no model.safetensors")
    try:
        with safe_open(path, "pt") as f:
            stored = set(f.keys())
    except Exception as err:  # SafetensorError / OSError: say which file
        raise CheckpointError(f"resume: checkpoint {checkpoint!r} is invalid: model.safetensors cannot be "
                              f"read ({type(err).__name__}: {err})") from err
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


def _save_checkpoint(accelerator, ckpt_root: str, state: TrainState, identity: dict, keep: int,
                     resumed_from: Optional[str]) -> None:
    """accelerator.save_state into a temporary folder, record every file's size and sha256,
    rename it into place, move the pointer, then delete what ``keep`` no longer covers."""
    name = f"{CHECKPOINT_PREFIX}{state.epoch:04d}"
    tmp, final = os.path.join(ckpt_root, f".tmp-{name}"), os.path.join(ckpt_root, name)
    if accelerator.is_main_process:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)  # leftover of a run killed while writing
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json_atomic(os.path.join(tmp, RUN_CONFIG_FILE), {
            "format": CHECKPOINT_FORMAT, "identity": identity, "epoch": state.epoch,
            "global_step": state.global_step, "files": _checkpoint_files(tmp)})
        if os.path.isdir(final):
            # A folder of this epoch from an abandoned branch (a resume from an older checkpoint) or a
            # corrupted one: move it aside first, so a kill in between never leaves neither.
            trash = os.path.join(ckpt_root, f".old-{name}-{os.getpid()}")
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash)
        else:
            os.replace(tmp, final)
        _fsync_dir(ckpt_root)
        write_text_atomic(os.path.join(ckpt_root, LATEST_FILE), name + "\n")
        _prune_checkpoints(ckpt_root, final, keep, resumed_from)
    accelerator.wait_for_everyone()


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):  # not possible on every platform; the renames still happened
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _prune_checkpoints(ckpt_root: str, head: str, keep: int, resumed_from: Optional[str]) -> None:
    """Keep the ``keep`` newest checkpoints up to ``head`` (the one just written), by recorded order.

    Never deleted: ``head``; every checkpoint newer than it (a resume from an older
    checkpoint: the run replaces them as it reaches their epochs); and, while such
    newer ones exist, the checkpoint this run resumed from.  Damaged checkpoints
    older than ``head`` do not count towards ``keep`` and are deleted.
    """
    found = list_checkpoints(os.path.dirname(ckpt_root))
    head_info = next((c for c in found if c.path == head), None)
    if head_info is None or not head_info.valid:
        raise CheckpointError(f"checkpoint {head!r} was just written but is invalid: "
                              f"{head_info.problem if head_info else 'it is gone'}")
    newer = [c for c in found if c.order > head_info.order]
    protected = {head} | {c.path for c in newer}
    if newer and resumed_from:
        protected.add(os.path.abspath(resumed_from))
    older_valid = [c for c in found if c.order < head_info.order and c.valid]
    if keep > 1:  # the head is the first of the `keep`
        protected |= {c.path for c in older_valid[-(keep - 1):]}
    for c in found:
        if c.path not in protected:
            shutil.rmtree(c.path) if os.path.isdir(c.path) else os.remove(c.path)
    for leftover in os.listdir(ckpt_root):  # halves of saves killed before their rename
        if leftover.startswith(".old-"):
            shutil.rmtree(os.path.join(ckpt_root, leftover), ignore_errors=True)


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
