"""ImageNet with ResNet-18: strong lottery tickets in partially frozen random networks.

    accelerate launch recipes/imagenet.py --data /datasets/imagenet --prune 0.49 --lock 0.21
    accelerate launch --multi_gpu --num_processes 8 recipes/imagenet.py --hf-token $HF_TOKEN

Defaults are the paper's (presets/imagenet_resnet18.yaml): as CIFAR-10 ResNet-18 (100
epochs, SGD lr 0.1 momentum 0.9, weight decay 1e-4, cosine) with a global batch of
256; signed Kaiming constant weights with dynamic scaling as in the reference code;
random resized crop + flip.  Train/val = 4:1 split of the train split; the official
validation split is the test set.  Data: ILSVRC/imagenet-1k on the Hub (gated: needs
a token and accepted terms) or a local folder with train/ and val/ image folders.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fslt_recipe as R  # noqa: E402
from timm_fslt.training.data import IMAGENET_HUB_ID, load_imagenet  # noqa: E402

RECIPE, DEFAULT_MODEL = "imagenet", "resnet18"
# imagenet-1k is gated: without --hf-token, HF_TOKEN goes to the loader.
parser, main = R.image_recipe(RECIPE, __doc__, default_model=DEFAULT_MODEL, load=load_imagenet,
                              default_data=IMAGENET_HUB_ID, img_size=224, env_token=True)


if __name__ == "__main__":
    R.main_guard(main)
