"""Frozen networks inside torch-pruning's DepGraph ecosystem: one import for the three roles.

torch-pruning keeps apart how a layer is cut, how much a channel matters and what a
network costs; so does ``timm_fslt.pruning``, and this module gathers their public
names:

* how a layer is cut (``timm_fslt.pruning.pruners``): ``pruners(model)`` is the
  ``customized_pruners`` dict for ``tp.DependencyGraph().build_dependency`` and
  ``tp.pruner.BasePruner``; ``pruner_kwargs(model)`` adds the PyG ``Linear`` root
  type.  Every cut is recorded in ``model.fslt_structure``
  (``timm_fslt.pruning.record.StructureRecorder``) as indices into the ORIGINAL
  layer, which is what regenerates the weights from the seed
  (``timm_fslt.pruning.compact.restore_structure``).
* how much a channel matters (``timm_fslt.pruning.importance``):
  ``SupermaskImportance`` ranks channels by the learned supermask.
* what a network costs (``timm_fslt.pruning.counting``): ``count_ops_and_params``
  is torch-pruning's counter with hooks for frozen layers and PyG ``Linear``.

After slicing, the masks are re-selected at the next forward: structured pruning
re-bases the ticket's sparsity on the weights that remain.  ``timm_fslt.compact``
instead keeps the budget of the removed weights, so its masks do not move.
"""
from timm_fslt.pruning.counting import count_ops_and_params, op_counting_hooks
from timm_fslt.pruning.geometry import plain_class
from timm_fslt.pruning.importance import SupermaskImportance
from timm_fslt.pruning.pruners import (FrozenDepthwiseConvPruner, FrozenLayerPruner, pruner_kwargs, pruners,
                                       root_module_types)
from timm_fslt.pruning.record import StructureRecorder

__all__ = [
    "FrozenLayerPruner", "FrozenDepthwiseConvPruner", "SupermaskImportance", "StructureRecorder",
    "count_ops_and_params", "op_counting_hooks", "plain_class", "pruner_kwargs", "pruners",
    "root_module_types", "torch_pruning_kwargs",
]

# The name the README and ``timm_fslt.torch_pruning_kwargs`` use: at the top level of
# timm_fslt it has to say which library the keyword arguments are for; inside the
# torch-pruning bridge ``pruner_kwargs`` (beside ``pruners``) says it already.
torch_pruning_kwargs = pruner_kwargs
