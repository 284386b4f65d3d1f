"""The masked weight ``W * mask * scale`` as an autograd function.

Forward: one elementwise product.  Backward: the straight-through estimator, evaluated
at the free weights only (where the scores live); see ``_MaskedWeight``.  The
parametrization (``timm_fslt.nn.supermask``) calls ``masked_weight``; the recompute
machinery (``timm_fslt.nn.recompute``) rebuilds the same product in the backward.
Under ``torch.export`` and ``torch.jit.trace`` the parametrization records
``traced_masked_weight`` instead (plain operations), and the messages that refuse what
cannot be exported are here too.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from timm_fslt.regen import native


def masked_product(weight: torch.Tensor, mask: torch.Tensor, scale: Optional[torch.Tensor],
                   out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``W * mask * scale`` with one weight-sized allocation (no autograd), or none: into ``out``."""
    if weight.device.type == "cpu":
        # The product's own buffer is the only weight-sized allocation: the mask
        # is widened into it (uint8 -> float is vectorized), then multiplied in
        # place.  ``weight * mask`` would first make a float copy of the mask (CPU
        # kernels do not mix dtypes) and run a slow unvectorized loop.
        wide = mask.view(torch.uint8)
        out = wide.to(weight.dtype) if out is None else out.copy_(wide)
        out.mul_(weight)
    else:  # GPU kernels cast inside the kernel: one pass, no copy
        out = torch.mul(weight, mask, out=out)
    return out if scale is None else out.mul_(scale)


def _use_count(tensor: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata)


_IDLE = _use_count(torch.empty(1))  # a tensor's storage held by that tensor alone (and the probe)


def product_buffer(layer, weight: torch.Tensor) -> torch.Tensor:
    """Memory for this step's ``W * mask * scale`` of ``layer``: last step's, if nothing holds it any
    more (no autograd graph saved it, nobody kept the weight it was returned as), else a new one,
    kept for the next step.  Writing the same memory every step instead of fresh memory makes the
    CPU convolutions that read it measurably faster (benchmarks/README.md, "step time")."""
    buffer = layer.__dict__.get("_product")
    if buffer is not None:
        if (buffer.shape == weight.shape and buffer.stride() == weight.stride() and buffer.dtype == weight.dtype
                and buffer.device == weight.device and _use_count(buffer) == _IDLE):
            return buffer
    buffer = torch.empty_like(weight)
    layer.__dict__["_product"] = buffer
    layer.__dict__.pop("_product_of", None)
    return buffer


def _scale_key(layer, scale: Optional[torch.Tensor]):
    # the scale a product was made with, as the host knows it (None: no scale; False: unknown)
    return None if scale is None else (layer.__dict__.get("_scale_value") or False)


class _ProductOf(NamedTuple):
    """What a layer's kept product was made of (``layer._product_of``), each tensor with its version."""
    weight: torch.Tensor
    weight_version: int
    mask: torch.Tensor
    mask_version: int
    scale: object  # _scale_key
    buffer: torch.Tensor
    buffer_version: int


def _current_product(layer, mask: torch.Tensor) -> Optional[_ProductOf]:
    """The record of ``layer``'s kept product if the memory still holds ``W * mask * scale`` of this
    mask as it is, its weight as it is and a known scale, and nothing wrote the memory since; else None."""
    made = layer.__dict__.get("_product_of")
    if (made is None or made.mask is not mask or made.mask_version != mask._version or made.scale is False
            or made.weight_version != made.weight._version or made.buffer_version != made.buffer._version):
        return None
    return made


def kept_product(layer, weight: torch.Tensor, mask: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
    """``W * mask * scale`` in ``layer``'s kept memory (``product_buffer``).  Not computed again when
    that memory already holds it: the product of this weight (same tensor and version), this mask
    (same tensor and version: the CPU refresh updates the product where it changes the mask,
    ``nn/cpu_refresh.py``) and this scale, and nothing wrote the memory since (its version)."""
    buffer = product_buffer(layer, weight)
    key = _scale_key(layer, scale)
    made = _current_product(layer, mask)
    if made is None or made.weight is not weight or made.buffer is not buffer or made.scale != key:
        masked_product(weight, mask, scale, out=buffer)
        layer.__dict__["_product_of"] = _ProductOf(weight, weight._version, mask, mask._version, key, buffer,
                                                   buffer._version)
    return buffer


def product_to_update(layer, mask: torch.Tensor):
    """(weight, product, scale) whose product entries the CPU refresh may write where it changes
    ``mask`` -- the kept product is current and nothing holds it -- or None."""
    made = _current_product(layer, mask)
    if made is None:
        return None
    weight, buffer = made.weight, made.buffer
    if (_use_count(buffer) != _IDLE or layer.__dict__.get("_product") is not buffer or weight.dtype != torch.float32
            or not weight.is_contiguous() or not buffer.is_contiguous() or weight.device.type != "cpu"):
        return None
    return weight, buffer, made.scale


def product_updated(layer, mask: torch.Tensor) -> None:
    """After the CPU refresh wrote the product where it changed ``mask``: the product is ``mask``'s."""
    layer.__dict__["_product_of"] = layer.__dict__["_product_of"]._replace(mask_version=mask._version)


_SIGN_CHUNK = 1 << 20  # elements of sign(s) alive at once in the backward

# The scores' gradient in one compiled pass on the CPU (``native.free_gradient``, the torch ops' bits):
# off by default.  Faster alone (1.2 against 2.0 ms for a 0.7M-weight layer) but not in a whole step,
# where its threads compete with torch's: fused / torch ops 1.008 on an AMD EPYC (Zen 4) and 1.013-1.018
# on another (Zen 5), ``benchmarks/step_variants.py``.  True turns it on.
FUSED_GRADIENT = False


def _mul_sign_(out: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """``out *= sign(scores)`` in slices along dim 0, so the float ``sign`` temporary stays
    small: a whole-layer one would be alive together with the incoming gradient and the
    score gradient at the start of the backward, where the memory peak of a step is."""
    n = out.numel()
    if n <= _SIGN_CHUNK or out.shape[0] < 2:  # (a 0-d tensor has n = 1)
        return out.mul_(torch.sign(scores))
    rows = max(1, _SIGN_CHUNK // (n // out.shape[0]))
    for start in range(0, out.shape[0], rows):
        out[start:start + rows].mul_(torch.sign(scores[start:start + rows]))
    return out


def _free_values(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """A new 1-D tensor of ``tensor``'s entries at the row-major flat positions ``index``."""
    # (channels_last: a row-major copy first; one layer's copy is transient, and this is
    # several times faster than torch.take, which reads strided and wants int64 indices)
    return tensor.contiguous().view(-1).index_select(0, index)


# (The class name is observable: a frozen layer's weight has grad_fn "_MaskedWeightBackward",
# which timm_fslt.pruning.compact reads to tell the weight path from data paths.)
class _MaskedWeight(torch.autograd.Function):
    """``W * mask * scale`` forward, straight-through estimator backward.

    The mask is chosen by ``|s|``, and the estimator treats the mask as the identity
    of ``|s|``: ``dL/d|s| = dL/dW_eff * W * scale``, so by the chain rule
    ``dL/ds = dL/dW_eff * W * scale * sign(s)`` (as Edge-Popup's reference does by
    selecting on ``scores.abs()`` inside autograd), evaluated at the free positions
    ``index`` only (None: every weight is free), which is where ``scores`` lives
    (one entry per free weight, in any shape: the gradient is computed 1-D and returned
    in the scores' shape, e.g. the ``(1, n_free)`` row of ``FrozenSupermask``).
    ``scale`` is None when the group does not scale (multiplying by 1 would only
    cost a pass).
    """

    @staticmethod
    def forward(ctx, weight, scores, mask, scale, index, free_weight, owner):
        ctx.save_for_backward(weight, scores, scale, index, free_weight)
        if owner is None:
            return masked_product(weight, mask, scale)
        # (an alias: the buffer itself never gets an autograd history; its version counter is shared,
        # so a graph that saved last step's product would refuse a rewritten one)
        return kept_product(owner, weight, mask, scale).detach()

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[1]:
            return None, None, None, None, None, None, None
        weight, scores, scale, index, free_weight = ctx.saved_tensors
        if index is None:  # every weight is free: elementwise, then flattened like the scores
            grad_scores = torch.mul(grad, weight).reshape(-1)
        else:  # (grad * W)[free] == grad[free] * W[free], bit for bit, at F instead of N elements
            fused = None if not FUSED_GRADIENT or free_weight is not None or torch.compiler.is_compiling() \
                else native.free_gradient(grad, weight, index, scores, scale)
            if fused is not None:  # the same products in one pass over the free weights (CPU, float32)
                return None, fused.view(scores.shape), None, None, None, None, None
            grad_scores = _free_values(grad, index).mul_(
                free_weight if free_weight is not None else _free_values(weight, index))
        if scale is not None:
            grad_scores.mul_(scale)
        if grad_scores.device.type == "cpu":
            _mul_sign_(grad_scores, scores.reshape(-1))
        else:  # (one kernel: the chunks only keep the CPU's memory peak down)
            grad_scores.mul_(torch.sign(scores.reshape(-1)))
        return None, grad_scores.to(scores.dtype).view(scores.shape), None, None, None, None, None


def masked_weight(weight: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor,
                  scale: Optional[torch.Tensor], index: Optional[torch.Tensor],
                  free_weight: Optional[torch.Tensor] = None, owner=None) -> torch.Tensor:
    """``W * mask * scale`` whose gradient reaches the free ``scores`` (int32 positions ``index``;
    None: every weight is free; ``scores``: one per free weight, e.g. 1-D or a ``(1, n)`` row) by
    the straight-through estimator.  ``free_weight``: ``W`` at ``index``, if the caller keeps it
    (else the backward gathers it); ``owner``: the layer whose kept memory holds the product
    (``kept_product``), or None for a new tensor."""
    return _MaskedWeight.apply(weight, scores, mask, scale, index, free_weight, owner)


def traced_masked_weight(weight: torch.Tensor, mask: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
    """``W * mask * scale`` in plain tensor operations, for the graphs ``torch.export`` and
    ``torch.jit.trace`` record (and the ONNX exporters built on them): the weight and mask
    buffers multiplied, no autograd Function, no cached index, so the exported model computes
    the effective weights with ``masked_product``'s bits (``mask * W`` there, ``W * mask`` here).
    No gradient reaches the scores: an exported model is a fixed ticket."""
    out = weight * mask.to(weight.dtype)
    return out if scale is None else out * scale


def script_refusal(layer_name: str) -> str:
    """The message with which ``torch.jit.script`` of a frozen model is refused."""
    return (f"timm_fslt: torch.jit.script cannot compile a frozen model: its layer {layer_name!r} is "
            "parametrized by a FrozenSupermask (torch.nn.utils.parametrize does not support TorchScript). "
            "Script timm_fslt.materialize(model) instead: a plain copy of the model with W * mask as its "
            "weights; torch.jit.trace and torch.export work on the frozen model itself")


def stale_refusal(layer_names: list) -> str:
    """The message with which exporting or tracing masks that may be out of date is refused."""
    names = ", ".join(repr(name) for name in layer_names[:3])
    if len(layer_names) > 3:
        names += f" and {len(layer_names) - 3} more"
    return (f"timm_fslt: the masks of layer(s) {names} may be out of date (the scores were written, or an "
            "optimizer stepped -- any optimizer in this process: a fused one changes scores unseen -- since the "
            "masks were chosen), and torch.export / torch.onnx.export / torch.jit.trace cannot choose them "
            "while tracing. Call timm_fslt.refresh_masks(model) (or run one forward) first, or export "
            "timm_fslt.materialize(model): a plain copy of the model with W * mask as its weights")
