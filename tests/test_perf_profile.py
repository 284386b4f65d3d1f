"""benchmarks/profile_step.py times the step's pieces one by one: these are the pieces the
step runs.  The decomposition it times (|s| into one buffer, keys, selection, mask writes;
the backward's gather ``g[free] * W[free] * sign(s)``) gives the masks and score gradients
of the real path bit for bit, and the benchmarks' models build.  No timings here."""
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import timm_fslt
from timm_fslt.nn.functional import _free_values, _mul_sign_, masked_product
from timm_fslt.regen import topk

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import profile_step  # noqa: E402
import scaling  # noqa: E402


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 10))


@pytest.mark.parametrize("bracket", [False, True])
def test_profiled_pieces_are_the_step(monkeypatch, bracket):
    if bracket:  # force the sample-bracket path of the selection on a small model
        monkeypatch.setattr(topk, "_DIRECT", 64)
        monkeypatch.setattr(topk, "_SAMPLE", 16)
    model = timm_fslt.freeze(small_net(), prune=0.35, lock=0.35)
    group = timm_fslt.get_group(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    assert group.scale_mode is None
    for _ in range(4):
        group.refresh()
        # the selection as profile_step.sub_steps times it, on a copy of the masks
        frees = [layer.free_index() for layer in group.layers]
        sizes = [f.n_free for f in frees]
        flat = torch.empty(sum(sizes))
        for layer, free, part in zip(group.layers, frees, flat.split(sizes)):
            layer._write_magnitudes(part, free)
        locked = sum(f.n_locked for f in frees)
        selected = topk.keys_topk_mask(topk.magnitude_keys(flat), group.kept_target() - locked).split(sizes)
        for layer, free, sel in zip(group.layers, frees, selected):
            mask = layer.frozen == 1
            mask.view(-1)[free.index.long()] = sel
            assert torch.equal(mask, layer.mask)
        grads = {}
        def capture(i):
            def hook(module, inputs, out):
                out.register_hook(lambda g: grads.__setitem__(i, g.clone()))
            return hook

        hooks = [layer.register_forward_hook(capture(i)) for i, layer in enumerate(group.layers)]
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        for h in hooks:
            h.remove()
        for i, (layer, free) in enumerate(zip(group.layers, frees)):
            weight = profile_step._weight_of(model, layer)
            assert torch.equal(layer(weight), masked_product(weight, layer.mask, None))
            g = _free_values(grads[i], free.index).mul_(_free_values(weight, free.index))
            _mul_sign_(g, layer.scores.detach().reshape(-1))
            assert torch.equal(g.view(torch.int32), layer.scores.grad.reshape(-1).view(torch.int32))
        opt.step()


def test_scaling_stack_builds():
    model, opt, regen = scaling.build(4e4, True, 0.35, 0.35)
    group = timm_fslt.get_group(model)
    d = scaling.width(4e4)
    assert sum(layer.numel for layer in group.layers) == scaling.LAYERS * d * d + 10 * d
    assert regen is not None and regen >= 0
    x, y = scaling.make_batch(4e4, 3)
    scaling.step(model, opt, x, y)
