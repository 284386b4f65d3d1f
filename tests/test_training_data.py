"""The recipes' data: transforms from timm's data config, recorded in the ticket, and `datasets`
preparing only the splits a run uses (a local copy of a Hub dataset repo in its real parquet
layout; no downloads: HF_HUB_OFFLINE=1)."""
import glob
import importlib
import json
import os
import sys

import pytest
import timm
import timm.data
import torch

import helpers
from fixtures_data import _images, recipes_dir, write_image_folder

from timm_fslt.training.data import (CIFAR10_MEAN, CIFAR10_STD, DataError, load_cifar10, load_imagenet,
                                     resolve_image_data_config)

sys.path.insert(0, recipes_dir())
imagenet = importlib.import_module("imagenet")

fresh_accelerate_state = pytest.fixture(autouse=True)(helpers.one_thread_fresh_accelerate)
TINY_RESNET18 = ["--model-kwargs", "channels=[8,16,32,64]", "stem_width=8"]
QUICK = ["--epochs", "1", "--limit-train-batches", "1", "--batch-size", "8", "--num-workers", "0", "--no-progress"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("data") / "imagenet", splits=("train", "val"), size=40)


def _picture(size=40):
    return _images(1, 10, size, 3)[0][0]


def test_the_imagenet_eval_transform_is_timms_for_resnet18_bicubic_crop_095(folder):
    model = timm.create_model("resnet18", num_classes=10)
    data = load_imagenet(str(folder), img_size=None, model=model)
    timm_config = timm.data.resolve_data_config(model=model)
    assert data.data_config == timm_config
    assert (data.data_config["interpolation"], data.data_config["crop_pct"]) == ("bicubic", 0.95)
    expected = timm.data.create_transform(**timm_config)
    assert repr(data.test.transform) == repr(expected) == repr(data.val.transform)
    resize = data.test.transform.transforms[0]
    assert resize.size == 235 and resize.interpolation.value == "bicubic"  # int(224 / 0.95), not 256
    image = _picture()
    assert torch.equal(data.test.transform(image), expected(image))
    # Train: timm's random resized crop (bicubic) + flip, without colour jitter.
    names = [type(t).__name__ for t in data.train.transform.transforms]
    assert names[:2] == ["RandomResizedCropAndInterpolation", "RandomHorizontalFlip"] and "ColorJitter" not in names


def test_img_size_overrides_only_the_input_size(folder):
    config = resolve_image_data_config("imagenet", "resnet18", img_size=32)
    assert config["input_size"] == (3, 32, 32) and config["crop_pct"] == 0.95 and config["interpolation"] == "bicubic"
    data = load_imagenet(str(folder), img_size=32)
    assert data.data_config == config and data.test.transform.transforms[0].size == 33
    with pytest.raises(DataError, match="--img-size"):
        resolve_image_data_config("imagenet", "resnet18", img_size=0)


def test_cifar_evaluates_uncropped_with_cifar_statistics_and_trains_with_padded_crop(tmp_path):
    root = write_image_folder(tmp_path / "cifar", splits=("train", "test"))
    for model in ("conv6", timm.create_model("resnet18", num_classes=10)):  # ours, and a timm ImageNet model
        config = resolve_image_data_config("cifar", model)
        assert (config["crop_pct"], config["mean"], config["std"]) == (1.0, CIFAR10_MEAN, CIFAR10_STD)
    data = load_cifar10(str(root))
    assert repr(data.test.transform) == repr(timm.data.create_transform(**data.data_config))
    image = _picture(32)
    plain = timm.data.create_transform(input_size=(3, 32, 32), crop_pct=1.0, mean=CIFAR10_MEAN, std=CIFAR10_STD)
    assert torch.equal(data.test.transform(image), plain(image))
    crop = data.train.transform.transforms[0]
    assert type(crop).__name__ == "RandomCrop" and crop.padding == 4


def test_the_ticket_records_the_eval_data_config(folder, tmp_path):
    res = imagenet.main(["--data", str(folder), "--img-size", "32", *TINY_RESNET18, *QUICK,
                         "--output-dir", str(tmp_path / "run")])
    config = json.loads(open(os.path.join(res["ticket_dir"], "config.json")).read())
    expected = json.loads(json.dumps(timm.data.resolve_data_config({"img_size": 32}, model=timm.create_model("resnet18"))))
    recorded = {k: config["pretrained_cfg"][k] for k in expected}  # timm's pretrained_cfg holds more keys
    assert recorded == expected == res["config"]["data_config"]
    assert (recorded["input_size"], recorded["interpolation"], recorded["crop_pct"]) == ([3, 32, 32], "bicubic", 0.95)
    # What a timm user gets back from the ticket folder: the preprocessing it was evaluated with.
    plain = timm.create_model(f"local-dir:{res['ticket_dir']}")
    assert json.loads(json.dumps(timm.data.resolve_data_config(model=plain))) == expected


# -- datasets: only the splits a run uses --------------------------------------------------
def write_hub_repo(root, *, splits=(("train", 12), ("validation", 6), ("test", 6)), size=40):
    """A local copy of a Hub dataset repo as the Hub stores it: data/<split>-00000-of-00001.parquet
    with the features (Image, ClassLabel) in the parquet metadata; 'test' unlabelled (-1) like
    imagenet-1k's."""
    import datasets

    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=[f"c{i}" for i in range(4)])})
    os.makedirs(os.path.join(root, "data"), exist_ok=True)
    for seed, (split, n) in enumerate(splits):
        images, labels = _images(n, 4, size, seed)
        labels = [-1] * n if split == "test" else labels
        datasets.Dataset.from_dict({"image": images, "label": labels}, features=features).to_parquet(
            os.path.join(root, "data", f"{split}-00000-of-00001.parquet"))
    return str(root)


@pytest.fixture()
def datasets_spy(tmp_path, monkeypatch):
    """A private datasets cache, and every load_dataset call recorded."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    calls, real = [], datasets.load_dataset

    def spy(path, *args, **kwargs):
        calls.append({"path": path, **kwargs})
        return real(path, *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", spy)
    return calls, tmp_path / "cache"


def _prepared_splits(cache) -> list:
    return sorted(os.path.basename(p).rsplit("-", 1)[-1].split(".")[0]
                  for p in glob.glob(os.path.join(str(cache), "**", "*.arrow"), recursive=True))


def test_a_hub_repo_copy_prepares_only_train_and_validation_with_num_proc(tmp_path, datasets_spy):
    calls, cache = datasets_spy
    repo = write_hub_repo(tmp_path / "imagenet-1k")
    data = load_imagenet(repo, img_size=32, num_proc=1)
    assert data.fingerprint() == {"train": 9, "val": 3, "test": 6, "num_classes": 4}
    assert data.class_names == ["c0", "c1", "c2", "c3"]
    assert _prepared_splits(cache) == ["train", "validation"]  # the unlabelled test split never prepared
    (call,) = calls
    assert call["split"] == ["train", "validation"] and call["num_proc"] == 1
    assert sorted(call["data_files"]) == ["train", "validation"]
    assert {int(data.test[i][1]) for i in range(len(data.test))} != {-1}


def test_a_hub_id_goes_through_the_same_split_only_load(tmp_path, datasets_spy, monkeypatch):
    import datasets

    calls, cache = datasets_spy
    repo = write_hub_repo(tmp_path / "copy")
    real_builder, spy = datasets.load_dataset_builder, datasets.load_dataset
    # The Hub, offline: the id resolves to the local copy (what the Hub would serve).
    monkeypatch.setattr(datasets, "load_dataset_builder",
                        lambda path, **kw: real_builder(repo if path == "ILSVRC/imagenet-1k" else path, **kw))
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda path, *a, **kw: spy(repo if path == "ILSVRC/imagenet-1k" else path, *a, **kw))
    data = load_imagenet("ILSVRC/imagenet-1k", img_size=32, token="tok", num_proc=2)
    assert len(data.test) == 6 and _prepared_splits(cache) == ["train", "validation"]
    assert calls[0]["split"] == ["train", "validation"] and calls[0]["num_proc"] == 2 and calls[0]["token"] == "tok"


def test_a_hub_repo_copy_without_the_needed_splits_is_named(tmp_path, datasets_spy):
    repo = write_hub_repo(tmp_path / "only-train", splits=(("train", 8),))
    with pytest.raises(DataError, match=r"--data: .*only-train.*has splits \['train'\]"):
        load_imagenet(repo, img_size=32)
    with pytest.raises(DataError, match="--data-num-proc must be a positive int"):
        load_imagenet(repo, img_size=32, num_proc=0)


def test_data_num_proc_reaches_the_loader_from_the_command_line(folder, tmp_path, capsys):
    with pytest.raises(SystemExit):
        imagenet.main(["--data", str(folder), "--data-num-proc", "x"])
    assert "--data-num-proc" in capsys.readouterr().err
    with pytest.raises(DataError, match="--data-num-proc"):
        imagenet.main(["--data", str(folder), "--data-num-proc", "0", *TINY_RESNET18, *QUICK,
                       "--output-dir", str(tmp_path / "never")])
    assert not (tmp_path / "never").exists()
