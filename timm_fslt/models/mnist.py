"""Small networks for 28x28 single-channel digits (the demo's MNIST), registered in timm.

``mnist_mlp``: a fully connected net (LeNet-300-100 layout by default), and
``mnist_cnn``: two 3x3 conv + max-pool stages and a two-layer head.  ReLU, no
biases and no normalisation, like the paper's Conv6: every weight is maskable and
a ticket needs no real-valued state at all, so its size is exactly one bit per
free weight.  ``width`` scales every hidden size.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from timm_fslt.models.classifier import HiddenHeadClassifier

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)


def _ch(base: int, width: float) -> int:
    return max(1, int(round(base * width)))


class _DigitNet(HiddenHeadClassifier):
    """timm's classifier API shared by both digit networks (features -> hidden head -> fc)."""

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_hidden(torch.flatten(x, 1))
        return x if pre_logits else self.fc(x)



def _hidden_stack(sizes: Sequence[int]) -> nn.Sequential:
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b, bias=False), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class MnistMLP(_DigitNet):
    def __init__(self, num_classes: int = 10, in_chans: int = 1, img_size: int = 28,
                 hidden: Sequence[int] = (300, 100), width: float = 1.0, **kwargs):
        super().__init__()
        sizes = [in_chans * img_size * img_size] + [_ch(h, width) for h in hidden]
        self.num_classes = num_classes
        self.head_hidden = _hidden_stack(sizes)
        self.num_features = sizes[-1]
        self.fc = nn.Linear(sizes[-1], num_classes, bias=False) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x


class MnistCNN(_DigitNet):
    def __init__(self, num_classes: int = 10, in_chans: int = 1, img_size: int = 28,
                 width: float = 1.0, **kwargs):
        super().__init__()
        c1, c2, hidden = _ch(32, width), _ch(64, width), _ch(256, width)
        self.num_classes = num_classes
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, c1, 3, padding=1, bias=False), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1, bias=False), nn.ReLU(inplace=True), nn.MaxPool2d(2))
        spatial = img_size // 4
        self.head_hidden = _hidden_stack([c2 * spatial * spatial, hidden])
        self.num_features = hidden
        self.fc = nn.Linear(hidden, num_classes, bias=False) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def _cfg(**kwargs):
    return {"url": "", "num_classes": 10, "input_size": (1, 28, 28), "pool_size": None,
            "crop_pct": 1.0, "interpolation": "bilinear", "mean": MNIST_MEAN, "std": MNIST_STD,
            "classifier": "fc", "license": "apache-2.0", **kwargs}


default_cfgs = generate_default_cfgs({
    "mnist_mlp.untrained": _cfg(first_conv="head_hidden.0"),
    "mnist_cnn.untrained": _cfg(first_conv="features.0"),
})


@register_model
def mnist_mlp(pretrained: bool = False, **kwargs) -> MnistMLP:
    """Fully connected net for 28x28x1 digits: 784-300-100-10 (``hidden``, ``width`` change it)."""
    return build_model_with_cfg(MnistMLP, "mnist_mlp", pretrained, **kwargs)


@register_model
def mnist_cnn(pretrained: bool = False, **kwargs) -> MnistCNN:
    """Small conv net for 28x28x1 digits: conv 32, pool, conv 64, pool, fc 3136-256-10."""
    return build_model_with_cfg(MnistCNN, "mnist_cnn", pretrained, **kwargs)
