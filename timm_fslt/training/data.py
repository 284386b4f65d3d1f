"""Datasets of the paper's recipes: CIFAR-10, ImageNet and OGBN-Arxiv, and the 4:1 train/val split.

Image data comes from the Hugging Face Hub through ``datasets`` (``uoft-cs/cifar10``,
``ILSVRC/imagenet-1k``) or from a local path: a ``save_to_disk`` ``DatasetDict``,
a local copy of a Hub dataset repo (its parquet files) or an image folder (``train/<class>/*``
next to ``test/`` or ``val/``); only the train and held-out splits are prepared.  Transforms
come from timm's data config (``transforms``); the graph of OGBN-Arxiv from ``graphs``
(both re-exported here).

Every random choice here (the train/val split, each epoch's order) is a pure
function of the seed computed with ``timm_fslt.regen.rng``, so a run splits and shuffles
the same way on any machine, process count and torch release.
"""
from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from accelerate import PartialState
from torch.utils.data import Dataset, Sampler
from torchvision.datasets import ImageFolder

from timm_fslt.regen import rng
from timm_fslt.training.config import DataError
from timm_fslt.training.graphs import (OGBN_ARXIV, OGBN_ARXIV_RAW, OGBN_SPLITS, GraphData, GraphSplit,  # noqa: F401
                                       import_ogb, load_ogbn_arxiv)
from timm_fslt.training.transforms import (CIFAR10_MEAN, CIFAR10_STD, DATA_CONFIG_KEYS, DEFAULT_MODELS,  # noqa: F401
                                           IMAGENET_MEAN, IMAGENET_STD, KINDS, image_transforms,
                                           resolve_image_data_config)

IMAGE_COLUMNS = ("img", "image")
LABEL_COLUMN = "label"
CIFAR10_HUB_ID = "uoft-cs/cifar10"
IMAGENET_HUB_ID = "ILSVRC/imagenet-1k"
# Split names tried, in order, for the held-out test set of each dataset.
CIFAR_TEST_SPLITS = ("test", "validation", "val")
IMAGENET_TEST_SPLITS = ("validation", "val", "test")  # imagenet-1k's "test" split has no labels


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


def epoch_seed(seed: int, epoch: int) -> int:
    """A seed for the train loader's generator in ``epoch`` (the workers' base seed), from the run's seed."""
    return int(rng.bits(seed, "timm_fslt.data", f"loader/epoch/{int(epoch)}", 1)[0])


@contextlib.contextmanager
def _seeded(seed: int):
    """torch's CPU generator and Python's ``random`` seeded with ``seed`` inside, restored after."""
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(python_state)


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
    """``(transformed image, label)`` pairs from a ``datasets.Dataset`` or a torchvision ``ImageFolder``.

    With ``seed`` (the train set), ``set_epoch(e)`` makes the random augmentation of example
    ``i`` in epoch ``e`` a pure function of ``(seed, e, i)`` (torch's and Python's generators
    are seeded around the transform and restored): the same in any worker, with any number
    of workers, and after a mid-epoch resume.  Without (val, test), the transform runs as is.
    """

    def __init__(self, source, indices: Optional[Sequence[int]] = None,
                 transform: Optional[Callable] = None, image_column: Optional[str] = None,
                 seed: Optional[int] = None):
        self.source = source
        self.indices = list(range(len(source))) if indices is None else list(indices)
        self.transform = transform
        self.image_column = image_column  # None: an ImageFolder, which yields (image, label)
        self.seed = seed
        self._sample_seeds: Optional[list] = None

    def set_epoch(self, epoch: int) -> None:
        if self.seed is not None:
            self._sample_seeds = rng.bits(self.seed, "timm_fslt.data", f"augment/epoch/{int(epoch)}",
                                          len(self.indices)).tolist()

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
            if self._sample_seeds is None:
                image = self.transform(image)
            else:
                with _seeded(self._sample_seeds[i]):
                    image = self.transform(image)
        return image, int(label)


@dataclass
class ImageData:
    """The three sets of an image recipe (train/val from the train split, test held out).

    ``data_config`` is timm's data config the transforms were built from (the eval one is
    what a ticket records); ``use_data_config`` rebuilds the transforms from another."""

    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    class_names: list = field(default_factory=list)
    source: str = ""
    kind: str = "imagenet"
    data_config: dict = field(default_factory=dict)

    def fingerprint(self) -> dict:
        """What identifies the data of a run (stored with checkpoints, compared on resume)."""
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test),
                "num_classes": self.num_classes}

    def use_data_config(self, data_config: dict) -> "ImageData":
        """Build the train and eval transforms from timm's ``data_config`` (see ``image_transforms``)."""
        train_tf, eval_tf = image_transforms(self.kind, data_config)
        self.train.transform, self.val.transform, self.test.transform = train_tf, eval_tf, eval_tf
        self.data_config = {k: data_config[k] for k in DATA_CONFIG_KEYS if k in data_config}
        return self


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
                      arg: str = "--data", num_proc: Optional[int] = None):
    """Resolve ``data`` (Hub id, ``save_to_disk`` folder, a local copy of a Hub dataset repo or an
    image folder) to train and test sources.

    Returns ``(train_source, test_source, image_column, num_classes, class_names)``;
    ``image_column`` is None for image folders.  Raises before anything is trained
    when the path is missing, has another layout or lacks the img/label columns.
    Through ``datasets`` only the two splits used are prepared (``load_hub_splits``).
    """
    if num_proc is not None and (isinstance(num_proc, bool) or not isinstance(num_proc, int) or num_proc < 1):
        raise DataError(f"--data-num-proc must be a positive int or None, got {num_proc!r}")
    expanded = os.path.expanduser(data)
    if os.path.exists(expanded):
        return _load_local(expanded, test_splits, arg, token=token, num_proc=num_proc)
    if _looks_like_path(data):
        raise FileNotFoundError(f"{arg}: path {data!r} does not exist (give a local dataset folder or a "
                                f"Hub dataset id such as {CIFAR10_HUB_ID!r})")
    return load_hub_splits(data, test_splits, token=token, num_proc=num_proc, arg=arg,
                           where=f"Hub dataset {data!r}")


def load_hub_splits(data: str, test_splits: Sequence[str], *, token: Optional[str] = None,
                    num_proc: Optional[int] = None, arg: str = "--data", where: str = ""):
    """The train split and the first of ``test_splits`` of a Hub dataset (or a local copy of
    its repo), and nothing else.

    ``datasets.load_dataset(data, split=...)`` alone still downloads and prepares every
    split (imagenet-1k's 100,000 unlabelled test images too), so the builder is asked first
    which data files make up which split (metadata only), and ``load_dataset`` gets the data
    files of the two splits used, the builder's features (class names) and ``num_proc``.
    """
    import datasets  # heavy: imported only when a Hub dataset is asked for

    where = where or f"dataset {data!r}"
    try:
        with PartialState().main_process_first():  # one process downloads, the others read the cache
            builder = datasets.load_dataset_builder(data, token=token)
            files = builder.config.data_files
            available = list(files) if files else list(builder.info.splits or {})
            test_name = _pick_split(available, test_splits, where, arg)
            if "train" not in available:
                raise DataError(f"{arg}: {where} has splits {sorted(available)}; expected a 'train' split")
            used = ["train", test_name]
            kwargs = {"data_files": {name: files[name] for name in used}} if files else {}
            train, test = datasets.load_dataset(data, split=used, token=token, num_proc=num_proc,
                                                features=builder.info.features, **kwargs)
    except DataError:
        raise
    except Exception as err:  # the Hub client's errors vary (offline, gated, unknown id)
        raise DataError(f"{arg}: could not load {where} ({type(err).__name__}: {err}). "
                         "Gated datasets such as ILSVRC/imagenet-1k need a token (--hf-token or HF_TOKEN) "
                         "and accepted terms; offline, give a local path instead") from err
    image_column = _check_columns(train, f"{data!r} (train)")
    _check_columns(test, f"{data!r} ({test_name})")
    num_classes, names = _class_info(train)
    return train, test, image_column, num_classes, names


def _holds_data_files(path: str) -> bool:
    """A local copy of a Hub dataset repo: parquet or arrow files at most two folders down."""
    for root, dirs, names in os.walk(path):
        if any(n.endswith((".parquet", ".arrow")) for n in names):
            return True
        if os.path.relpath(root, path).count(os.sep) >= 1:
            dirs[:] = []
    return False


def _load_local(path: str, test_splits: Sequence[str], arg: str, *, token: Optional[str] = None,
                num_proc: Optional[int] = None):
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
    if _holds_data_files(path):
        return load_hub_splits(path, test_splits, token=token, num_proc=num_proc, arg=arg,
                               where=f"the dataset repo copy {path!r}")
    raise DataError(f"{arg}: {path!r} has an unknown layout (found {entries[:10]}); expected {_LAYOUTS}")


_LAYOUTS = ("a DatasetDict written by save_to_disk (dataset_dict.json, a 'train' split and a test split, "
            "columns img or image, and label), a local copy of a Hub dataset repo (its parquet files), "
            "or an image folder with train/<class>/<images> and "
            "test/ or val/ laid out the same way")


def load_image_data(data: str, kind: str, *, img_size: Optional[int] = None, seed: int = 0,
                    val_fraction: float = 0.2, token: Optional[str] = None, arg: str = "--data",
                    model=None, data_config: Optional[dict] = None, num_proc: Optional[int] = None) -> ImageData:
    """Train/val (split of the train split) and test sets with transforms from timm's data config.

    The data config is ``data_config`` if given, else ``resolve_image_data_config(kind, model,
    img_size=img_size)`` (``model``: a timm model or name; None: the recipe's default model).
    ``num_proc`` goes to ``datasets.load_dataset`` (processes preparing a Hub dataset).
    """
    test_splits = CIFAR_TEST_SPLITS if kind == "cifar" else IMAGENET_TEST_SPLITS
    if data_config is None:
        data_config = resolve_image_data_config(kind, model, img_size=img_size)
    train_src, test_src, column, num_classes, names = load_image_splits(
        data, test_splits, token=token, arg=arg, num_proc=num_proc)
    train_idx, val_idx = split_train_val(len(train_src), val_fraction, seed)
    return ImageData(
        train=ImageClassificationSet(train_src, train_idx, None, column, seed=seed),
        val=ImageClassificationSet(train_src, val_idx, None, column),
        test=ImageClassificationSet(test_src, None, None, column),
        num_classes=num_classes, class_names=names, source=data, kind=kind).use_data_config(data_config)


def load_cifar10(data: str = CIFAR10_HUB_ID, *, img_size: Optional[int] = 32, seed: int = 0,
                 val_fraction: float = 0.2, token: Optional[str] = None, **kwargs) -> ImageData:
    return load_image_data(data, "cifar", img_size=img_size, seed=seed, val_fraction=val_fraction, token=token,
                           **kwargs)


def load_imagenet(data: str = IMAGENET_HUB_ID, *, img_size: Optional[int] = 224, seed: int = 0,
                  val_fraction: float = 0.2, token: Optional[str] = None, **kwargs) -> ImageData:
    return load_image_data(data, "imagenet", img_size=img_size, seed=seed, val_fraction=val_fraction, token=token,
                           **kwargs)
