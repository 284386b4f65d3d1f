"""A strong lottery ticket in PyTorch Geometric's own GIN, on Zachary's karate club graph.

    python examples/gin_karate.py            # GIN, 3 layers, 50% frozen (prune 0.25, lock 0.25)
    python examples/gin_karate.py --quick    # a few epochs (smoke test)

KarateClub ships inside PyG (no download).  ``timm_fslt.freeze`` handles PyG's
``Linear`` layers like any other; the search is the shared loop
``timm_fslt.training.loop.train`` with full-graph node classification.  Training nodes are
the four labelled ones PyG marks (one per community); the other 30 are split into
validation and test.
"""
import argparse

import torch
from torch_geometric.datasets import KarateClub
from torch_geometric.nn.models import GIN

import timm_fslt
from timm_fslt.training.data import GraphSplit, permutation
from timm_fslt.training import NodeClassificationTask, TrainConfig, train


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prune", type=float, default=0.25)
    p.add_argument("--lock", type=float, default=0.25)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--out", default="runs/gin_karate")
    p.add_argument("--quick", action="store_true", help="5 epochs")
    args = p.parse_args(argv)

    data = KarateClub()[0]
    train_idx = data.train_mask.nonzero().view(-1)
    rest = (~data.train_mask).nonzero().view(-1)
    rest = rest[permutation(rest.numel(), 0, "karate-split")]  # seeded, the same everywhere
    val_idx, test_idx = rest[: rest.numel() // 2], rest[rest.numel() // 2:]
    splits = [GraphSplit(data.x, data.edge_index, data.y, idx) for idx in (train_idx, val_idx, test_idx)]

    # PyG's GIN: GINConv layers around MLPs built from torch_geometric's own Linear.  jk="cat"
    # keeps every conv at the hidden width and classifies with one Linear over all layers'
    # features (without it the last GINConv squeezes through a 4-unit hidden layer, where a
    # random sparse mask easily leaves no path).  No normalisation layers, so the kept weights
    # are scaled by 1/sqrt(density) instead (scale="static") to keep activations at the dense scale.
    model = GIN(in_channels=data.num_features, hidden_channels=args.hidden, num_layers=3,
                out_channels=int(data.y.max()) + 1, jk="cat")
    timm_fslt.freeze(model, prune=args.prune, lock=args.lock, seed=0, scale="static")
    print(timm_fslt.size_report(model))

    # AdamW for GNNs, as the paper does on OGBN-Arxiv.
    config = TrainConfig(output_dir=args.out, epochs=5 if args.quick else args.epochs, optimizer="adamw",
                         lr=0.01, weight_decay=1e-4, overwrite=True, save_ticket=False, progress=False)
    results = train(model, *splits, config, task=NodeClassificationTask())
    print(f"\nGIN ticket on KarateClub: val accuracy {100 * results['accuracy']['val']:.1f}%, "
          f"test accuracy {100 * results['accuracy']['test']:.1f}% ({test_idx.numel()} nodes), "
          f"sparsity {results['sparsity']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
