"""Datasets of the paper's recipes: CIFAR-10, ImageNet and OGBN-Arxiv, and the 4:1 train/val split.

Image data comes from the Hugging Face Hub through ``datasets`` (``uoft-cs/cifar10``,
``ILSVRC/imagenet-1k``) or from a local path: a ``save_to_disk`` ``DatasetDict``
or an image folder (``train/<class>/*`` next to ``test/`` or ``val/``).  The graph
comes from ``ogb``'s ``PygNodePropPredDataset``, guarded so it never waits on stdin
and never calls PyPI.

Every random choice here (the train/val split, each epoch's order) is a pure
function of the seed computed with ``timm_fslt.regen.rng``, so a run splits and shuffles
the same way on any machine, process count and torch release.
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from accelerate import PartialState
from torch.utils.data import Dataset, Sampler
from torchvision import transforms as T
from torchvision.datasets import ImageFolder

from timm_fslt.regen import rng

IMAGE_COLUMNS = ("img", "image")
LABEL_COLUMN = "label"
CIFAR10_HUB_ID = "uoft-cs/cifar10"
IMAGENET_HUB_ID = "ILSVRC/imagenet-1k"
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Split names tried, in order, for the held-out test set of each dataset.
CIFAR_TEST_SPLITS = ("test", "validation", "val")
IMAGENET_TEST_SPLITS = ("validation", "val", "test")  # imagenet-1k's "test" split has no labels


class DataError(ValueError):
    """The data cannot be used as given (wrong layout, columns, splits); raised before training."""


# -- deterministic order ---------------------------------------------------------------
def permutation(n: int, seed: int, stream: str) -> torch.Tensor:
    """A permutation of ``range(n)`` that depends only on ``(seed, stream)``."""
    keys = rng.bits(seed, "timm_fslt.data", stream, n)  # the key of 0.1: same splits.to(torch.int64)
    return torch.argsort(keys, stable=True)


def split_train_val(n: int, val_fraction: float = 0.2, seed: int = 0) -> tuple[list[int], list[int]]:
    """Indices of a seeded train/val split of ``n`` examples (the paper's 4:1 is ``val_fraction=0.2``)."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"--val-fraction must lie in (0, 1), got {val_fraction}")
    n_train = int(n * (1.0 - val_fraction))
    if n_train < 1 or n - n_train < 1:
        raise DataError(f"cannot split {n} examples into train and val with val_fraction={val_fraction}: "
                         "each side needs at least one example")
    perm = permutation(n, seed, "train-val-split")
    return sorted(perm[:n_train].tolist()), sorted(perm[n_train:].tolist())


class EpochShuffleSampler(Sampler[int]):
    """Training order: a fresh permutation every epoch, a pure function of ``(seed, epoch)``.

    Because the order does not depend on any generator state, a resumed run sees
    exactly the batches the interrupted run would have seen, and every process
    draws the same permutation (Accelerate then hands each process its shard).
    ``num_samples`` truncates each epoch (quick runs, tests).
    """

    def __init__(self, n: int, seed: int = 0, num_samples: Optional[int] = None):
        self.n, self.seed, self.epoch = int(n), int(seed), 0
        self.num_samples = self.n if num_samples is None else min(int(num_samples), self.n)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        return iter(permutation(self.n, self.seed, f"epoch/{self.epoch}")[:self.num_samples].tolist())

    def __len__(self) -> int:
        return self.num_samples


# -- image datasets ------------------------------------------------------------------
class ImageClassificationSet(Dataset):
    """``(transformed image, label)`` pairs from a ``datasets.Dataset`` or a torchvision ``ImageFolder``."""

    def __init__(self, source, indices: Optional[Sequence[int]] = None,
                 transform: Optional[Callable] = None, image_column: Optional[str] = None):
        self.source = source
        self.indices = list(range(len(source))) if indices is None else list(indices)
        self.transform = transform
        self.image_column = image_column  # None: an ImageFolder, which yields (image, label)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        j = self.indices[i]
        if self.image_column is None:
            image, label = self.source[j]
        else:
            row = self.source[j]
            image, label = row[self.image_column], row[LABEL_COLUMN]
        image = image.convert("RGB")
        if self.transform is not None:
            image = self.transform(image)
        return image, int(label)


@dataclass
class ImageData:
    """The three sets of an image recipe (train/val from the train split, test held out)."""

    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    class_names: list = field(default_factory=list)
    source: str = ""

    def fingerprint(self) -> dict:
        """What identifies the data of a run (stored with checkpoints, compared on resume)."""
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test),
                "num_classes": self.num_classes}


def image_transforms(kind: str, img_size: int, mean=None, std=None):
    """(train, eval) transforms: random crop + flip for CIFAR, random resized crop for ImageNet."""
    if kind == "cifar":
        mean, std = mean or CIFAR10_MEAN, std or CIFAR10_STD
        resize = [] if img_size == 32 else [T.Resize(img_size)]
        train = resize + [T.RandomCrop(img_size, padding=max(1, img_size // 8)), T.RandomHorizontalFlip()]
        evaluation = resize + [T.CenterCrop(img_size)]
    elif kind == "imagenet":
        mean, std = mean or IMAGENET_MEAN, std or IMAGENET_STD
        train = [T.RandomResizedCrop(img_size), T.RandomHorizontalFlip()]
        evaluation = [T.Resize(int(round(img_size / 0.875))), T.CenterCrop(img_size)]
    else:
        raise ValueError(f"kind must be 'cifar' or 'imagenet', got {kind!r}")
    tail = [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(train + tail), T.Compose(evaluation + tail)


def _looks_like_path(data: str) -> bool:
    # A Hub id is "name" or "org/name"; anything else is meant as a local path.
    return data.startswith(("/", ".", "~")) or data.count("/") >= 2 or (os.sep != "/" and os.sep in data)


def _check_columns(ds, where: str) -> str:
    columns = list(ds.column_names)
    image_column = next((c for c in IMAGE_COLUMNS if c in columns), None)
    if image_column is None or LABEL_COLUMN not in columns:
        raise DataError(f"--data: the dataset {where} has columns {columns}; expected an image column "
                         f"(one of {list(IMAGE_COLUMNS)}) and a {LABEL_COLUMN!r} column")
    return image_column


def _class_info(ds) -> tuple[int, list]:
    feature = ds.features[LABEL_COLUMN]
    names = list(getattr(feature, "names", None) or [])
    if names:
        return len(names), names
    labels = ds.unique(LABEL_COLUMN)
    return int(max(labels)) + 1, []


def _pick_split(available: Sequence[str], wanted: Sequence[str], where: str, arg: str) -> str:
    for name in wanted:
        if name in available:
            return name
    raise DataError(f"{arg}: {where} has splits {sorted(available)}; expected 'train' and a held-out "
                     f"split named one of {list(wanted)}")


def _is_image_folder_split(path: str) -> bool:
    return os.path.isdir(path) and any(os.path.isdir(os.path.join(path, d)) for d in os.listdir(path))


def load_image_splits(data: str, test_splits: Sequence[str], *, token: Optional[str] = None,
                      arg: str = "--data"):
    """Resolve ``data`` (Hub id, ``save_to_disk`` folder or image folder) to train and test sources.

    Returns ``(train_source, test_source, image_column, num_classes, class_names)``;
    ``image_column`` is None for image folders.  Raises before anything is trained
    when the path is missing, has another layout or lacks the img/label columns.
    """
    expanded = os.path.expanduser(data)
    if os.path.exists(expanded):
        return _load_local(expanded, test_splits, arg)
    if _looks_like_path(data):
        raise FileNotFoundError(f"{arg}: path {data!r} does not exist (give a local dataset folder or a "
                                f"Hub dataset id such as {CIFAR10_HUB_ID!r})")
    import datasets  # heavy: imported only when the Hub is asked

    try:
        with PartialState().main_process_first():  # one process downloads, the others read the cache
            dsd = datasets.load_dataset(data, token=token)
    except Exception as err:  # the Hub client's errors vary (offline, gated, unknown id)
        raise DataError(f"{arg}: could not load Hub dataset {data!r} ({type(err).__name__}: {err}). "
                         "Gated datasets such as ILSVRC/imagenet-1k need a token (--hf-token or HF_TOKEN) "
                         "and accepted terms; offline, give a local path instead") from err
    test_name = _pick_split(list(dsd.keys()), test_splits, f"Hub dataset {data!r}", arg)
    if "train" not in dsd:
        _pick_split([], ["train"], f"Hub dataset {data!r}", arg)
    image_column = _check_columns(dsd["train"], f"{data!r} (train)")
    _check_columns(dsd[test_name], f"{data!r} ({test_name})")
    num_classes, names = _class_info(dsd["train"])
    return dsd["train"], dsd[test_name], image_column, num_classes, names


def _load_local(path: str, test_splits: Sequence[str], arg: str):
    if not os.path.isdir(path):
        raise DataError(f"{arg}: {path!r} is a file; expected a folder ({_LAYOUTS})")
    entries = sorted(os.listdir(path))
    if "dataset_dict.json" in entries:
        import datasets  # heavy: imported only for a saved DatasetDict

        dsd = datasets.load_from_disk(path)
        test_name = _pick_split(list(dsd.keys()), test_splits, f"saved dataset {path!r}", arg)
        if "train" not in dsd:
            raise DataError(f"{arg}: saved dataset {path!r} has splits {sorted(dsd.keys())}; "
                             "expected a 'train' split")
        image_column = _check_columns(dsd["train"], f"at {path!r} (train)")
        _check_columns(dsd[test_name], f"at {path!r} ({test_name})")
        num_classes, names = _class_info(dsd["train"])
        return dsd["train"], dsd[test_name], image_column, num_classes, names
    if "state.json" in entries and "dataset_info.json" in entries:
        raise DataError(f"{arg}: {path!r} holds a single saved Dataset; save a DatasetDict with a 'train' "
                         f"and a test split (one of {list(test_splits)}) instead")
    test_dir = next((s for s in test_splits if _is_image_folder_split(os.path.join(path, s))), None)
    if _is_image_folder_split(os.path.join(path, "train")) and test_dir is not None:
        train = ImageFolder(os.path.join(path, "train"))
        test = ImageFolder(os.path.join(path, test_dir))
        if train.classes != test.classes:
            raise DataError(f"{arg}: image folder {path!r}: class folders of train/ ({len(train.classes)}) "
                             f"and {test_dir}/ ({len(test.classes)}) differ; both need the same class names")
        return train, test, None, len(train.classes), list(train.classes)
    raise DataError(f"{arg}: {path!r} has an unknown layout (found {entries[:10]}); expected {_LAYOUTS}")


_LAYOUTS = ("a DatasetDict written by save_to_disk (dataset_dict.json, a 'train' split and a test split, "
            "columns img or image, and label) or an image folder with train/<class>/<images> and "
            "test/ or val/ laid out the same way")


def load_image_data(data: str, kind: str, *, img_size: int, seed: int = 0, val_fraction: float = 0.2,
                    token: Optional[str] = None, arg: str = "--data") -> ImageData:
    """Train/val (split of the train split) and test sets with the recipe's transforms."""
    test_splits = CIFAR_TEST_SPLITS if kind == "cifar" else IMAGENET_TEST_SPLITS
    train_src, test_src, column, num_classes, names = load_image_splits(
        data, test_splits, token=token, arg=arg)
    train_idx, val_idx = split_train_val(len(train_src), val_fraction, seed)
    train_tf, eval_tf = image_transforms(kind, img_size)
    return ImageData(
        train=ImageClassificationSet(train_src, train_idx, train_tf, column),
        val=ImageClassificationSet(train_src, val_idx, eval_tf, column),
        test=ImageClassificationSet(test_src, None, eval_tf, column),
        num_classes=num_classes, class_names=names, source=data)


def load_cifar10(data: str = CIFAR10_HUB_ID, *, img_size: int = 32, seed: int = 0,
                 val_fraction: float = 0.2, token: Optional[str] = None) -> ImageData:
    return load_image_data(data, "cifar", img_size=img_size, seed=seed, val_fraction=val_fraction, token=token)


def load_imagenet(data: str = IMAGENET_HUB_ID, *, img_size: int = 224, seed: int = 0,
                  val_fraction: float = 0.2, token: Optional[str] = None) -> ImageData:
    return load_image_data(data, "imagenet", img_size=img_size, seed=seed, val_fraction=val_fraction, token=token)


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

