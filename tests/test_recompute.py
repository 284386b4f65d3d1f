"""recompute_masked_weights: the same gradients without keeping W * mask alive."""
import contextlib
import weakref

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import timm_fslt


class Net(nn.Module):
    def __init__(self, checkpointed: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.fc = nn.Linear(8 * 4 * 4, 5)
        self.checkpointed = checkpointed

    def block(self, x):
        return torch.relu(self.conv2(x))

    def forward(self, x):
        x = torch.relu(self.bn(self.conv1(x)))
        x = checkpoint(self.block, x, use_reentrant=False) if self.checkpointed else self.block(x)
        return self.fc(nn.functional.adaptive_avg_pool2d(x, 4).flatten(1))


def frozen(seed=0, **kw):
    torch.manual_seed(seed)
    model = Net(**kw)
    return timm_fslt.freeze(model, prune=0.3, lock=0.3, scale="dynamic")


def score_grads(model, x, y, recompute: bool):
    model.zero_grad(set_to_none=True)
    ctx = timm_fslt.recompute_masked_weights(model) if recompute else contextlib.nullcontext()
    with ctx:
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return [p.grad.clone() for p in model.parameters() if p.requires_grad]


def batch(n=4):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g)


def watch_masked_weights(model):
    """Weak references to every W * mask * scale the model's forwards produce."""
    refs = []
    for module in model.modules():
        if isinstance(module, timm_fslt.FrozenSupermask):
            module.register_forward_hook(lambda m, i, out: refs.append(weakref.ref(out)))
    return refs


@pytest.mark.parametrize("channels_last", [False, True])
def test_same_gradients_bit_for_bit(channels_last):
    model = frozen()
    x, y = batch()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    plain = score_grads(model, x, y, recompute=False)
    recomputed = score_grads(model, x, y, recompute=True)
    assert len(plain) == 3  # the scores of conv1, conv2 and fc (everything else stays frozen)
    for a, b in zip(plain, recomputed):
        assert torch.equal(a, b)


def test_masked_weights_are_not_kept_until_backward():
    model = frozen()
    x, y = batch()
    refs = watch_masked_weights(model)
    out = model(x)  # ordinary forward: every conv/linear keeps its masked weight
    assert len(refs) == 3 and all(r() is not None for r in refs)
    del out
    refs.clear()
    with timm_fslt.recompute_masked_weights(model):
        out = model(x)
    assert len(refs) == 3 and all(r() is None for r in refs)  # freed right after use
    nn.functional.cross_entropy(out, y).backward()  # and the backward still works
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_checkpointed_regions_and_recompute_compose():
    model = frozen(checkpointed=True)
    x, y = batch()
    ref = frozen(checkpointed=False)
    expected = score_grads(ref, x, y, recompute=False)
    for a, b in zip(expected, score_grads(model, x, y, recompute=True)):
        assert torch.equal(a, b)


def test_double_backward_goes_through_the_rebuilt_weight():
    def penalty_grads(recompute):
        model = frozen()
        x, y = batch()
        x.requires_grad_(True)
        ctx = timm_fslt.recompute_masked_weights(model) if recompute else contextlib.nullcontext()
        with ctx:
            loss = nn.functional.cross_entropy(model(x), y)
        (gx,) = torch.autograd.grad(loss, x, create_graph=True)
        gx.pow(2).sum().backward()
        return [p.grad for p in model.parameters() if p.requires_grad]

    plain, recomputed = penalty_grads(False), penalty_grads(True)
    assert any(g.abs().sum() > 0 for g in plain)
    for a, b in zip(plain, recomputed):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_mask_change_between_forward_and_backward_is_refused():
    model = frozen()
    x, y = batch()
    with timm_fslt.recompute_masked_weights(model):
        loss = nn.functional.cross_entropy(model(x), y)
    with torch.no_grad():  # a refresh after an optimizer step writes the masks in place
        for layer in timm_fslt.get_group(model).layers:
            layer.scores.mul_(-1).add_(torch.randn_like(layer.scores))
    model(x)
    with pytest.raises(RuntimeError, match="changed between the forward and its backward"):
        loss.backward()


def test_context_is_left_cleanly_after_an_error():
    model = frozen()
    x, _ = batch()
    with pytest.raises(ZeroDivisionError):
        with timm_fslt.recompute_masked_weights(model):
            model(x)
            1 / 0
    refs = watch_masked_weights(model)
    out = model(x)  # outside the context again: masked weights are kept as usual
    assert all(r() is not None for r in refs)
    del out


def test_only_the_named_model_is_affected():
    model, other = frozen(0), frozen(1)
    x, _ = batch()
    refs_other = watch_masked_weights(other)
    with timm_fslt.recompute_masked_weights(model):
        out = other(x)
    assert all(r() is not None for r in refs_other)
    del out


def test_refuses_a_model_that_is_not_frozen():
    with pytest.raises(ValueError, match="not frozen"):
        with timm_fslt.recompute_masked_weights(nn.Linear(2, 2)):
            pass


def test_compiled_model_inside_the_context_matches():
    model = frozen()
    x, y = batch()
    expected = score_grads(model, x, y, recompute=False)
    compiled = torch.compile(model, backend="aot_eager")
    compiled.zero_grad(set_to_none=True)
    with timm_fslt.recompute_masked_weights(model):
        loss = nn.functional.cross_entropy(compiled(x), y)
    loss.backward()
    got = [p.grad for p in model.parameters() if p.requires_grad]
    for a, b in zip(expected, got):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("channels_last", [False, True])
def test_sign_of_the_scores_is_applied_in_small_slices(monkeypatch, channels_last):
    # The straight-through gradient g * W * sign(s) must not make a whole-layer float
    # temporary for sign(s): at the start of the backward (the memory peak) it would
    # sit beside the incoming gradient and the score gradient.
    from timm_fslt.nn import functional

    monkeypatch.setattr(functional, "_SIGN_CHUNK", 64)
    g = torch.Generator().manual_seed(0)
    shape = (10, 3, 3, 3)
    grad, scores = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    scores.view(-1)[::5] = 0.0  # sign(0) = 0: no gradient through an exact zero
    if channels_last:
        grad = grad.contiguous(memory_format=torch.channels_last)
        scores = scores.contiguous(memory_format=torch.channels_last)
    sizes = []
    real_sign = torch.sign
    monkeypatch.setattr(torch, "sign", lambda t: sizes.append(t.numel()) or real_sign(t))
    out = functional._mul_sign_(grad.clone(), scores)
    monkeypatch.setattr(torch, "sign", real_sign)
    assert torch.equal(out, grad * torch.sign(scores))
    assert sum(sizes) == grad.numel() and max(sizes) <= 64 and len(sizes) == 5
