"""Kept for code written against 0.1 (and the README's ``timm_fslt.train.train``): the training
loop now lives in ``timm_fslt.training``, which exports the same public names (``read_jsonl``,
a helper of the tests, is gone)."""
from timm_fslt.atomic import write_text_atomic  # noqa: F401
from timm_fslt.training import *  # noqa: F401,F403
from timm_fslt.training import TrainConfig, train  # noqa: F401
