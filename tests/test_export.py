"""Exporting and tracing a frozen model (#15).

``torch.export`` (non-strict and strict), ``torch.onnx.export`` (the dynamo exporter and the
TorchScript one, ``dynamo=False``) and ``torch.jit.trace`` of a FROZEN model record the plain
product ``W * mask`` (``FrozenSupermask._traced_weight``): the exported program gives the frozen
model's outputs.  ``torch.jit.script`` cannot compile ``torch.nn.utils.parametrize`` and is refused
at once with a pointer to ``timm_fslt.materialize``; so is an export of masks that are out of date.
ONNX graphs run in onnx's reference evaluator (numpy), not in torch.

Models: timm's ResNet-18 at channels (8, 16, 32, 64), Conv6 at width 1/8, a timm ViT (depth 2,
width 32) and a sequence model whose masked tensors are not layer weights (an LSTM's
``weight_ih/hh`` and ``nn.MultiheadAttention``'s ``in_proj_weight``); all searched two steps.
"""
import copy
import inspect
import io
import time

import numpy as np
import onnx
import pytest
import timm
import torch
from onnx.reference import ReferenceEvaluator
from torch import nn

import timm_fslt
from helpers import fit, trainable

pytestmark = pytest.mark.usefixtures("one_thread")

# ONNX outputs vs torch's: the reference evaluator runs each node in numpy (float32, its own
# convolution and matmul summation order), so outputs agree to rounding, not bit for bit.  A
# conv or matmul output sums at most ~600 products here, each rounding at float32's 6e-8, so
# 1e-4 relative to the output's magnitude is a bound with two orders of margin (measured: at
# most 5e-7 relative); a dropped mask or a wrong weight changes outputs by O(1).
ONNX_RTOL = 1e-4


class _Seq(nn.Module):
    """Masked tensors that are not a layer's weight: LSTM weight_ih/hh, MHA in_proj_weight."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(6, 8, batch_first=True)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.rnn(x)[0]
        # attention pooling (the last step asks all steps): not self-attention, so eager torch takes
        # MHA's ordinary path, as traced graphs do, rather than its fused inference kernel, which
        # rounds differently (and has no ONNX symbol)
        return self.head(self.attn(h[:, -1:], h, h, need_weights=False)[0][:, 0])


def _resnet():
    return timm.create_model("resnet18", channels=(8, 16, 32, 64), stem_width=8, num_classes=10)


def _conv6():
    return timm_fslt.create_model("conv6", width=0.125)


def _vit():
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32,
                             num_heads=2, num_classes=10)


BUILDERS = {  # name: (builder, input shape, loss target classes)
    "resnet": (_resnet, (2, 3, 32, 32), 10),
    "conv6": (_conv6, (2, 3, 32, 32), 10),
    "vit": (_vit, (2, 3, 32, 32), 10),
    "seq": (_Seq, (2, 5, 6), 3),
}


def searched(name, steps=2):
    """A frozen model searched ``steps`` SGD steps (masks moved, BN statistics updated), in eval
    mode, with a forward run since its last step (masks current); and two inputs."""
    build, shape, classes = BUILDERS[name]
    torch.manual_seed(0)
    model = timm_fslt.freeze(build(), prune=0.35, lock=0.35, seed=3)
    x = torch.randn(4, *shape[1:])
    fit(model, x, torch.randint(0, classes, (4,)), steps=steps, lr=0.1)
    model.eval()
    return model, torch.randn(*shape), torch.randn(*shape)


@pytest.fixture(scope="module")
def models():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    built = {name: searched(name) for name in BUILDERS}
    torch.set_num_threads(threads)
    return built


def eager(model, x):
    with torch.no_grad():
        return model(x)


def same_outputs(name, got, want):
    """Bit-identical outputs; for "seq" within 1e-6: the LSTM and attention kernels a recorded graph
    (or TorchScript) runs may round differently from eager torch's on some CPUs (3.4e-8 measured on an
    AMD EPYC; equal on an Intel Xeon) -- the masked products inside are the same bits either way
    (the conv and linear models' outputs, compared exactly, show it)."""
    if name == "seq":
        return torch.allclose(got, want, rtol=0, atol=1e-6)
    return torch.equal(got, want)


def state_of(model):
    """Scores, masks and buffers: what an export must leave as it was."""
    return {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()} | {
        f"mask{i}": layer.mask.clone() for i, layer in enumerate(timm_fslt.get_group(model).layers)}


def assert_unchanged(model, before):
    after = state_of(model)
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def onnx_run(proto, x):
    """Outputs of an ONNX model (ModelProto or bytes) in onnx's reference evaluator."""
    if isinstance(proto, bytes):
        proto = onnx.load_from_string(proto)
    onnx.checker.check_model(proto)
    session = ReferenceEvaluator(proto)
    (out,) = session.run(None, {proto.graph.input[0].name: x.numpy()})
    return torch.from_numpy(np.asarray(out))


def assert_onnx_close(got, want):
    assert got.shape == want.shape
    tol = ONNX_RTOL * float(want.abs().max())
    assert float((got - want).abs().max()) <= tol, (float((got - want).abs().max()), tol)


def onnx_dynamo(model, x) -> onnx.ModelProto:
    return torch.onnx.export(model, (x,), dynamo=True, verbose=False).model_proto


HAS_TORCHSCRIPT_ONNX = "dynamo" in inspect.signature(torch.onnx.export).parameters


def onnx_torchscript(model, x) -> bytes:
    buffer = io.BytesIO()
    torch.onnx.export(model, (x,), buffer, dynamo=False)
    return buffer.getvalue()


# -- the product the exporters record ------------------------------------------------------------


@pytest.mark.parametrize("scale", [None, "dynamic"])
def test_the_traced_product_has_the_eager_bits(scale):
    torch.manual_seed(0)
    model = timm_fslt.freeze(_Seq(), prune=0.35, lock=0.35, seed=3, scale=scale)
    for layer in timm_fslt.get_group(model).layers:
        module = model.get_submodule(layer.module_name)
        eager_value = getattr(module, layer.param_name)
        raw = module.parametrizations[layer.param_name].original
        traced_value = layer._traced_weight(raw)
        assert eager_value.dtype == traced_value.dtype == torch.float32
        # bit patterns, so that -0.0 vs 0.0 would count
        assert torch.equal(eager_value.detach().view(torch.int32), traced_value.view(torch.int32)), layer.layer_name


def test_the_checks_below_can_fail_the_masks_change_the_outputs(models):
    """Every comparison below is against the frozen model's outputs; without its masks (the
    random weights whole) those outputs are different, so an export that lost them would fail."""
    for name, (model, x, _) in models.items():
        want = eager(model, x)
        dense = copy.deepcopy(model)
        layers = timm_fslt.get_group(dense).layers
        timm_fslt.frozen.remove_group(dense)  # (no refresh: the masks stay as set here)
        for layer in layers:
            layer.group = None
            layer.mask.fill_(True)
        assert not torch.allclose(eager(dense, x), want, rtol=1e-3, atol=1e-3), name


# -- torch.export ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BUILDERS))
def test_torch_export_gives_the_frozen_models_outputs(models, name):
    model, x, x2 = models[name]
    want, want2 = eager(model, x), eager(model, x2)  # (a forward: the masks are current)
    before = state_of(model)
    program = torch.export.export(model, (x,))
    exported = program.module()
    assert same_outputs(name, exported(x), want)
    assert same_outputs(name, exported(x2), want2)  # a graph, not a recorded constant output
    code = program.graph_module.code
    assert "_MaskedWeight" not in code and "index_select" not in code  # the plain product only
    assert_unchanged(model, before)


@pytest.mark.parametrize("name", ["conv6", "seq"])
def test_torch_export_strict_gives_the_frozen_models_outputs(models, name):
    model, x, x2 = models[name]
    want, want2 = eager(model, x), eager(model, x2)
    exported = torch.export.export(model, (x,), strict=True).module()
    assert same_outputs(name, exported(x), want)
    assert same_outputs(name, exported(x2), want2)


def test_search_runs_on_after_an_export():
    model, x, _ = searched("conv6", steps=1)
    torch.export.export(model, (x,))
    model.train()
    out = model(x)
    layer = model.features[0]
    assert type(layer.weight.grad_fn).__name__ == "_MaskedWeightBackward"  # the eager path again
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable(model))


# -- torch.jit ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BUILDERS))
def test_jit_trace_gives_the_frozen_models_outputs(models, name):
    model, x, x2 = models[name]
    want, want2 = eager(model, x), eager(model, x2)
    before = state_of(model)
    traced = torch.jit.trace(model, (x,))
    assert same_outputs(name, traced(x), want)
    assert same_outputs(name, traced(x2), want2)
    assert_unchanged(model, before)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_jit_script_is_refused_at_once_with_a_pointer_to_materialize(models, name):
    model, x, _ = models[name]
    want = eager(model, x)
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"torch\.jit\.script cannot compile a frozen model.*"
                                           r"timm_fslt\.materialize\(model\)"):
        torch.jit.script(model)
    assert time.perf_counter() - start < 5.0  # refused before compiling anything
    assert torch.equal(eager(model, x), want)  # and the model is as it was


@pytest.mark.parametrize("name", [
    "resnet", "vit", "seq",
    "conv6",
])
def test_jit_script_of_the_materialized_model(models, name):
    model, x, x2 = models[name]
    want, want2 = eager(model, x), eager(model, x2)
    scripted = torch.jit.script(timm_fslt.materialize(model))
    assert same_outputs(name, scripted(x), want)
    assert same_outputs(name, scripted(x2), want2)


# -- ONNX -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet", "conv6"])
def test_onnx_of_the_materialized_model_in_the_reference_evaluator(models, name):
    model, x, x2 = models[name]
    want, want2 = eager(model, x), eager(model, x2)
    plain = timm_fslt.materialize(model)
    proto = onnx_dynamo(plain, x)
    assert_onnx_close(onnx_run(proto, x), want)
    assert_onnx_close(onnx_run(proto, x2), want2)
    if HAS_TORCHSCRIPT_ONNX:
        assert_onnx_close(onnx_run(onnx_torchscript(plain, x), x2), want2)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_onnx_of_the_frozen_model_in_the_reference_evaluator(models, name):
    model, x, x2 = models[name]
    want2 = eager(model, x2)
    before = state_of(model)
    proto = onnx_dynamo(model, x)
    assert_onnx_close(onnx_run(proto, x2), want2)
    # the graph multiplies weight and mask (or was folded to W * mask): no int8 frozen code or
    # float score reaches it
    inputs = {init.name for init in proto.graph.initializer}
    assert not any("scores" in n or n.endswith(".frozen") for n in inputs), sorted(inputs)
    assert_unchanged(model, before)


@pytest.mark.skipif(not HAS_TORCHSCRIPT_ONNX, reason="this torch has no TorchScript ONNX exporter")
@pytest.mark.parametrize("name", ["resnet", "conv6", "seq"])
def test_torchscript_onnx_of_the_frozen_model_in_the_reference_evaluator(models, name):
    model, x, x2 = models[name]
    want2 = eager(model, x2)
    assert_onnx_close(onnx_run(onnx_torchscript(model, x), x2), want2)


# -- masks that are out of date ---------------------------------------------------------------------


def stepped(name="conv6"):
    """A searched model right after an optimizer step: its masks are out of date until a forward."""
    model, x, _ = searched(name, steps=1)
    opt = torch.optim.SGD(trainable(model), lr=0.5)
    model.train()
    model(torch.randn(4, *x.shape[1:])).sum().backward()
    opt.step()
    model.eval()
    assert timm_fslt.get_group(model).is_stale()
    return model, x


STALE = r"out of date.*timm_fslt\.refresh_masks\(model\).*timm_fslt\.materialize\(model\)"


def test_exporting_out_of_date_masks_is_refused_until_they_are_refreshed():
    model, x = stepped()
    masks_then = [layer.mask.clone() for layer in timm_fslt.get_group(model).layers]
    with pytest.raises(RuntimeError, match=STALE):
        torch.export.export(model, (x,))
    with pytest.raises(RuntimeError, match=STALE):
        torch.export.export(model, (x,), strict=True)
    with pytest.raises(RuntimeError, match=STALE):  # a part of the model: its layers refuse
        torch.export.export(model.features, (x,))
    with pytest.raises(Exception, match=STALE.replace(".*", r"[\s\S]*")):  # (wrapped by the ONNX exporter)
        onnx_dynamo(model, x)
    if HAS_TORCHSCRIPT_ONNX:
        with pytest.raises(RuntimeError, match=STALE):
            onnx_torchscript(model, x)
    # nothing was refreshed or written on the way
    assert all(torch.equal(layer.mask, m) for layer, m in zip(timm_fslt.get_group(model).layers, masks_then))
    timm_fslt.refresh_masks(model)
    assert not all(torch.equal(layer.mask, m) for layer, m in zip(timm_fslt.get_group(model).layers, masks_then))
    exported = torch.export.export(model, (x,)).module()
    assert torch.equal(exported(x), eager(model, x))


def test_jit_trace_after_an_optimizer_step_traces_the_new_masks():
    # (torch.jit.trace reads each parameter once before tracing, which refreshes the masks eagerly)
    model, x = stepped()
    traced = torch.jit.trace(model, (x,))
    assert torch.equal(traced(x), eager(model, x))


@pytest.mark.parametrize("assign", [False, True])
def test_a_loaded_state_dict_is_not_exported_with_the_old_masks(assign):
    trained, x, _ = searched("conv6", steps=3)
    fresh, _, _ = searched("conv6", steps=0)
    assert not torch.equal(eager(fresh, x), eager(trained, x))
    fresh.load_state_dict(trained.state_dict(), assign=assign)
    with pytest.raises(RuntimeError, match=STALE):
        torch.export.export(fresh, (x,))
    want = eager(trained, x)
    assert torch.equal(eager(fresh, x), want)  # the forward chose the masks
    assert torch.equal(torch.export.export(fresh, (x,)).module()(x), want)


def test_a_deep_copy_keeps_its_masks_current_or_out_of_date():
    model, x, _ = searched("conv6", steps=1)
    want = eager(model, x)
    copied = copy.deepcopy(model)  # (version counters start again at 0 in a copy)
    assert torch.equal(torch.export.export(copied, (x,)).module()(x), want)
    model, x = stepped()
    with pytest.raises(RuntimeError, match=STALE):
        torch.export.export(copy.deepcopy(model), (x,))


def test_a_loaded_ticket_exports_without_a_forward(tmp_path):
    model, x, x2 = searched("conv6", steps=2)
    want, want2 = eager(model, x), eager(model, x2)
    directory = timm_fslt.save_ticket(model, tmp_path / "ticket")
    loaded = timm_fslt.load_ticket(directory).eval()  # (load_ticket chooses the masks itself)
    exported = torch.export.export(loaded, (x,)).module()
    assert torch.equal(exported(x), want)
    assert torch.equal(exported(x2), want2)
    plain = timm_fslt.load_ticket(directory, materialize=True)
    assert_onnx_close(onnx_run(onnx_dynamo(plain, x), x2), want2)
