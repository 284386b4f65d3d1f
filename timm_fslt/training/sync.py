"""What every process must agree on: the masks (digests compared after each epoch, or every
N steps) and the resume decision (taken once, on the main process)."""
from __future__ import annotations

import hashlib
from typing import Any, Callable

import torch
from accelerate.utils import broadcast_object_list
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
