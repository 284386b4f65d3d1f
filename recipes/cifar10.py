"""CIFAR-10 with Conv6 or ResNet-18: strong lottery tickets in partially frozen random networks.

    accelerate launch recipes/cifar10.py --model conv6 --prune 0.49 --lock 0.21 --sparsity 0.7
    accelerate launch recipes/cifar10.py --model resnet18_cifar --method weights

Defaults are the paper's (presets/cifar10_conv6.yaml, presets/cifar10_resnet18_cifar.yaml):
100 epochs, batch 128, SGD momentum 0.9, weight decay 1e-4, cosine decay, lr 0.01
(Conv6) / 0.1 (ResNet-18), 4:1 train/val split of the train set, best-val model tested.
Data: the Hub's uoft-cs/cifar10 (columns img/label), a save_to_disk folder or an image folder.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fslt_recipe as R  # noqa: E402

RECIPE, DEFAULT_MODEL = "cifar10", "conv6"


def parser():
    return R.build_parser(RECIPE, __doc__.split("\n")[0], image=True)


def main(argv=None) -> dict:
    s = R.resolve_settings(parser(), argv, recipe=RECIPE, default_model=DEFAULT_MODEL)
    R.check_timm_model(s["model"])
    R.init_processes(s)
    from timm_fslt.training.data import CIFAR10_HUB_ID, load_cifar10
    from timm_fslt.training import ClassificationTask

    data = load_cifar10(s["data"] or CIFAR10_HUB_ID, img_size=s["img_size"] or 32, seed=s["seed"],
                        val_fraction=s["val_fraction"], token=s["hf_token"])
    model, architecture = R.build_timm_model(s, data.num_classes)
    hub_ids = [data.source] if not os.path.exists(os.path.expanduser(data.source)) else []
    return R.run(RECIPE, s, model, data, task=ClassificationTask(s["label_smoothing"]),
                 architecture=architecture, dataset_ids=hub_ids, extra_info={"img_size": s["img_size"] or 32})


if __name__ == "__main__":
    R.main_guard(main)
