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
from timm_fslt.training.data import CIFAR10_HUB_ID, load_cifar10  # noqa: E402

RECIPE, DEFAULT_MODEL = "cifar10", "conv6"
parser, main = R.image_recipe(RECIPE, __doc__, default_model=DEFAULT_MODEL, load=load_cifar10,
                              default_data=CIFAR10_HUB_ID, img_size=32)


if __name__ == "__main__":
    R.main_guard(main)
