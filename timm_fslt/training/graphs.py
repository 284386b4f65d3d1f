"""OGBN-Arxiv through ``ogb``'s ``PygNodePropPredDataset`` (guarded so it never waits on stdin
and never calls PyPI), as one graph for full-graph training: ``load_ogbn_arxiv``, ``GraphSplit``,
``GraphData``.  Re-exported by ``timm_fslt.training.data``."""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass

import torch
from accelerate import PartialState
from torch.utils.data import Dataset

from timm_fslt.training.config import DataError

# -- OGBN-Arxiv ------------------------------------------------------------------------
OGBN_ARXIV = "ogbn-arxiv"
OGBN_ARXIV_RAW = ("edge.csv.gz", "node-feat.csv.gz", "node-label.csv.gz", "num-node-list.csv.gz",
                  "num-edge-list.csv.gz", "node_year.csv.gz")
OGBN_SPLITS = ("train", "valid", "test")


class GraphSplit(Dataset):
    """The whole graph as one example, with the node indices of one split (full-graph training)."""

    def __init__(self, x: torch.Tensor, edge_index: torch.Tensor, y: torch.Tensor, index: torch.Tensor):
        self.graph = {"x": x, "edge_index": edge_index, "y": y, "index": index}

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int) -> dict:
        if i != 0:
            raise IndexError(i)
        return self.graph


@dataclass
class GraphData:
    train: GraphSplit
    val: GraphSplit
    test: GraphSplit
    num_features: int
    num_classes: int
    num_nodes: int
    num_edges: int
    source: str = ""

    def fingerprint(self) -> dict:
        return {"nodes": self.num_nodes, "edges": self.num_edges, "features": self.num_features,
                "num_classes": self.num_classes,
                **{f"{name}_nodes": int(s.graph["index"].numel())
                   for name, s in (("train", self.train), ("val", self.val), ("test", self.test))}}


def import_ogb():
    """Import ogb without its PyPI version check (a thread that calls the network)."""
    os.environ.setdefault("OUTDATED_IGNORE", "1")
    import ogb  # noqa: F401
    from torch_geometric.data.data import DataEdgeAttr, DataTensorAttr
    from torch_geometric.data.storage import GlobalStorage

    # ogb 1.3.6 torch.load()s its processed file; torch >= 2.6 loads weights only by default.
    torch.serialization.add_safe_globals([DataEdgeAttr, DataTensorAttr, GlobalStorage])
    return ogb


def _check_ogbn_folder(root: str, download: bool, arg: str) -> None:
    if not os.path.isdir(root):
        if download:
            return
        raise FileNotFoundError(f"{arg}: {root!r} does not exist; point it at a folder holding ogbn_arxiv/ "
                                "or pass --download to let ogb fetch OGBN-Arxiv (about 80 MB) there")
    folder = next((os.path.join(root, d) for d in ("ogbn_arxiv_pyg", "ogbn_arxiv")
                   if os.path.isdir(os.path.join(root, d))), None)
    if folder is None:
        if download:
            return
        raise FileNotFoundError(f"{arg}: {root!r} has no ogbn_arxiv/ folder (found {sorted(os.listdir(root))[:10]}); "
                                "pass --download to let ogb fetch it")
    if not os.path.exists(os.path.join(folder, "RELEASE_v1.txt")):
        # ogb would stop and ask on stdin whether to delete the folder; say it instead.
        raise DataError(f"{arg}: {folder!r} lacks RELEASE_v1.txt, so ogb takes it for an outdated copy "
                         "and would prompt to delete it; delete the folder and pass --download, or add "
                         "the file if the data is current")
    processed = os.path.exists(os.path.join(folder, "processed", "geometric_data_processed.pt"))
    missing = [f"raw/{f}" for f in OGBN_ARXIV_RAW if not os.path.exists(os.path.join(folder, "raw", f))]
    missing += [f"split/time/{s}.csv.gz" for s in OGBN_SPLITS
                if not os.path.exists(os.path.join(folder, "split", "time", f"{s}.csv.gz"))]
    split_missing = [m for m in missing if m.startswith("split/")]
    if (not processed and missing) or (processed and split_missing):
        if download and not processed:
            return
        raise FileNotFoundError(f"{arg}: {folder!r} is not an ogbn-arxiv folder: missing {missing}")


def load_ogbn_arxiv(root: str, *, download: bool = False, undirected: bool = True,
                    arg: str = "--data-root") -> GraphData:
    """OGBN-Arxiv with its default (time) split, as one graph for full-graph training."""
    root = os.path.expanduser(root)
    _check_ogbn_folder(root, download, arg)
    import_ogb()  # ogb (heavy, optional to the image recipes) only behind its guard
    from ogb.nodeproppred import PygNodePropPredDataset

    if download:
        os.makedirs(root, exist_ok=True)
    # The first process converts the csv files; the others then read the cached result.
    with PartialState().main_process_first(), _no_stdin():
        dataset = PygNodePropPredDataset(name=OGBN_ARXIV, root=root)
        split = dataset.get_idx_split()
    data = dataset[0]
    if getattr(data, "x", None) is None or getattr(data, "y", None) is None:
        raise DataError(f"{arg}: the graph under {root!r} lacks node features or labels")
    y = data.y.view(-1).long()
    edge_index = data.edge_index
    if undirected:
        from torch_geometric.utils import to_undirected  # PyG is heavy: imported for graphs only
        edge_index = to_undirected(edge_index, num_nodes=data.num_nodes)
    sets = {}
    for name in OGBN_SPLITS:
        index = torch.as_tensor(split[name]).long()
        if index.numel() and (index.min() < 0 or index.max() >= data.num_nodes):
            raise DataError(f"{arg}: split {name} has node indices outside [0, {data.num_nodes})")
        sets[name] = GraphSplit(data.x.float(), edge_index, y, index)
    return GraphData(train=sets["train"], val=sets["valid"], test=sets["test"],
                     num_features=int(data.x.shape[1]), num_classes=int(dataset.num_classes),
                     num_nodes=int(data.num_nodes), num_edges=int(edge_index.shape[1]), source=root)


@contextlib.contextmanager
def _no_stdin():
    """ogb asks questions with input(); with no terminal it must fail, not wait forever."""
    saved = sys.stdin
    if not (sys.stdin and sys.stdin.isatty()):
        sys.stdin = open(os.devnull)
    try:
        yield
    finally:
        if sys.stdin is not saved:
            sys.stdin.close()
            sys.stdin = saved

