"""What a batch is: ``ClassificationTask`` (image batches ``(x, y)``) or
``NodeClassificationTask`` (the whole graph, full-graph training).

A task has ``batched`` (False: one batch per epoch, the loop ignores batch sizes),
``collate_fn``, ``loss(model, batch)`` and ``evaluate(model, loader, accelerator, ...)``."""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


def first_item(items: list) -> Any:
    """Collate function of one-example datasets (the whole graph)."""
    return items[0]


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
        # (counts and the loss sum stay on the device and are read once at the end: the same float64
        # additions in the same order as Python floats would do, without a host read per batch)
        correct = torch.zeros((), dtype=torch.int64, device=accelerator.device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
        total = 0
        for x, y in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True,
                         disable=not (progress and accelerator.is_main_process)):
            logits = model(x).float()
            losses = F.cross_entropy(logits, y, reduction="none")
            # gather_for_metrics drops the samples repeated to even out the last batch.
            pred, y, losses = accelerator.gather_for_metrics((logits.argmax(-1), y, losses))
            correct += (pred == y).sum()
            total += y.numel()
            loss_sum += losses.double().sum()
        return {"acc": int(correct) / max(total, 1), "loss": float(loss_sum) / max(total, 1), "n": total}


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
