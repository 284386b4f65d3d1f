"""How much a channel matters: a torch-pruning importance that reads the learned supermask."""
from __future__ import annotations

from typing import Optional

import torch
import torch_pruning as tp
from torch import nn

from timm_fslt.nn.modules import has_frozen_weight
from timm_fslt.pruning.geometry import is_depthwise, weight_dims
from timm_fslt.pruning.pruners import FrozenLayerPruner

__all__ = ["SupermaskImportance"]


class SupermaskImportance(tp.importance.Importance):
    """Ranks channels by the learned supermask of the frozen layers in a group.

    criterion:
      ``"kept"``      number of kept weights (locked or selected) per channel;
      ``"magnitude"`` L1 norm of the effective weights ``W * mask * scale``;
      ``"score"``     score mass ``sum |s|`` over the channel's free weights -- the
                      search's preference, independent of where the threshold falls.
    A channel's importance sums its output slice in producing layers and its input
    slice in consuming layers.  Groups without a frozen layer return ``None``
    (torch-pruning then leaves them alone).  ``normalizer``: None | "mean" | "max" | "sum".
    """

    CRITERIA = ("kept", "magnitude", "score")
    NORMALIZERS = (None, "mean", "max", "sum")

    def __init__(self, criterion: str = "kept", normalizer: Optional[str] = None):
        if criterion not in self.CRITERIA:
            raise ValueError(f"criterion must be one of {list(self.CRITERIA)}, got {criterion!r}")
        if normalizer not in self.NORMALIZERS:
            raise ValueError(f"normalizer must be one of {list(self.NORMALIZERS)}, got {normalizer!r}")
        self.criterion = criterion
        self.normalizer = normalizer

    def _values(self, layer: nn.Module, supermask) -> torch.Tensor:
        if self.criterion == "kept":
            return supermask.mask.float()
        if self.criterion == "magnitude":
            return layer.weight.detach().abs().float()  # W * mask * scale
        return supermask.scores_like_weight(0.0).abs_().float()  # 0 at pruned and locked weights

    @torch.no_grad()
    def __call__(self, group) -> Optional[torch.Tensor]:
        root_idxs = list(group[0].root_idxs)
        size = max(root_idxs) + 1 if root_idxs else 0
        total = None
        for item in group:
            dep, idxs = item.dep, item.idxs
            layer, fn = dep.layer, dep.pruning_fn
            pruner = getattr(fn, "__self__", None)
            if not isinstance(pruner, FrozenLayerPruner) or not has_frozen_weight(layer):
                continue
            if any(r is None for r in item.root_idxs):
                continue
            supermask = layer.parametrizations.weight[0]
            supermask.group.refresh()
            out_dim, in_dim = weight_dims(layer)
            is_out = fn.__func__ is FrozenLayerPruner.prune_out_channels or is_depthwise(layer)
            dim = out_dim if is_out else in_dim
            values = self._values(layer, supermask)
            per_channel = values.transpose(0, dim).reshape(values.shape[dim], -1).sum(1)
            local = per_channel[torch.as_tensor(idxs, dtype=torch.long, device=per_channel.device)]
            if total is None:
                total = torch.zeros(size, dtype=torch.float32, device=local.device)
            total.scatter_add_(0, torch.as_tensor(item.root_idxs, dtype=torch.long,
                                                  device=local.device), local)
        if total is None:
            return None
        total = total[torch.as_tensor(root_idxs, dtype=torch.long, device=total.device)]
        if self.normalizer == "mean":
            total = total / total.mean().clamp_min(1e-12)
        elif self.normalizer == "max":
            total = total / total.max().clamp_min(1e-12)
        elif self.normalizer == "sum":
            total = total / total.sum().clamp_min(1e-12)
        return total
