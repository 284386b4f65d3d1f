"""Every layer family the product promises: it freezes, keeps its forward, and learns."""
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame, Linear as TimmLinear, ScaledStdConv2d, StdConv2d
from torch import nn

import timm_fslt

from helpers import fit


def _image_net(first: nn.Module, channels: int) -> nn.Module:
    return nn.Sequential(first, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(channels, 4, bias=False))


FAMILIES = {
    "conv1d": lambda: nn.Sequential(nn.Conv1d(3, 16, 3), nn.ReLU(), nn.AdaptiveAvgPool1d(1),
                                    nn.Flatten(), nn.Linear(16, 4)),
    "conv2d": lambda: _image_net(nn.Conv2d(3, 16, 3, padding=1), 16),
    # 16 channels: at 8, a 3x3x3 conv at 40% free weights learns too little to test reliably
    "conv3d": lambda: nn.Sequential(nn.Conv3d(3, 16, 3), nn.ReLU(), nn.AdaptiveAvgPool3d(1),
                                    nn.Flatten(), nn.Linear(16, 4)),
    "grouped": lambda: _image_net(nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3, groups=4)), 16),
    "depthwise": lambda: _image_net(nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3, groups=16)), 16),
    "conv2d_same": lambda: _image_net(Conv2dSame(3, 16, 3, stride=2), 16),
    "std_conv": lambda: _image_net(StdConv2d(3, 16, 3, padding=1), 16),
    "scaled_std_conv": lambda: _image_net(ScaledStdConv2d(3, 16, 3, padding=1), 16),
    "timm_linear": lambda: nn.Sequential(nn.Flatten(), TimmLinear(3 * 8 * 8, 32), nn.ReLU(), TimmLinear(32, 4)),
}


def _inputs(family):
    g = torch.Generator().manual_seed(0)
    shape = {"conv1d": (32, 3, 16), "conv3d": (32, 3, 6, 6, 6)}.get(family, (32, 3, 8, 8))
    return torch.randn(shape, generator=g), torch.randint(0, 4, (32,), generator=g)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_layer_family_freezes_and_learns(family):
    torch.manual_seed(0)
    model = FAMILIES[family]()
    n_maskable = len(timm_fslt.find_maskable(model))
    model = timm_fslt.freeze(model, prune=0.3, lock=0.3, scale="dynamic")
    assert len(timm_fslt.get_group(model).layers) == n_maskable >= 2
    x, y = _inputs(family)
    first, last = fit(model, x, y, steps=40, lr=0.5)
    assert last < first - 0.2, (first, last)
    model.eval()
    torch.testing.assert_close(timm_fslt.materialize(model)(x), model(x), rtol=0, atol=0)


def test_conv2d_same_keeps_its_padding_behaviour():
    torch.manual_seed(0)
    conv = Conv2dSame(3, 8, 3, stride=2, bias=False)
    model = timm_fslt.freeze(nn.Sequential(conv), prune=0.2, lock=0.2)
    x = torch.randn(2, 3, 9, 9)  # odd size: 'same' padding is asymmetric here
    out = model(x)
    assert out.shape == (2, 8, 5, 5)
    # what timm's Conv2dSame computes with the masked weight
    from timm.layers.padding import pad_same
    ref = F.conv2d(pad_same(x, [3, 3], [2, 2]), conv.weight.detach(), None, 2)
    torch.testing.assert_close(out, ref)


def test_std_conv_standardises_the_masked_weight():
    conv = StdConv2d(3, 8, 3, bias=False)
    timm_fslt.freeze(nn.Sequential(conv), prune=0.2, lock=0.2)
    x = torch.randn(2, 3, 6, 6)
    w = conv.weight.detach()
    w_std = F.batch_norm(w.reshape(1, 8, -1), None, None, training=True, momentum=0.0,
                         eps=conv.eps).reshape_as(w)
    torch.testing.assert_close(conv(x), F.conv2d(x, w_std, None, conv.stride, conv.padding))


def test_timm_models_freeze_whole():
    for name in ("resnet18", "mobilenetv3_small_050", "efficientnet_b0"):
        model = timm.create_model(name, num_classes=5)
        convs = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
        model = timm_fslt.freeze(model, prune=0.2, lock=0.2)
        assert len(timm_fslt.get_group(model).layers) == convs
        model.eval()
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)


def test_include_and_exclude_select_layers_by_name():
    model = timm.create_model("resnet18_cifar", width=0.25)
    frozen = timm_fslt.freeze(model, prune=0.2, lock=0.2, exclude=["fc", "conv1"])
    names = [layer.layer_name for layer in timm_fslt.get_group(frozen).layers]
    assert "fc" not in names and "conv1" not in names and "layer1.0.conv1" in names
    model = timm.create_model("resnet18_cifar", width=0.25)
    frozen = timm_fslt.freeze(model, prune=0.2, lock=0.2, include=["layer4.*"])
    names = [layer.layer_name for layer in timm_fslt.get_group(frozen).layers]
    assert names and all(n.startswith("layer4.") for n in names)


def test_bias_and_batchnorm_options():
    model = timm_fslt.freeze(timm.create_model("resnet18_cifar", width=0.25, num_classes=3),
                             prune=0.2, lock=0.2, batchnorm="affine", bias="train")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "bn1.weight" in trainable and "fc.bias" in trainable
    model = timm_fslt.freeze(timm.create_model("resnet18_cifar", width=0.25, num_classes=3),
                             prune=0.2, lock=0.2)
    assert torch.equal(model.bn1.weight, torch.ones_like(model.bn1.weight))
    assert torch.equal(model.fc.bias, torch.zeros_like(model.fc.bias))
    assert not model.bn1.weight.requires_grad and not model.fc.bias.requires_grad


def test_pyg_linear_and_gin_train_on_a_builtin_graph():
    from torch_geometric.datasets import KarateClub
    from torch_geometric.nn.dense.linear import Linear as PygLinear
    from timm_fslt.models.gin import gin

    data = KarateClub()[0]
    torch.manual_seed(0)
    model = gin(data.num_features, 4, hidden=32, num_layers=3)
    n_linear = sum(isinstance(m, PygLinear) for m in model.modules())
    model = timm_fslt.freeze(model, prune=0.3, lock=0.3, scale="dynamic")
    assert len(timm_fslt.get_group(model).layers) == n_linear
    first, last = fit(model, (data.x, data.edge_index), data.y, steps=60, lr=0.5)
    assert last < first - 0.2, (first, last)
    model.eval()
    torch.testing.assert_close(timm_fslt.materialize(model)(data.x, data.edge_index),
                               model(data.x, data.edge_index), rtol=0, atol=0)


def test_lazy_layers_ask_for_a_forward_first():
    from torch_geometric.nn.dense.linear import Linear as PygLinear
    for lazy in (nn.Sequential(nn.LazyLinear(4)), nn.Sequential(PygLinear(-1, 4))):
        with pytest.raises(ValueError, match="lazy and not initialised yet; run one forward pass"):
            timm_fslt.freeze(lazy, prune=0.2, lock=0.2)
    model = nn.Sequential(PygLinear(-1, 4))
    model(torch.randn(2, 3))
    timm_fslt.freeze(model, prune=0.2, lock=0.2)


def test_frozen_pyg_linear_state_dict_holds_no_computed_weight_and_loads_strictly():
    from timm_fslt.models.gin import gin

    a = timm_fslt.freeze(gin(8, 3, hidden=16, num_layers=3), prune=0.35, lock=0.35)
    state = a.state_dict()
    # PyG's Linear would write W * mask under "<layer>.weight": regenerable, so never stored
    assert not [k for k in state if k.endswith("nn.0.weight") or k == "readout.weight"]
    b = timm_fslt.freeze(gin(8, 3, hidden=16, num_layers=3), prune=0.35, lock=0.35)
    b.load_state_dict(state, strict=True)
    report = timm_fslt.size_report(a)
    assert not any(k.endswith(".weight") for k in report.state_tensors)
    # the materialized model is a plain PyG model again, with its own weight key
    plain = timm_fslt.materialize(a)
    gin(8, 3, hidden=16, num_layers=3).load_state_dict(plain.state_dict(), strict=True)
