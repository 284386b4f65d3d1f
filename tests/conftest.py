"""Shared fixtures (kept small; add yours below)."""
from types import SimpleNamespace

import pytest
import torch

import timm_fslt
from helpers import fit


@pytest.fixture(scope="session")
def resnet_ticket(tmp_path_factory):
    """A searched ResNet-18 ticket (CIFAR stem, width 1/8, 10 classes, prune 0.35, lock 0.35) on disk.

    Gives ``model`` (eval mode; do not modify), ``dir``, a batch ``x`` and ``out``,
    the model's eval outputs on it.
    """
    torch.manual_seed(0)
    model = timm_fslt.create_model("resnet18_cifar", num_classes=10, width=0.125)
    timm_fslt.freeze(model, prune=0.35, lock=0.35, seed=11)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    # A few search steps move the masks away from the initial scores and update BN statistics.
    fit(model, x, y, steps=3, lr=0.1)
    model.eval()
    with torch.no_grad():
        out = model(x)
    directory = timm_fslt.save_ticket(model, tmp_path_factory.mktemp("resnet") / "ticket",
                                      metrics={"accuracy": 0.625})
    return SimpleNamespace(model=model, dir=directory, x=x, out=out)


@pytest.fixture
def one_thread():
    """Run the test on one thread (tiny models are faster so, and leave the other core to the runner)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
