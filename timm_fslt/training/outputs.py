"""What a finished run leaves in output_dir besides results.json: the ticket of a frozen
model (and its Hub upload) or the model.safetensors of weight training, and the size
and sparsity figures results.json reports."""
from __future__ import annotations

import os

from safetensors.torch import save as safetensors_bytes
from torch import nn

from timm_fslt.atomic import write_bytes_atomic
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


def save_outputs(model: nn.Module, results: dict, config: TrainConfig, output_dir: str, frozen: bool) -> None:
    """Save the ticket (``save_ticket``, then ``push_to_hub`` if asked) or model.safetensors;
    adds ``ticket_dir`` / ``hub_url`` / ``model_file`` to ``results``."""
    metrics = {"val_accuracy": results["accuracy"]["val"], "test_accuracy": results["accuracy"]["test"],
               "sparsity": results["sparsity"]}
    metrics = {k: float(v) for k, v in metrics.items() if v is not None}
    datasets = list(config.dataset_ids) or None
    if frozen and config.save_ticket:
        ticket_dir = os.path.join(output_dir, TICKET_DIR)
        # The eval transform's timm data config (None: save_ticket records the model's pretrained_cfg one).
        save_ticket(model, ticket_dir, architecture=config.architecture, overwrite=True,
                    metrics=metrics, datasets=datasets, data_config=config.data_config)
        results["ticket_dir"] = ticket_dir
        if config.push_to_hub:
            info = push_to_hub(ticket_dir, config.push_to_hub, private=config.hub_private,
                               metrics=metrics, datasets=datasets)  # config.json already holds the data config
            results["hub_url"] = str(getattr(info, "commit_url", None) or info)
    elif not frozen:
        path = os.path.join(output_dir, "model.safetensors")
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        write_bytes_atomic(path, safetensors_bytes(tensors, metadata={k: str(v) for k, v in metrics.items()}))
        results["model_file"] = path
