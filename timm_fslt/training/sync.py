"""What every process must agree on: the masks (digests compared after each epoch, or every
N steps), BatchNorm running statistics (averaged, then compared), and the resume decision
(taken once, on the main process)."""
from __future__ import annotations

import hashlib
from typing import Any, Callable

import torch
from accelerate.utils import broadcast_object_list, gather_object
from torch import nn

from timm_fslt.frozen import get_group, is_frozen


def mask_digest(model: nn.Module) -> str:
    """sha256 of a frozen model's current masks (of an ordinary model: its parameters)."""
    h = hashlib.sha256()
    if is_frozen(model):
        group = get_group(model)
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


def _batchnorm_stats(model: nn.Module) -> list[torch.Tensor]:
    return [buf for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)
            for buf in (module.running_mean, module.running_var, module.num_batches_tracked) if buf is not None]


def average_batchnorm_stats(accelerator, model: nn.Module) -> None:
    """All-reduce mean of every BatchNorm's running_mean, running_var and num_batches_tracked.

    A frozen model runs under DDP with ``broadcast_buffers=False`` (its random weights, codes
    and masks are regenerated identically on every process, so broadcasting them each step is
    waste), so each process's running statistics follow only its own shard of the batch and
    drift apart; the loop averages them (as timm's ``distribute_bn`` does) before every
    evaluation and checkpoint.  One all-reduce of one float64 vector: the result is the same
    on every process, and equal counters (every process takes the same steps) stay exact.
    """
    model = accelerator.unwrap_model(model)
    flat = batchnorm_vector(model)
    if accelerator.num_processes == 1 or not flat.numel():
        return
    load_batchnorm_vector(model, accelerator.reduce(flat, "mean"))


def batchnorm_vector(model: nn.Module) -> torch.Tensor:
    """Every BatchNorm running statistic of ``model`` as one float64 vector (exact for float32 and
    for counters below 2**53); ``load_batchnorm_vector`` puts one back."""
    stats = _batchnorm_stats(model)
    if not stats:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat([t.detach().reshape(-1).double() for t in stats])


def load_batchnorm_vector(model: nn.Module, flat: torch.Tensor) -> None:
    offset = 0
    with torch.no_grad():
        for t in _batchnorm_stats(model):
            part = flat[offset:offset + t.numel()].view_as(t).to(t.device)
            t.copy_(part.round() if not t.is_floating_point() else part)
            offset += t.numel()


def batchnorm_digests(accelerator, model: nn.Module) -> list[str]:
    """sha256 of the BatchNorm running statistics, one per process; fails unless they agree."""
    h = hashlib.sha256()
    for t in _batchnorm_stats(accelerator.unwrap_model(model)):
        h.update(t.detach().to("cpu").reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    digests = _gathered(accelerator, h.hexdigest())
    if len(set(digests)) != 1:
        raise RuntimeError(f"BatchNorm running statistics differ between processes: digests per process {digests}")
    return digests


def _gathered(accelerator, digest: str) -> list[str]:
    """Every process's digest, in process order (``accelerate.utils.gather_object``)."""
    return list(gather_object([digest]))


def check_masks_in_sync(accelerator, model: nn.Module) -> list[str]:
    """All-gather every process's ``mask_digest`` and fail loudly unless they agree.

    Scores stay identical because DDP averages their gradients; the global
    threshold (hence every mask) is then identical too.  This checks it.
    Returns the digests, one per process.
    """
    digests = _gathered(accelerator, mask_digest(accelerator.unwrap_model(model)))
    if len(set(digests)) != 1:
        raise RuntimeError("supermasks differ between processes (the global threshold must be identical "
                           f"everywhere): digests per process {digests}")
    return digests


def decided_by_main(accelerator, decide: Callable[[], Any]):
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
        outcome = broadcast_object_list([outcome])[0]
    if outcome[0] == "error":
        raise outcome[1]
    return outcome[1]
