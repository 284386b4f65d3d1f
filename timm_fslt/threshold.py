"""Exact top-k selection of scores with deterministic tie-breaking.

``topk_mask(values, k)`` marks exactly ``k`` entries: every value above the k-th
largest, then as many of the values equal to it as are still needed, lowest index
first.  That is the same set a stable descending sort would keep, found in O(n)
with ``torch.kthvalue`` (quickselect on the CPU, radix select on CUDA) instead of
an O(n log n) sort.
"""
from __future__ import annotations

import torch


def topk_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` largest entries of a 1-D tensor (ties: lower index wins)."""
    n = values.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=values.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=values.device)
    # The k-th largest value, i.e. the (n - k + 1)-th smallest.
    kth = torch.kthvalue(values, n - k + 1).values
    above = values > kth
    ties = values == kth
    need = k - int(above.sum())
    n_ties = int(ties.sum())
    if n_ties == need:
        return above | ties
    # Keep only the first `need` tied entries in index order.
    return above | (ties & (torch.cumsum(ties, 0, dtype=torch.int32) <= need))


def reference_topk_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """The same selection by a full stable sort; used by tests and benchmarks."""
    n = values.numel()
    out = torch.zeros(n, dtype=torch.bool, device=values.device)
    if k > 0:
        order = torch.sort(values, descending=True, stable=True).indices
        out[order[:min(k, n)]] = True
    return out
