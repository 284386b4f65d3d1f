"""``TrainConfig`` (the settings of one run), the errors a run raises before it trains, and
the names of what a run writes into its output_dir."""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import torch

from timm_fslt.training.records import jsonable

OPTIMIZERS = ("sgd", "adamw")
SCHEDULERS = ("cosine", "constant")
MIXED_PRECISION = ("no", "fp16", "bf16")
# Where `accelerate launch` leaves its --mixed_precision (or the config file's mixed_precision).
LAUNCHER_PRECISION_ENV = "ACCELERATE_MIXED_PRECISION"
# Where `accelerate launch` leaves its --gradient_accumulation_steps (DeepSpeed launches), and its DeepSpeed switch.
LAUNCHER_GRAD_ACCUM_ENV = "ACCELERATE_GRADIENT_ACCUMULATION_STEPS"
LAUNCHER_DEEPSPEED_ENV = "ACCELERATE_USE_DEEPSPEED"
LAUNCHER_CPU_ENV = "ACCELERATE_USE_CPU"
# What a run writes into its output_dir.
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
VOLATILE_FIELDS = ("check_finite", "check_sync_every", "recompute_weights", "output_dir", "resume", "overwrite",
                   "keep_checkpoints", "checkpoint_every_steps", "stop_after", "log_with", "project_name", "progress",
                   "log_every",
                   "save_ticket", "push_to_hub", "hub_private", "num_workers", "cpu", "architecture", "dataset_ids")
# TrainConfig fields added after checkpoints were written without them, and the value such runs had:
# their checkpoints resume as if they recorded it (``deterministic`` changes CUDA arithmetic, so it
# is part of the identity, not volatile).
IDENTITY_DEFAULTS = {"deterministic": False}
# cuBLAS is deterministic only with a fixed workspace (CUDA >= 10.2); torch accepts :4096:8 or :16:8.
CUBLAS_WORKSPACE_ENV = "CUBLAS_WORKSPACE_CONFIG"
CUBLAS_WORKSPACE_DETERMINISTIC = ":4096:8"


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
    ``data_config``: timm's data config of the eval transform (``timm.data.resolve_data_config``);
    the ticket records it (config.json ``pretrained_cfg``).  None: the ticket writer's default.
    ``grad_accum_steps``: None takes the launcher's (``accelerate launch --gradient_accumulation_steps``,
    ACCELERATE_GRADIENT_ACCUMULATION_STEPS; 1 without); a value overrides it (with a note), except
    under DeepSpeed, whose config decides: there a different value is an error.
    ``mixed_precision``: None takes what ``accelerate launch`` says (its ``--mixed_precision``
    or config file, passed on as ACCELERATE_MIXED_PRECISION; "no" without a launcher); a value
    overrides the launcher.  Checkpoints and results.json record the precision in effect.
    ``deterministic``: run inside ``deterministic_mode`` (deterministic algorithms, no cuDNN
    benchmarking, no TF32, CUBLAS_WORKSPACE_CONFIG=:4096:8 if unset), so that on CUDA a resumed
    run is bit-identical too; slower, and an op without a deterministic CUDA implementation raises.
    Part of the run's identity: a resume must use the same setting.
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
    grad_accum_steps: Optional[int] = None
    mixed_precision: Optional[str] = None
    seed: int = 0
    num_workers: int = 0
    limit_train_batches: Optional[int] = None
    limit_eval_batches: Optional[int] = None
    resume: Union[bool, str] = False
    overwrite: bool = False
    keep_checkpoints: int = 1
    checkpoint_every_steps: Optional[int] = None
    stop_after: Optional[int] = None
    log_with: Sequence[str] = ()
    log_every: int = 50
    project_name: str = "timm_fslt"
    progress: bool = True
    save_ticket: bool = True
    architecture: Optional[Any] = None
    dataset_ids: Sequence[str] = ()
    data_config: Optional[Mapping[str, Any]] = None
    push_to_hub: Optional[str] = None
    hub_private: bool = False
    cpu: bool = False
    check_finite: bool = True
    check_sync_every: int = 0
    recompute_weights: bool = False
    deterministic: bool = False

    def __post_init__(self):
        self.log_with = tuple(self.log_with or ())
        self.dataset_ids = tuple(self.dataset_ids or ())
        if isinstance(self.data_config, Mapping):
            self.data_config = dict(self.data_config)
        self.validate()

    def validate(self) -> None:
        def positive_int(name, allow_none=False):
            value = getattr(self, name)
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")

        for name in ("epochs", "batch_size", "keep_checkpoints", "log_every"):
            positive_int(name)
        for name in ("grad_accum_steps", "eval_batch_size", "limit_train_batches", "limit_eval_batches", "stop_after",
                     "checkpoint_every_steps"):
            positive_int(name, allow_none=True)
        for name, allowed in (("optimizer", OPTIMIZERS), ("scheduler", SCHEDULERS),
                              ("mixed_precision", MIXED_PRECISION)):
            if name == "mixed_precision" and self.mixed_precision is None:
                continue  # the launcher's, checked by resolve_mixed_precision when the run starts
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
        if self.limit_train_batches is not None and self.limit_train_batches % (self.grad_accum_steps or 1):
            raise ValueError(f"limit_train_batches ({self.limit_train_batches}) must be a multiple of "
                             f"grad_accum_steps ({self.grad_accum_steps}) so each epoch ends on an optimizer step")
        for name in ("nesterov", "overwrite", "progress", "save_ticket", "hub_private", "cpu", "check_finite",
                     "recompute_weights", "deterministic"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.data_config is not None and not isinstance(self.data_config, dict):
            raise ValueError("data_config must be timm's data config (a mapping: input_size, interpolation, mean, "
                             f"std, crop_pct, crop_mode) or None, got {self.data_config!r}")
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
        return jsonable(dataclasses.asdict(self))


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def resolve_mixed_precision(setting: Optional[str]) -> tuple[str, Optional[str]]:
    """The precision a run uses, and a note to print when the setting overrides the launcher's.

    An explicit setting wins; None takes the launcher's (ACCELERATE_MIXED_PRECISION), else "no".
    Resolved here, not by Accelerate, so that a bad launcher value fails naming its source.
    Under DeepSpeed the engine's precision comes from the launcher's DeepSpeed config, so a
    setting that differs cannot be honoured: an error naming both.
    """
    launcher = os.environ.get(LAUNCHER_PRECISION_ENV, "").strip().lower() or None
    if setting is not None:
        if launcher is None or launcher == setting:
            return setting, None
        if _env_flag(LAUNCHER_DEEPSPEED_ENV):
            raise RunConfigError(f"mixed_precision / --mixed-precision {setting} conflicts with the launcher's "
                                 f"{launcher} ({LAUNCHER_PRECISION_ENV}) under DeepSpeed ({LAUNCHER_DEEPSPEED_ENV}), "
                                 "whose config sets the engine's precision; give accelerate launch the same "
                                 "--mixed_precision, or leave out --mixed-precision")
        return setting, (f"mixed precision: {setting} (mixed_precision / --mixed-precision) overrides the "
                         f"launcher's {launcher} ({LAUNCHER_PRECISION_ENV})")
    if launcher is not None and launcher not in MIXED_PRECISION:
        raise RunConfigError(f"{LAUNCHER_PRECISION_ENV}={launcher!r} (accelerate launch --mixed_precision or its "
                             f"config file's mixed_precision) must be one of {list(MIXED_PRECISION)}")
    return launcher or "no", None


def resolve_grad_accum(setting: Optional[int]) -> tuple[int, Optional[str]]:
    """The gradient accumulation steps a run uses, and a note when the setting overrides the launcher's.

    Accelerate itself lets ACCELERATE_GRADIENT_ACCUMULATION_STEPS replace the value it is given
    (the loop would then split the global batch by one number while Accelerate steps by
    another); here an explicit setting wins, None takes the launcher's, else 1.  Under
    DeepSpeed the engine steps by its config's value, so a different setting is an error.
    """
    raw = os.environ.get(LAUNCHER_GRAD_ACCUM_ENV, "").strip() or None
    launcher = None
    if raw is not None:
        if not raw.isdigit() or int(raw) < 1:
            raise RunConfigError(f"{LAUNCHER_GRAD_ACCUM_ENV}={raw!r} (accelerate launch --gradient_accumulation_steps) "
                                 "must be a positive int")
        launcher = int(raw)
    if setting is None:
        return launcher or 1, None
    if launcher is None or launcher == setting:
        return setting, None
    if _env_flag(LAUNCHER_DEEPSPEED_ENV):
        raise RunConfigError(f"grad_accum_steps / --grad-accum {setting} conflicts with the launcher's "
                             f"gradient_accumulation_steps {launcher} ({LAUNCHER_GRAD_ACCUM_ENV}) under DeepSpeed "
                             f"({LAUNCHER_DEEPSPEED_ENV}), whose config sets the engine's steps; give both the same "
                             "value, or leave out --grad-accum")
    return setting, (f"gradient accumulation: {setting} (grad_accum_steps / --grad-accum) overrides the launcher's "
                     f"{launcher} ({LAUNCHER_GRAD_ACCUM_ENV})")


def check_precision_on_device(precision: str, device_type: str, cpu_setting: bool,
                              precision_setting: Optional[str]) -> None:
    """fp16 on the CPU cannot be honoured: Accelerate has no fp16 autocast there and would train in
    fp32 while the run records fp16.  An error naming where each side came from."""
    if precision != "fp16" or device_type != "cpu":
        return
    wanted = ("mixed_precision / --mixed-precision fp16" if precision_setting == "fp16"
              else f"the launcher's mixed_precision fp16 ({LAUNCHER_PRECISION_ENV})")
    where = ("cpu / --cpu" if cpu_setting else f"the launcher's --cpu ({LAUNCHER_CPU_ENV})"
             if _env_flag(LAUNCHER_CPU_ENV) else "no GPU on this machine")
    raise RunConfigError(f"{wanted} cannot run on the CPU ({where}): Accelerate has no fp16 autocast there and "
                         "would train in fp32 while recording fp16; use bf16 or no (--mixed-precision bf16|no)")


# -- deterministic mode (TrainConfig.deterministic, --deterministic) ----------------------------
_UNREADABLE = object()


def _read(get):
    try:
        return get()
    except RuntimeError:  # torch >= 2.9: a legacy TF32 read once the new API set the backends apart
        return _UNREADABLE


def _fp32_precision_nodes() -> list:
    """torch >= 2.9's TF32 settings ('ieee', 'tf32', or 'none': the parent's), parents first
    (setting a parent sets its children); empty on older torch."""
    b = torch.backends
    nodes = (b, b.mkldnn, b.cudnn, getattr(b.cudnn, "conv", None), getattr(b.cudnn, "rnn", None), b.cuda.matmul)
    return [n for n in nodes if n is not None and hasattr(n, "fp32_precision")]


def set_deterministic_flags() -> None:
    """The settings of ``deterministic_mode``, without saving anything (also to re-apply them after
    Accelerate turned TF32 matmuls on for a dynamo backend)."""
    b = torch.backends
    torch.use_deterministic_algorithms(True, warn_only=False)
    b.cudnn.deterministic, b.cudnn.benchmark = True, False
    b.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")  # the same; else torch >= 2.9 may refuse to read it back
    b.cudnn.allow_tf32 = False
    # torch >= 2.9: allow_tf32=False leaves convolutions at 'none', which inherits a parent's 'tf32'
    # (set through the new API); only then is the operator itself set (mixing the APIs needlessly
    # makes torch refuse later legacy reads).
    for chain in ((getattr(b.cudnn, "conv", None), b.cudnn, b), (getattr(b.cudnn, "rnn", None), b.cudnn, b),
                  (b.cuda.matmul, b)):
        if chain[0] is None or not all(hasattr(n, "fp32_precision") for n in chain):
            continue
        inherited = next((n.fp32_precision for n in chain if n.fp32_precision != "none"), "none")
        if inherited not in ("none", "ieee"):
            chain[0].fp32_precision = "ieee"


@contextlib.contextmanager
def deterministic_mode(enabled: bool = True) -> Iterator[None]:
    """Deterministic CUDA training inside the block; every global setting it changes is restored on
    exit, also when the block raises.  ``enabled=False``: changes nothing.

    Sets ``torch.use_deterministic_algorithms(True, warn_only=False)`` (an op without a
    deterministic implementation raises), ``cudnn.deterministic = True``, ``cudnn.benchmark =
    False``, TF32 off for matmuls and cuDNN (``allow_tf32 = False``; on torch >= 2.9 also the
    per-operator ``fp32_precision``), and CUBLAS_WORKSPACE_CONFIG=:4096:8 if it is unset (then
    removed again on exit).  cuBLAS reads that variable when the process first uses it: enter
    this before the first CUDA matmul, or export it before starting Python.  On the CPU none of
    this changes a result.
    """
    if not enabled:
        yield
        return
    b, nodes = torch.backends, _fp32_precision_nodes()
    saved = {"algorithms": (torch.are_deterministic_algorithms_enabled(),
                            torch.is_deterministic_algorithms_warn_only_enabled()),
             "cudnn": (b.cudnn.deterministic, b.cudnn.benchmark),
             "matmul_precision": _read(torch.get_float32_matmul_precision),
             "matmul_tf32": _read(lambda: b.cuda.matmul.allow_tf32), "cudnn_tf32": _read(lambda: b.cudnn.allow_tf32),
             "fp32_precision": [n.fp32_precision for n in nodes]}
    env = os.environ.get(CUBLAS_WORKSPACE_ENV)
    try:
        if not env:
            os.environ[CUBLAS_WORKSPACE_ENV] = CUBLAS_WORKSPACE_DETERMINISTIC
        set_deterministic_flags()
        yield
    finally:
        torch.use_deterministic_algorithms(saved["algorithms"][0], warn_only=saved["algorithms"][1])
        b.cudnn.deterministic, b.cudnn.benchmark = saved["cudnn"]
        for value, restore in ((saved["matmul_precision"], torch.set_float32_matmul_precision),
                               (saved["matmul_tf32"], lambda v: setattr(b.cuda.matmul, "allow_tf32", v)),
                               (saved["cudnn_tf32"], lambda v: setattr(b.cudnn, "allow_tf32", v))):
            if value is not _UNREADABLE:
                restore(value)
        for node, value in zip(nodes, saved["fp32_precision"]):
            node.fp32_precision = value
        if nodes and saved["matmul_precision"] == "medium":
            torch.set_float32_matmul_precision("medium")  # bf16 matmuls: no new-API spelling, so last
        if env is None:
            os.environ.pop(CUBLAS_WORKSPACE_ENV, None)
        elif not env:
            os.environ[CUBLAS_WORKSPACE_ENV] = env


class DataError(ValueError):
    """The data cannot be used as given (wrong layout, columns, splits); raised before training."""


class RunConfigError(ValueError):
    """A run cannot start as configured (e.g. resuming a checkpoint of another configuration)."""


class CheckpointError(RunConfigError):
    """A checkpoint cannot be resumed (a file missing, truncated or altered), or none can.

    The message names each checkpoint folder and what is wrong with it."""
