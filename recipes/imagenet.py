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

RECIPE, DEFAULT_MODEL = "imagenet", "resnet18"


def parser():
    return R.build_parser(RECIPE, __doc__.split("\n")[0], image=True)


def main(argv=None) -> dict:
    s = R.resolve_settings(parser(), argv, recipe=RECIPE, default_model=DEFAULT_MODEL)
    R.check_timm_model(s["model"])
    R.init_processes(s)
    from timm_fslt.training.data import IMAGENET_HUB_ID, load_imagenet
    from timm_fslt.training import ClassificationTask

    data = load_imagenet(s["data"] or IMAGENET_HUB_ID, img_size=s["img_size"] or 224, seed=s["seed"],
                         val_fraction=s["val_fraction"], token=s["hf_token"] or os.environ.get("HF_TOKEN"))
    model, architecture = R.build_timm_model(s, data.num_classes)
    hub_ids = [data.source] if not os.path.exists(os.path.expanduser(data.source)) else []
    return R.run(RECIPE, s, model, data, task=ClassificationTask(s["label_smoothing"]),
                 architecture=architecture, dataset_ids=hub_ids, extra_info={"img_size": s["img_size"] or 224})


if __name__ == "__main__":
    R.main_guard(main)
