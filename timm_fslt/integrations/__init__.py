"""Bridges from frozen networks to other libraries of the pruning ecosystem.

``timm_fslt.pruning.torch_pruning``: DepGraph pruners, a supermask importance
and operation counting for frozen layers (imported on demand, so ``import
timm_fslt`` does not import torch-pruning).
"""
