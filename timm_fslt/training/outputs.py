"""What a finished run leaves in output_dir besides results.json: the ticket of a frozen
model (and its Hub upload) or the model.safetensors of weight training, and the size
and sparsity figures results.json reports."""
from __future__ import annotations

import os
import shutil

from accelerate.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME
from torch import nn

from timm_fslt.atomic import fsync_dir
from timm_fslt.frozen import get_group
from timm_fslt.report import size_report
from timm_fslt.ticket import push_to_hub, save_ticket
from timm_fslt.training.config import TICKET_DIR, TrainConfig


def current_sparsity(model: nn.Module) -> float:
    """The share of a frozen model's weights its current masks remove."""
    group = get_group(model)
    group.refresh()
    kept = sum(int(layer.mask.sum()) for layer in group.layers)
    total = sum(layer.mask.numel() for layer in group.layers)
    return 1.0 - kept / max(total, 1)


def dense_size(model: nn.Module) -> dict:
    """Storage of an ordinary (weight-trained) model: every state tensor at its precision."""
    state = model.state_dict()
    bits = sum(t.numel() * t.element_size() * 8 for t in state.values())
    return {"totals": {"params": sum(p.numel() for p in model.parameters()), "model_bits": bits,
                       "model_bytes": (bits + 7) // 8, "sparsity": 0.0}}


def size_results(model: nn.Module, frozen: bool) -> dict:
    """results.json's ``sparsity`` and ``size_report`` (a ticket's, or the dense model's)."""
    if frozen:
        report = size_report(model)
        return {"sparsity": report.sparsity, "size_report": report.to_dict()}
    return {"sparsity": 0.0, "size_report": dense_size(model)}


def save_outputs(accelerator, model: nn.Module, results: dict, config: TrainConfig, output_dir: str,
                 frozen: bool) -> None:
    """Save the ticket (``save_ticket``, then ``push_to_hub`` if asked; main process) or the
    weight-trained model (``save_model``; every process must call this, as FSDP/DeepSpeed
    gather the state dict); adds ``ticket_dir`` / ``hub_url`` / ``model_file`` to ``results``."""
    unwrapped = accelerator.unwrap_model(model)
    if not frozen:
        results["model_file"] = save_model(accelerator, model, output_dir)
        return
    if not (config.save_ticket and accelerator.is_main_process):
        return
    metrics = {"val_accuracy": results["accuracy"]["val"], "test_accuracy": results["accuracy"]["test"],
               "sparsity": results["sparsity"]}
    metrics = {k: float(v) for k, v in metrics.items() if v is not None}
    datasets = list(config.dataset_ids) or None
    ticket_dir = os.path.join(output_dir, TICKET_DIR)
    # The eval transform's timm data config (None: save_ticket records the model's pretrained_cfg one).
    save_ticket(unwrapped, ticket_dir, architecture=config.architecture, overwrite=True,
                metrics=metrics, datasets=datasets, data_config=config.data_config)
    results["ticket_dir"] = ticket_dir
    if config.push_to_hub:
        info = push_to_hub(ticket_dir, config.push_to_hub, private=config.hub_private,
                           metrics=metrics, datasets=datasets)  # config.json already holds the data config
        results["hub_url"] = str(getattr(info, "commit_url", None) or info)


def save_model(accelerator, model: nn.Module, output_dir: str) -> str:
    """``accelerator.save_model`` (safetensors, shards and index past 10 GB, shared tensors
    deduplicated, FSDP/DeepSpeed state gathered) into a temporary folder, then each file renamed
    into ``output_dir``, shards before the index: a killed save never leaves a half-written
    model.safetensors.  Returns the path of model.safetensors (or of the shard index)."""
    tmp = os.path.join(output_dir, ".tmp-model")
    if accelerator.is_main_process and os.path.isdir(tmp):
        shutil.rmtree(tmp)  # leftover of a killed save
    accelerator.wait_for_everyone()
    accelerator.save_model(model, tmp)
    accelerator.wait_for_everyone()
    index = os.path.join(output_dir, SAFE_WEIGHTS_INDEX_NAME)
    if accelerator.is_main_process:
        names = sorted(os.listdir(tmp), key=lambda n: n == SAFE_WEIGHTS_INDEX_NAME)  # the index last
        for name in names:
            with open(os.path.join(tmp, name), "rb") as f:
                os.fsync(f.fileno())
            os.replace(os.path.join(tmp, name), os.path.join(output_dir, name))
        fsync_dir(output_dir)
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    return index if os.path.exists(index) else os.path.join(output_dir, SAFE_WEIGHTS_NAME)
