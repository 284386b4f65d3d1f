"""ResNet-18 with a CIFAR stem: timm's own ResNet, with a 3x3 stride-1 stem and no max-pool.

Being timm's ``ResNet`` class, it has timm's feature/classifier API and works with
``timm.models.save_for_hf``; its stem is replaced before timm loads pretrained weights, so
``pretrained=True`` loads a checkpoint of this model like any timm model's. ``width`` scales
the stage channels (64,128,256,512).
"""
from __future__ import annotations

from torch import nn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, ResNet


def _cifar_resnet(**kwargs) -> ResNet:
    """timm's ResNet with the CIFAR stem, built before ``build_model_with_cfg`` loads any
    pretrained weights, so that a checkpoint of this model (``pretrained=True`` with a
    ``pretrained_cfg_overlay=dict(file=...)``, ``local-dir:``, ``hf-hub:``) fits its stem."""
    model = ResNet(**kwargs)
    # timm's plain stem always has 64 channels (bn1 is built for them); at width < 1
    # the first stage then starts with a 1x1 projection, as in any timm ResNet.
    model.conv1 = nn.Conv2d(kwargs.get("in_chans", 3), model.bn1.num_features, kernel_size=3, stride=1, padding=1,
                            bias=False)
    model.maxpool = nn.Identity()
    # stride 1 and no max-pool: every feature map is 4x larger than timm's ResNet records
    for info in model.feature_info:
        info["reduction"] = max(1, info["reduction"] // 4)
    return model


def _make(variant: str, pretrained: bool = False, width: float = 1.0, **kwargs) -> ResNet:
    channels = tuple(max(1, int(round(c * width))) for c in (64, 128, 256, 512))
    kwargs.setdefault("num_classes", 10)
    return build_model_with_cfg(_cifar_resnet, variant, pretrained, block=BasicBlock, layers=(2, 2, 2, 2),
                                channels=channels, **kwargs)


default_cfgs = generate_default_cfgs({
    "resnet18_cifar.untrained": {
        "url": "", "num_classes": 10, "input_size": (3, 32, 32), "pool_size": (4, 4),
        "crop_pct": 1.0, "interpolation": "bilinear",
        "mean": (0.4914, 0.4822, 0.4465), "std": (0.2470, 0.2435, 0.2616),
        "first_conv": "conv1", "classifier": "fc", "license": "apache-2.0"},
})


@register_model
def resnet18_cifar(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet-18 for 32x32 inputs (3x3 stem, no max-pool), as in the paper's CIFAR-10 runs."""
    return _make("resnet18_cifar", pretrained, **kwargs)
