"""Wrong arguments to freeze / size_report / materialize: a clear error, model untouched."""
import pytest
import timm
import torch
from torch import nn

import timm_fslt

from helpers import snapshot


def _model():
    torch.manual_seed(0)
    return timm.create_model("conv6", width=0.125)


CASES = [
    (dict(prune=-0.1, lock=0.2), ValueError, r"prune must lie in \[0, 1\], got -0.1"),
    (dict(prune=0.2, lock=1.5), ValueError, r"lock must lie in \[0, 1\], got 1.5"),
    (dict(prune="0.2", lock=0.2), TypeError, r"prune must be a float in \[0, 1\]"),
    (dict(prune=float("nan"), lock=0.2), TypeError, r"prune must be a float in \[0, 1\]"),
    (dict(prune=0.6, lock=0.6), ValueError, r"prune \+ lock must be at most 1"),
    (dict(prune=0.3, lock=0.3, sparsity=0.8), ValueError,
     r"sparsity must lie in \[prune, 1 - lock\] = \[0.3, 0.7\], got 0.8"),
    (dict(prune=0.3, lock=0.3, sparsity=0.1), ValueError, r"sparsity must lie in \[prune, 1 - lock\]"),
    (dict(prune=0.3, lock=0.3, distribution="uniform"), ValueError,
     r"distribution must be one of \['epl', 'erk', 'igq'\], got 'uniform'"),
    (dict(prune=0.3, lock=0.3, scope="local"), ValueError, r"scope must be one of \['global', 'layerwise'\]"),
    (dict(prune=0.3, lock=0.3, weight_init="xavier"), ValueError, r"weight_init must be one of"),
    (dict(prune=0.3, lock=0.3, score_init="zeros"), ValueError, r"score_init must be one of"),
    (dict(prune=0.3, lock=0.3, scale="always"), ValueError, r"scale must be one of \[None, 'static', 'dynamic'\]"),
    (dict(prune=0.3, lock=0.3, batchnorm="frozen"), ValueError, r"batchnorm must be one of"),
    (dict(prune=0.3, lock=0.3, bias="drop"), ValueError, r"bias must be one of"),
    (dict(prune=0.3, lock=0.3, seed=-1), TypeError, r"seed must be a non-negative int"),
    (dict(prune=0.3, lock=0.3, include="fc"), TypeError, r"include must be a list of module-name patterns"),
    (dict(prune=0.3, lock=0.3, include=["nothing*"]), ValueError, r"model has no maskable layer"),
]


@pytest.mark.parametrize("kwargs,error,message", CASES)
def test_bad_freeze_arguments_fail_clearly_and_leave_the_model_unchanged(kwargs, error, message):
    model = _model()
    before = snapshot(model)
    with pytest.raises(error, match=message):
        timm_fslt.freeze(model, **kwargs)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not hasattr(model, "fslt_config")
    assert all(p.requires_grad for p in model.parameters())


def test_a_model_without_maskable_layers_is_refused():
    with pytest.raises(ValueError, match="model has no maskable layer"):
        timm_fslt.freeze(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)), prune=0.1, lock=0.1)


def test_freezing_twice_is_refused_and_keeps_the_first_freeze():
    model = timm_fslt.freeze(_model(), prune=0.2, lock=0.2)
    before = snapshot(model)
    with pytest.raises(ValueError, match="model is already frozen"):
        timm_fslt.freeze(model, prune=0.5, lock=0.1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # a submodule of a frozen model is refused too
    with pytest.raises(ValueError, match="already frozen"):
        timm_fslt.freeze(model.features, prune=0.1, lock=0.1)


def test_not_a_module_is_a_type_error():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got dict"):
        timm_fslt.freeze({}, prune=0.1, lock=0.1)


@pytest.mark.parametrize("fn", [timm_fslt.size_report, timm_fslt.materialize, timm_fslt.refresh_masks])
def test_functions_on_an_unfrozen_model_say_so(fn):
    with pytest.raises(ValueError, match=r"model is not frozen: call timm_fslt.freeze"):
        fn(_model())


def test_config_object_is_validated_like_keywords():
    with pytest.raises(ValueError, match="prune \\+ lock must be at most 1"):
        timm_fslt.FreezeConfig(prune=0.7, lock=0.7)
    config = timm_fslt.FreezeConfig(prune=0.2, lock=0.4, seed=3)
    assert config.sparsity == pytest.approx(0.4)
    model = timm_fslt.freeze(_model(), config=config)
    assert model.fslt_config == config and model.fslt_config is not config
