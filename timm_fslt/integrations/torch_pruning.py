"""Kept for code written against 0.1: the torch-pruning bridge now lives in ``timm_fslt.pruning``."""
from timm_fslt.pruning.torch_pruning import *  # noqa: F401,F403
from timm_fslt.pruning.torch_pruning import __all__  # noqa: F401
