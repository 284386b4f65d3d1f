"""timm's optimizer factory on frozen models: scores get weight decay, norms and biases do not.

timm's ``create_optimizer_v2`` (``param_groups_weight_decay`` / ``param_groups_layer_decay``)
skips decay for every parameter with ``ndim <= 1`` (and names ending ``.bias``).  Scores are
one ``(1, n_free)`` row per layer, so they are decayed like the weights they stand for.
Also here: the row computes exactly what the 1-D scores did (an independent reimplementation
of the search step with 1-D scores), and state saved with 1-D scores (timm_fslt 0.2) loads.
"""
import copy
import json
import os
import re

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from timm.optim import create_optimizer_v2
from torch.utils.data import TensorDataset

import helpers
import timm_fslt
from regen_reference import reference_topk_mask
from timm_fslt.nn.supermask import upgrade_optimizer_state
from timm_fslt.regen import pattern as freezing

WD = 1e-4


fresh_accelerate_state = pytest.fixture(autouse=True)(helpers.one_thread_fresh_accelerate)


def cifar_resnet(**kw):
    torch.manual_seed(0)  # (bias="train" keeps the bias torch drew at construction)
    model = timm_fslt.create_model("resnet18_cifar", num_classes=10, width=0.125)
    return timm_fslt.freeze(model, **{"prune": 0.35, "lock": 0.35, "seed": 11, **kw})


def timm_resnet(**kw):
    torch.manual_seed(0)
    model = timm.create_model("resnet18", channels=(8, 16, 32, 64), num_classes=10)
    return timm_fslt.freeze(model, **{"prune": 0.3, "lock": 0.3, "seed": 5, **kw})


def batch(seed=0, n=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def scores_of(model):
    return [layer.scores for layer in timm_fslt.get_group(model).layers]


def step(model, opt, seed):
    x, y = batch(seed)
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss


# -- which group each parameter lands in ------------------------------------------------------
@pytest.mark.parametrize("build", [cifar_resnet, timm_resnet], ids=["resnet18_cifar", "timm_resnet18"])
@pytest.mark.parametrize("layer_decay", [None, 0.65])
@pytest.mark.parametrize("opt", ["sgd", "adamw", "lamb"])
def test_timm_factory_decays_every_score_and_no_norm_or_bias(build, opt, layer_decay):
    model = build(batchnorm="affine", bias="train")
    names = {id(p): n for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    scores = {n for n in trainable if n.endswith("parametrizations.weight.0.scores")}
    others = trainable - scores
    assert len(scores) == len(timm_fslt.get_group(model).layers) and others  # BN affine and fc bias train
    assert all(p.dim() <= 1 for n, p in model.named_parameters() if n in others)

    optimizer = create_optimizer_v2(model, opt, lr=0.1, weight_decay=WD, layer_decay=layer_decay)
    decay = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert names[id(p)] not in decay  # every parameter in one group only
            decay[names[id(p)]] = group["weight_decay"]
    assert set(decay) == trainable
    assert {decay[n] for n in scores} == {WD}
    assert {decay[n] for n in others} == {0.0}
    if layer_decay is not None:  # the layer-wise groups scale the learning rate by depth
        scales = {group["lr_scale"] for group in optimizer.param_groups if group["weight_decay"] == WD}
        assert len(scales) > 3 and max(scales) == 1.0


def test_scores_are_one_row_and_free_scores_is_the_same_tensor_one_dimensional():
    model = cifar_resnet()
    for layer in timm_fslt.get_group(model).layers:
        n_free = int((layer.frozen == freezing.FREE).sum())
        assert isinstance(layer.scores, torch.nn.Parameter) and layer.scores.shape == (1, n_free)
        view = layer.free_scores
        assert view.shape == (n_free,) and view.data_ptr() == layer.scores.data_ptr()
    layer = timm_fslt.get_group(model).layers[3]
    before = layer.mask.clone()
    with torch.no_grad():
        layer.free_scores.mul_(1e3)  # a write through the view moves the version counter: masks follow
    model(batch()[0])
    assert not torch.equal(before, layer.mask)


# -- a timm optimizer's step ---------------------------------------------------------------------
def test_a_step_of_timm_sgd_decays_the_scores_and_changes_the_masks():
    model = cifar_resnet()
    initial = [s.detach().clone() for s in scores_of(model)]
    masks = helpers.masks(model)
    optimizer = create_optimizer_v2(model, "sgd", lr=0.1, momentum=0.9, weight_decay=WD)
    # decay alone (zero gradient): nesterov SGD moves s by -lr * (1 + momentum) * wd * s
    for s in scores_of(model):
        s.grad = torch.zeros_like(s)
    optimizer.step()
    for s, s0 in zip(scores_of(model), initial):
        torch.testing.assert_close(s.detach(), s0 - 0.1 * 1.9 * WD * s0, rtol=1e-6, atol=0)
        assert not torch.equal(s.detach(), s0)
    step(model, optimizer, 1)
    model(batch()[0])
    assert any(not torch.equal(a, b) for a, b in zip(masks, helpers.masks(model)))


# -- the row computes exactly what the 1-D scores did ---------------------------------------------
def _reference_search(model, steps, lr, momentum, wd):
    """The same search with 1-D leaf scores, by hand: a plain copy of the network whose weights are
    set to W * mask * scale before each forward, the straight-through gradient
    ``(dL/dW_eff * W)[free] * scale * sign(s)`` gathered by boolean indexing, torch's SGD on the
    1-D scores, and the masks re-selected by a full stable sort over all free |s| (global scope).
    Returns the scores, masks and score gradients after ``steps`` steps."""
    plain = timm_fslt.materialize(model)
    layers = []
    for name, module in timm_fslt.iter_frozen(model):
        sm = module.parametrizations.weight[0]
        free = sm.frozen == freezing.FREE
        scores = sm.scores.detach().reshape(-1).clone().requires_grad_(True)  # 1-D, as in 0.2
        weight = plain.get_submodule(name).weight
        weight.requires_grad_(True)
        layers.append((module.parametrizations.weight.original.detach(), sm.frozen.clone(), free, scores,
                       weight, sm.mask.clone(), sm.scale.clone()))
    kept_total = sum(int(mask.sum()) for *_, mask, _ in layers)  # global scope: constant
    locked = sum(int((frozen == freezing.LOCKED).sum()) for _, frozen, *_ in layers)
    optimizer = torch.optim.SGD([s for _, _, _, s, *_ in layers], lr=lr, momentum=momentum,
                                weight_decay=wd, nesterov=True)
    for i in range(steps):
        with torch.no_grad():
            for w, _, _, _, weight, mask, scale in layers:
                weight.copy_(w * mask.to(w.dtype) * scale)
        x, y = batch(i)
        loss = F.cross_entropy(plain(x), y)
        for *_, weight, _, _ in layers:
            weight.grad = None
        loss.backward()
        for w, _, free, scores, weight, _, scale in layers:
            g = weight.grad[free] * w[free] * scale
            scores.grad = g * torch.sign(scores.detach())
        optimizer.step()
        with torch.no_grad():  # the new masks, for the next forward
            magnitudes = torch.cat([s.detach().abs() for _, _, _, s, *_ in layers])
            selected = reference_topk_mask(magnitudes, kept_total - locked).split(
                [s.numel() for _, _, _, s, *_ in layers])
            for (_, frozen, free, _, _, mask, _), sel in zip(layers, selected):
                mask.copy_(frozen == freezing.LOCKED)
                mask[free] = sel
    return ([s.detach() for _, _, _, s, *_ in layers], [m for *_, m, _ in layers],
            [s.grad for _, _, _, s, *_ in layers])


@pytest.mark.parametrize("scale", [None, "static"])
def test_search_with_timm_sgd_is_bit_identical_to_the_one_dimensional_reference(scale):
    steps, lr, momentum = 3, 0.1, 0.9
    model = cifar_resnet(scale=scale)
    ref_scores, ref_masks, ref_grads = _reference_search(copy.deepcopy(model), steps, lr, momentum, WD)
    optimizer = create_optimizer_v2(model, "sgd", lr=lr, momentum=momentum, weight_decay=WD)
    for i in range(steps):
        step(model, optimizer, i)
    timm_fslt.refresh_masks(model)
    group = timm_fslt.get_group(model)
    assert sum(int(m.sum()) for m in ref_masks) == group.kept_target()
    for layer, s, m, g in zip(group.layers, ref_scores, ref_masks, ref_grads):
        assert torch.equal(layer.free_scores.detach(), s), layer.layer_name
        assert torch.equal(layer.scores.grad.view(-1), g), layer.layer_name
        assert torch.equal(layer.mask, m), layer.layer_name
    assert any(not torch.equal(a, b) for a, b in zip(helpers.masks(cifar_resnet(scale=scale)), ref_masks))


# -- state saved with 1-D scores (timm_fslt 0.2) -------------------------------------------------
def _as_old(state_dict):
    """A copy of a state dict as timm_fslt 0.2 wrote it: every score 1-D."""
    return {k: (v.reshape(-1) if k.endswith(".scores") else v).clone() for k, v in state_dict.items()}


def _old_optimizer_state(optimizer_state):
    state = copy.deepcopy(optimizer_state)
    for entry in state["state"].values():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape[0] == 1:
                entry[key] = value.reshape(-1)
    return state


def _optimizers(model):
    """Two optimizers over the scores, holding momentum and Adam moments (and BN in no-decay)."""
    return (create_optimizer_v2(model, "sgd", lr=0.1, momentum=0.9, weight_decay=WD),
            create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05))


def _steps(model, optimizers, seeds):
    for i in seeds:
        x, y = batch(i)
        loss = F.cross_entropy(model(x), y)
        for opt in optimizers:
            opt.zero_grad()
        loss.backward()
        for opt in optimizers:
            opt.step()


def test_a_state_dict_and_optimizer_state_with_one_dimensional_scores_load_and_resume_exactly():
    model = cifar_resnet(batchnorm="affine")
    optimizers = _optimizers(model)
    _steps(model, optimizers, range(2))
    old_model = _as_old(model.state_dict())
    old_optim = [_old_optimizer_state(opt.state_dict()) for opt in optimizers]
    assert any(v.dim() == 1 and k.endswith("scores") for k, v in old_model.items())
    _steps(model, optimizers, range(2, 4))  # the uninterrupted run

    resumed = cifar_resnet(batchnorm="affine")
    resumed.load_state_dict(old_model)
    assert all(s.shape[0] == 1 and s.dim() == 2 for s in scores_of(resumed))
    fresh = _optimizers(resumed)
    for opt, state in zip(fresh, old_optim):
        opt.load_state_dict(state)  # 1-D buffers: upgraded at the optimizer's first step
    _steps(resumed, fresh, range(2, 4))
    for a, b in zip(scores_of(model), scores_of(resumed)):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(helpers.masks(model), helpers.masks(resumed)))
    for opt_a, opt_b in zip(optimizers, fresh):
        for s in scores_of(resumed):
            assert all(v.shape == s.shape for v in opt_b.state[s].values() if v.dim() > 0)

    # an optimizer that has stepped already upgrades a loaded state at once (its load hook)
    opt = fresh[0]
    opt.load_state_dict(old_optim[0])
    assert all(opt.state[s]["momentum_buffer"].shape == s.shape for s in scores_of(resumed))
    assert upgrade_optimizer_state(opt) == 0  # nothing left to do


def test_a_one_dimensional_score_of_the_wrong_size_is_refused_naming_it():
    model, old = cifar_resnet(), _as_old(cifar_resnet().state_dict())
    key = next(k for k in old if k.endswith(".scores"))
    old[key] = old[key][:-1]
    with pytest.raises(RuntimeError, match=rf"size mismatch for {re.escape(key)}"):
        model.load_state_dict(old)


def _rewrite_as_old_checkpoint(folder):
    """Turn an epoch checkpoint into what timm_fslt 0.2 wrote: 1-D scores in model.safetensors and
    1-D score state in optimizer.bin (run_config.json's file digests updated to match)."""
    from timm_fslt.training.checkpoint import _checkpoint_files

    path = os.path.join(folder, "model.safetensors")
    save_file(_as_old(load_file(path)), path, metadata={"format": "pt"})
    path = os.path.join(folder, "optimizer.bin")
    torch.save(_old_optimizer_state(torch.load(path, weights_only=False)), path)
    record_path = os.path.join(folder, "run_config.json")
    with open(record_path, encoding="utf-8") as f:
        record = json.load(f)
    record["files"] = _checkpoint_files(folder)
    with open(record_path, "w", encoding="utf-8") as f:
        json.dump(record, f)


def test_a_training_checkpoint_with_one_dimensional_scores_resumes_bit_for_bit(tmp_path):
    from timm_fslt.training import ClassificationTask, TrainConfig, latest_checkpoint, train

    def data(n, seed):
        g = torch.Generator().manual_seed(seed)
        y = torch.arange(n) % 4
        return TensorDataset(torch.randn(n, 3, 32, 32, generator=g) * 0.5 + y.view(-1, 1, 1, 1).float() * 0.3, y)

    def model():
        return timm_fslt.freeze(timm_fslt.create_model("conv6", width=0.0625, num_classes=4), 0.3, 0.2, seed=3)

    class Killed(ClassificationTask):  # dies at the 3rd batch: in epoch 2, after epoch 1's checkpoint
        seen = 0

        def loss(self, model, batch):
            self.seen += 1
            if self.seen == 3:
                raise KeyboardInterrupt("killed")
            return super().loss(model, batch)

    sets = data(48, 0), data(16, 1), data(16, 2)
    config = lambda out, **kw: TrainConfig(output_dir=str(out), epochs=3, batch_size=16, lr=0.2,  # noqa: E731
                                           limit_train_batches=2, progress=False, save_ticket=False,
                                           num_workers=0, **kw)
    full = train(model(), *sets, config(tmp_path / "full"))
    with pytest.raises(KeyboardInterrupt):
        train(model(), *sets, config(tmp_path / "killed"), task=Killed())
    ckpt = latest_checkpoint(str(tmp_path / "killed"))
    _rewrite_as_old_checkpoint(ckpt)
    assert all(v.dim() == 1 for k, v in load_file(os.path.join(ckpt, "model.safetensors")).items()
               if k.endswith("scores"))
    resumed = train(model(), *sets, config(tmp_path / "killed", resume=True))
    assert resumed["history"] == full["history"]
