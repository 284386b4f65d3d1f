"""Kept for code written against 0.1 (and the README's ``timm_fslt.train.train``): the training
loop now lives in ``timm_fslt.training``."""
from timm_fslt.training.loop import *  # noqa: F401,F403
from timm_fslt.training.loop import TrainConfig, train  # noqa: F401
