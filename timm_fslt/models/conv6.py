"""Conv6 (Frankle & Carbin 2019; Ramanujan et al. 2020): the paper's small CIFAR-10 network.

conv 64,64,pool, 128,128,pool, 256,256,pool, then fc 4096-256-256-classes; ReLU,
no biases, no normalisation. ``width`` scales every hidden size (tests use small widths).
"""
from __future__ import annotations

import torch
from torch import nn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from timm_fslt.models.classifier import HiddenHeadClassifier


def _ch(base: int, width: float) -> int:
    return max(1, int(round(base * width)))


class Conv6(HiddenHeadClassifier):
    def __init__(self, num_classes: int = 10, in_chans: int = 3, width: float = 1.0,
                 img_size: int = 32, drop_rate: float = 0.0, device=None, dtype=None, **kwargs):
        super().__init__()
        c1, c2, c3 = _ch(64, width), _ch(128, width), _ch(256, width)
        hidden = _ch(256, width)
        self.num_classes = num_classes
        layers, prev = [], in_chans
        for out in (c1, c1, "pool", c2, c2, "pool", c3, c3, "pool"):
            if out == "pool":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(prev, out, 3, padding=1, bias=False), nn.ReLU(inplace=True)]
                prev = out
        self.features = nn.Sequential(*layers)
        spatial = img_size // 8
        self.flat_features = prev * spatial * spatial
        self.head_hidden = nn.Sequential(
            nn.Flatten(), nn.Linear(self.flat_features, hidden, bias=False), nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden, bias=False), nn.ReLU(inplace=True))
        self.num_features = hidden
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(hidden, num_classes, bias=False) if num_classes > 0 else nn.Identity()
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.head_hidden(x))
        return x if pre_logits else self.fc(x)



def _cfg(**kwargs):
    return {"url": "", "num_classes": 10, "input_size": (3, 32, 32), "pool_size": None,
            "crop_pct": 1.0, "interpolation": "bilinear",
            "mean": (0.4914, 0.4822, 0.4465), "std": (0.2470, 0.2435, 0.2616),
            "first_conv": "features.0", "classifier": "fc", "license": "apache-2.0", **kwargs}


default_cfgs = generate_default_cfgs({"conv6.untrained": _cfg()})


@register_model
def conv6(pretrained: bool = False, **kwargs) -> Conv6:
    """Conv6 for 32x32 inputs (CIFAR-10)."""
    kwargs.setdefault("num_classes", 10)
    return build_model_with_cfg(Conv6, "conv6", pretrained, **kwargs)
