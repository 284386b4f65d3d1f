"""Tiny datasets written in the real on-disk formats the recipes read.

- ``write_saved_image_dataset``: a ``datasets.DatasetDict`` (``save_to_disk``) with an
  Image column (``img`` like uoft-cs/cifar10, or ``image``) and a ClassLabel ``label``.
- ``write_image_folder``: ``<root>/<split>/<class>/<n>.png``.
- ``write_ogbn_arxiv``: the ogbn-arxiv folder ogb expects (``RELEASE_v1.txt``, the raw
  ``*.csv.gz`` files and ``split/time/{train,valid,test}.csv.gz``) for a small graph.

Images are class-coloured noise and node features carry the label, so a few steps
of training already move accuracy (the tests check the loop, not the paper).
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

CLASS_NAMES = [f"c{i}" for i in range(10)]


def _images(n: int, num_classes: int, size: int, seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    labels = np.arange(n) % num_classes
    images = []
    for label in labels:
        base = np.array([(label * 37) % 256, (label * 91) % 256, (label * 53) % 256], dtype=np.float64)
        pixels = np.clip(base + rng.normal(0, 40, size=(size, size, 3)), 0, 255).astype(np.uint8)
        images.append(Image.fromarray(pixels, mode="RGB"))
    return images, labels.tolist()


def write_saved_image_dataset(path, *, n_train: int = 40, n_test: int = 20, num_classes: int = 10,
                              size: int = 32, image_column: str = "img", test_split: str = "test",
                              label_column: str = "label") -> Path:
    import datasets

    features = datasets.Features({image_column: datasets.Image(),
                                  label_column: datasets.ClassLabel(names=CLASS_NAMES[:num_classes])})
    splits = {}
    for split, n, seed in (("train", n_train, 0), (test_split, n_test, 1)):
        images, labels = _images(n, num_classes, size, seed)
        splits[split] = datasets.Dataset.from_dict({image_column: images, label_column: labels},
                                                   features=features)
    datasets.DatasetDict(splits).save_to_disk(str(path))
    return Path(path)


def write_image_folder(root, *, splits=("train", "test"), n_per_split=(40, 20), num_classes: int = 10,
                       size: int = 32) -> Path:
    root = Path(root)
    for seed, (split, n) in enumerate(zip(splits, n_per_split)):
        images, labels = _images(n, num_classes, size, seed)
        for i, (image, label) in enumerate(zip(images, labels)):
            folder = root / split / CLASS_NAMES[label]
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{i:05d}.png")
    return root


def _csv_gz(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        for row in rows:
            f.write(",".join(str(v) for v in (row if isinstance(row, (list, tuple, np.ndarray)) else [row])) + "\n")


def write_ogbn_arxiv(root, *, num_nodes: int = 60, num_features: int = 16, num_classes: int = 5,
                     seed: int = 0, release_file: bool = True) -> Path:
    """An ogbn-arxiv-shaped folder under ``root`` (``root/ogbn_arxiv/...``) for a small graph."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "ogbn_arxiv"
    labels = rng.integers(0, num_classes, size=num_nodes)
    feats = rng.normal(0, 1, size=(num_nodes, num_features)).astype(np.float32)
    feats[np.arange(num_nodes), labels] += 2.0  # the label leaks into the features: learnable
    src = rng.integers(0, num_nodes, size=num_nodes * 3)
    dst = rng.integers(0, num_nodes, size=num_nodes * 3)
    edges = [(int(a), int(b)) for a, b in zip(src, dst) if a != b]
    raw = folder / "raw"
    _csv_gz(raw / "edge.csv.gz", edges)
    _csv_gz(raw / "node-feat.csv.gz", [[f"{v:.6f}" for v in row] for row in feats])
    _csv_gz(raw / "node-label.csv.gz", labels.tolist())
    _csv_gz(raw / "num-node-list.csv.gz", [num_nodes])
    _csv_gz(raw / "num-edge-list.csv.gz", [len(edges)])
    _csv_gz(raw / "node_year.csv.gz", (2010 + np.arange(num_nodes) % 10).tolist())
    order = rng.permutation(num_nodes)
    n_train, n_valid = int(num_nodes * 0.6), int(num_nodes * 0.2)
    split = folder / "split" / "time"
    _csv_gz(split / "train.csv.gz", sorted(order[:n_train].tolist()))
    _csv_gz(split / "valid.csv.gz", sorted(order[n_train:n_train + n_valid].tolist()))
    _csv_gz(split / "test.csv.gz", sorted(order[n_train + n_valid:].tolist()))
    if release_file:
        (folder / "RELEASE_v1.txt").write_text("ogbn-arxiv test fixture\n")
    return Path(root)


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def recipes_dir() -> str:
    return os.fspath(repo_root() / "recipes")
