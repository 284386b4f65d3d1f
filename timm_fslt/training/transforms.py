"""The image recipes' transforms from timm's data config: ``resolve_image_data_config`` (timm's
``resolve_data_config`` of a model, with the recipe's overrides) and ``image_transforms``
(``timm.data.create_transform``; the CIFAR training crop stays the paper's).  Re-exported by
``timm_fslt.training.data``."""
from __future__ import annotations

from typing import Optional

import timm
import timm.data
from torchvision import transforms as T

from timm_fslt.ticket.timm_config import DATA_CONFIG_KEYS  # timm's data-config keys, as tickets record them
from timm_fslt.training.config import DataError

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# The recipes' default models: their timm pretrained_cfg gives a loader's data config when no
# model is at hand (load_cifar10 / load_imagenet called on their own).
DEFAULT_MODELS = {"cifar": "conv6", "imagenet": "resnet18"}
KINDS = tuple(DEFAULT_MODELS)


def resolve_image_data_config(kind: str, model=None, *, img_size: Optional[int] = None) -> dict:
    """timm's data config (``timm.data.resolve_data_config``) of ``model`` for an image recipe.

    ``model`` is a timm model (its ``pretrained_cfg``), a timm model name, or None (the
    recipe's default model).  ``img_size`` overrides the input size (``--img-size``).
    CIFAR images are small and their statistics are the data's, not a model's: the CIFAR
    recipe evaluates uncropped (``crop_pct`` 1.0) with CIFAR-10's mean and std whatever the
    model's pretrained_cfg says (for conv6 and resnet18_cifar those are the same values).
    Returns the keys timm's ``create_transform`` takes: input_size, interpolation, mean, std,
    crop_pct, crop_mode.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    if img_size is not None and (isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 1):
        raise DataError(f"--img-size must be a positive int, got {img_size!r}")
    args = {"img_size": img_size}
    if kind == "cifar":
        args.update(mean=CIFAR10_MEAN, std=CIFAR10_STD, crop_pct=1.0)
    model = DEFAULT_MODELS[kind] if model is None else model
    if isinstance(model, str):
        return dict(timm.data.resolve_data_config(args, pretrained_cfg=_pretrained_cfg(model)))
    return dict(timm.data.resolve_data_config(args, model=model))


def _pretrained_cfg(name: str) -> dict:
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        raise DataError(f"--model: timm has no pretrained_cfg for {name!r}, so no data config")
    return cfg.to_dict()


def image_transforms(kind: str, data_config: dict):
    """(train, eval) transforms of an image recipe from timm's ``data_config``.

    Eval: ``timm.data.create_transform(**data_config)`` (resize by crop_pct with the config's
    interpolation, centre crop, normalize).  ImageNet train: ``create_transform(...,
    is_training=True, color_jitter=None)``, timm's random resized crop + flip (the reference
    code's simple augmentation: no colour jitter).  CIFAR train stays ours: the paper's random
    crop with 4-pixel zero padding + flip (timm's training transforms only crop by resizing),
    normalized with the config's mean and std.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    config = {k: data_config[k] for k in DATA_CONFIG_KEYS if k in data_config}
    evaluation = timm.data.create_transform(**config, is_training=False)
    if kind == "imagenet":
        return timm.data.create_transform(**config, is_training=True, color_jitter=None), evaluation
    _, height, width = config["input_size"]
    resize = [] if (height, width) == (32, 32) else [T.Resize((height, width))]
    train = T.Compose(resize + [T.RandomCrop((height, width), padding=max(1, min(height, width) // 8)),
                                T.RandomHorizontalFlip(), T.ToTensor(),
                                T.Normalize(config["mean"], config["std"])])
    return train, evaluation
