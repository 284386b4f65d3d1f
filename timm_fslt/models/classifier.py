"""timm's classifier API for this package's small networks: ``features -> hidden head -> fc``.

Subclasses define ``forward_features``, ``forward_head`` and the attributes ``fc`` (a bias-free
Linear: every weight maskable) and ``num_features``.
"""
import torch
from torch import nn


class HiddenHeadClassifier(nn.Module):
    # A real annotation, not a string (no ``from __future__ import annotations`` here): TorchScript reads
    # class annotations, so torch.jit.script(timm_fslt.materialize(conv6)) compiles.
    num_features: int

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool=None) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes, bias=False) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
