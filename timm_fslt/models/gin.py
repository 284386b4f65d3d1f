"""GIN for node classification (OGBN-Arxiv), as in the paper, built from PyG layers.

``num_layers`` GINConv layers with mean aggregation and eps = 0 (not trained);
each layer's MLP is Linear -> BatchNorm -> ReLU -> Linear with PyG ``Linear``s
and no biases; non-affine BatchNorm and ReLU between layers.  The last GINConv
maps to the classes and the output is the mean of it and a linear read-out of
the layer before: ``(lin(h[-2]) + h[-1]) / 2``.
"""
from __future__ import annotations

import torch
from torch import nn



class GIN(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, hidden: int = 386, num_layers: int = 4,
                 dropout: float = 0.0):
        super().__init__()
        from torch_geometric.nn import GINConv
        from torch_geometric.nn.dense.linear import Linear

        if num_layers < 2:
            raise ValueError(f"num_layers must be at least 2, got {num_layers}")
        self.in_channels, self.num_classes, self.hidden, self.num_layers = in_channels, num_classes, hidden, num_layers
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        for i in range(num_layers):
            c_in = in_channels if i == 0 else hidden
            c_out = num_classes if i == num_layers - 1 else hidden
            mlp = nn.Sequential(Linear(c_in, hidden, bias=False),
                                nn.BatchNorm1d(hidden, affine=False), nn.ReLU(),
                                Linear(hidden, c_out, bias=False))
            self.convs.append(GINConv(mlp, eps=0.0, train_eps=False, aggr="mean"))
            if i < num_layers - 1:
                self.norms.append(nn.BatchNorm1d(hidden, affine=False))
        self.readout = Linear(hidden, num_classes, bias=False)
        self.dropout = dropout
        self.num_features = hidden

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        h = x
        for i, conv in enumerate(self.convs[:-1]):
            h = torch.relu(self.norms[i](conv(h, edge_index)))
            h = nn.functional.dropout(h, self.dropout, self.training)
        out = self.convs[-1](h, edge_index)
        return (self.readout(h) + out) / 2


def gin(in_channels: int, num_classes: int, hidden: int = 386, num_layers: int = 4,
        dropout: float = 0.0) -> GIN:
    """Builder used by tickets (``{"builder": "gin"}``) and the OGBN-Arxiv recipe."""
    return GIN(in_channels, num_classes, hidden, num_layers, dropout)
