"""The zoo breadth tests' shared part: the cycle every model goes through, and the status report.

The cycle (``run_cycle``), on one thread, for one model:

1. ``build``       the model (timm: ``num_classes=10``, no pretrained weights; PyG: a registered builder)
2. ``freeze``      ``timm_fslt.freeze(model, prune=0.35, lock=0.35, seed=SEED)``
3. ``search``      one SGD step (lr ``LR``) on a random-projection loss; at least one mask bit must flip
4. ``materialize`` ``timm_fslt.materialize``: eval outputs ``torch.equal`` to the frozen model's
5. ``save``        ``timm_fslt.save_ticket`` to a temporary directory
6. ``load``        ``timm_fslt.load_ticket``: eval outputs ``torch.equal`` to the frozen model's
7. ``state``       the ticket stores no floating tensor other than norm running statistics
                   (``running_mean`` / ``running_var``): everything else is masked or regenerated

A failed step does not stop the later ones that do not depend on it (a failed save skips the load),
so a record lists every failing step; the test raises the exception class of the FIRST failing step
(``FreezeFailed``, ..., ``StateFailed``), so that ``pytest.mark.xfail(raises=...)`` entries of the
expected-failure tables below (``TIMM_XFAIL``, ``PYG_XFAIL``: the first section, to flip entries as fixes land)
say which step is expected to fail, and fail the test if another one does.

Status: with ``FSLT_ZOO_RECORD=<file.jsonl>`` every test appends its record (steps, times, ticket
bytes, stored tensors); ``python tests/zoo_cases.py report <file.jsonl>... > zoo_status.md`` renders them.
"""
from __future__ import annotations

import copy
import json
import os
import re
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

import timm_fslt
from timm_fslt.report import non_regenerable_state, state_reasons
from timm_fslt.ticket import read_config

PRUNE = LOCK = 0.35
SEED = 14
LR = 10.0
STEPS = ("build", "freeze", "search", "materialize", "save", "load", "state")
ALLOWED_STATE = (".running_mean", ".running_var")  # the only floating tensors a ticket may store


class StepFailed(Exception):
    """A step of the cycle failed (the subclass names the first failing step)."""
    step = ""


def _step_class(step: str) -> type:
    return type(f"{step.capitalize()}Failed", (StepFailed,), {"step": step, "__module__": __name__})


BuildFailed, FreezeFailed, SearchFailed, MaterializeFailed, SaveFailed, LoadFailed, StateFailed = \
    (_step_class(s) for s in STEPS)
FAILED = {cls.step: cls for cls in (BuildFailed, FreezeFailed, SearchFailed, MaterializeFailed, SaveFailed,
                                    LoadFailed, StateFailed)}


@dataclass
class Case:
    """One model of the sweep. ``build()`` returns a fresh model; ``inputs()`` the positional arguments
    of its forward; ``architecture`` the record ``save_ticket`` gets (None: recorded or inferred)."""
    id: str
    model: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], tuple]
    architecture: Optional[dict] = None
    note: str = ""
    config: dict = field(default_factory=dict)


# -- expected failures and slow families: flip entries as fixes land --------------------------------
# {case id: (the first failing step's exception class, why)}. Strict: a case that passes fails the run
# until its entry is removed; one that fails at another step fails it too.
FULL = os.environ.get("FSLT_ZOO_FULL") == "1"
TIMM_XFAIL: dict = {}  # none at the moment (csatv2, gemma4_vit, convit flipped as their fixes landed)
# Families whose smallest model has no smaller configuration and takes over ~15 s a cycle on one thread:
# skipped unless FSLT_ZOO_FULL=1 (their records in the status sweep are from full runs).
TIMM_SLOW: dict = {
    "inception_v3": "inception_v3: 21.8M parameters, no width or depth argument (about 20 s a cycle)",
    "inception_v4": "inception_v4: 41.2M parameters, no width or depth argument (about 35 s a cycle)",
    "inception_resnet_v2": "inception_resnet_v2: 54.3M parameters, no width or depth argument (about 30 s a cycle)",
    "pnasnet": "pnasnet5large: 81.8M parameters, no width or depth argument (about 45 s a cycle)",
    "selecsls": "selecsls42: 29.1M parameters, stages fixed by the variant name (about 20 s a cycle)",
}
_EMBEDDING_ONLY = ("permanent: the model is only an embedding table, which freeze regenerates and never masks, "
                   "so there is nothing to search: freeze refuses ('no maskable layer or weight')")
PYG_XFAIL: dict = {
    "model:LightGCN": (FreezeFailed, _EMBEDDING_ONLY),
    "model:MaskLabel": (FreezeFailed, _EMBEDDING_ONLY),
}
# {case id: (a package it needs, why)}: skipped while that package is not installed.
PYG_SKIP: dict = {
    "conv:CuGraphSAGEConv": ("pylibcugraphops", "cugraph-ops kernels (CUDA only)"),
    "conv:CuGraphGATConv": ("pylibcugraphops", "cugraph-ops kernels (CUDA only)"),
    "conv:CuGraphRGCNConv": ("pylibcugraphops", "cugraph-ops kernels (CUDA only)"),
    "conv:FusedGATConv": ("dgNN", "dgNN's fused CUDA kernels"),
    "conv:SplineConv": ("torch_spline_conv", "the spline basis is torch_spline_conv's"),
    "conv:GravNetConv": ("torch_cluster", "knn from torch_cluster"),
    "conv:DynamicEdgeConv": ("torch_cluster", "knn from torch_cluster"),
    "conv:XConv": ("torch_cluster", "knn_graph from torch_cluster"),
    "conv:PANConv": ("torch_sparse", "its forward builds a torch_sparse SparseTensor"),
    "model:Node2Vec": ("pyg_lib", "pyg-lib>=0.6 (its random walks)"),
    "model:DimeNet": ("torch_cluster", "radius_graph from torch_cluster"),
    "model:DimeNetPlusPlus": ("torch_cluster", "radius_graph from torch_cluster"),
    "model:ViSNet": ("torch_cluster", "radius_graph from torch_cluster"),
    "model:GNNFF": ("torch_cluster", "radius_graph from torch_cluster"),
}


def params(ids, xfail: dict, slow: Optional[dict] = None) -> list:
    """``pytest.param``s for ``ids`` with their expected-failure and skip marks."""
    import pytest

    out = []
    for case_id in ids:
        marks = []
        if case_id in xfail:
            cls, reason = xfail[case_id]
            marks.append(pytest.mark.xfail(strict=True, raises=cls, reason=reason))
        if slow and case_id in slow and not FULL:
            marks.append(pytest.mark.skip(reason=f"{slow[case_id]} (FSLT_ZOO_FULL=1 runs it)"))
        out.append(pytest.param(case_id, marks=marks, id=case_id))
    return out


def timm_params() -> list:
    return params(sorted(TIMM), TIMM_XFAIL, TIMM_SLOW)


def _installed(package: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(package) is not None


def pyg_params() -> list:
    import pytest

    out = []
    for p in params(pyg_ids(), PYG_XFAIL):
        case_id = p.values[0]
        if case_id in PYG_SKIP and not _installed(PYG_SKIP[case_id][0]):
            package, why = PYG_SKIP[case_id]
            p = pytest.param(case_id, marks=[pytest.mark.skip(reason=f"needs {package}: {why}")], id=case_id)
        out.append(p)
    return out


# -- the cycle -------------------------------------------------------------------------------------

def _tensors(out) -> list:
    """The floating tensors of a forward's output (a tensor, or tuples/lists/dicts of them)."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in _tensors(item)]
    return []


def _loss(out) -> torch.Tensor:
    """A fixed random projection of every output: a gradient for any output shape or head."""
    g = torch.Generator().manual_seed(0)
    tensors = _tensors(out)
    if not tensors:
        raise ValueError(f"the forward returned no floating tensor ({type(out).__name__})")
    return sum((t.float() * torch.randn(t.shape, generator=g)).sum() for t in tensors)


def eval_outputs(model: nn.Module, inputs: Callable[[], tuple]) -> list:
    """Eval-mode outputs (the global RNG seeded first: a few forwards draw, e.g. DeepGraphInfomax's corruption)."""
    model.eval()
    torch.manual_seed(0)
    with torch.no_grad():
        return [t.clone() for t in _tensors(model(*inputs()))]


def _same(expected: list, actual: list, what: str) -> None:
    if len(expected) != len(actual):
        raise AssertionError(f"{what}: {len(actual)} output tensors, the frozen model gives {len(expected)}")
    for i, (a, b) in enumerate(zip(expected, actual)):
        if a.shape != b.shape:
            raise AssertionError(f"{what}: output {i} has shape {tuple(b.shape)}, expected {tuple(a.shape)}")
        if not torch.equal(a, b):
            diff = (a.double() - b.double()).abs()
            raise AssertionError(f"{what}: output {i} not bit-identical (max |diff| {diff.max().item():.3g} on "
                                 f"outputs up to {a.abs().max().item():.3g}; {int((diff > 0).sum())} of "
                                 f"{a.numel()} differ)")


def search_step(model: nn.Module, inputs: Callable[[], tuple]) -> dict:
    """One Edge-Popup step: SGD (lr ``LR``) on every trainable tensor (the scores by default)."""
    group = timm_fslt.get_group(model)
    before = [layer.mask.clone() for layer in group.layers]
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=LR)
    opt.zero_grad()
    _loss(model(*inputs())).backward()
    dead = [layer.layer_name for layer in group.layers
            if layer.scores.grad is None or not bool(layer.scores.grad.any())]
    opt.step()
    group.refresh()
    flipped = sum(int((b != layer.mask).sum()) for b, layer in zip(before, group.layers))
    return {"layers": len(group.layers), "flipped": flipped, "dead_layers": dead,
            "trainable": sum(p.numel() for p in params)}


def _ticket_state(directory: Path, model: nn.Module) -> dict:
    """{key: (dtype name, numel)} of the tensors the saved ticket's config.json says it stores."""
    tensors = read_config(directory)["state"]["tensors"]
    return {k: (str(v["dtype"]).replace("torch.", ""), int(torch.Size(v["shape"]).numel()))
            for k, v in tensors.items()}


def _contract_state(model: nn.Module) -> dict:
    return {k: (str(v.dtype).replace("torch.", ""), v.numel()) for k, v in non_regenerable_state(model).items()}


def _is_float(dtype: str) -> bool:
    return dtype.startswith(("float", "bfloat", "half", "double", "complex"))


def _element_bytes(dtype: str) -> int:
    return torch.empty(0, dtype=getattr(torch, dtype)).element_size() if hasattr(torch, dtype) else 4


class _Steps:
    """Runs the cycle's steps, timing each and recording its failure instead of stopping."""

    def __init__(self, record: dict):
        self.record = record
        record.setdefault("times", {})
        record.setdefault("failures", {})

    def run(self, step: str, fn: Callable, *args):
        start = time.perf_counter()
        try:
            return True, fn(*args)
        except Exception as err:  # noqa: BLE001 -- every failure is recorded and re-raised at the end
            first = (str(err).strip().splitlines() or [""])[0]
            self.record["failures"][step] = f"{type(err).__name__}: {first}"[:400]
            self.record.setdefault("_errors", {})[step] = err
            return False, None
        finally:
            self.record["times"][step] = round(time.perf_counter() - start, 3)

    def skip(self, step: str, why: str) -> None:
        self.record.setdefault("skipped", {})[step] = why


def run_cycle(case: Case, tmp_path: Path, record: dict, freeze_kwargs: Optional[dict] = None) -> dict:
    """The whole cycle for ``case``; fills ``record`` and raises the first failing step's ``*Failed``.
    ``freeze_kwargs``: more ``freeze`` options (a search method, tests/test_zoo_methods.py)."""
    record.update(case=case.id, model=case.model, config=case.config, note=case.note)
    if freeze_kwargs:
        record["freeze_kwargs"] = {k: list(v) if isinstance(v, tuple) else v for k, v in freeze_kwargs.items()}
    steps = _Steps(record)
    start = time.perf_counter()
    torch.manual_seed(0)  # builders draw their (discarded) initial values from the global RNG
    # Fresh inputs for every forward: some models free or modify theirs (GroupAddRev frees its input's storage).
    ok, model = steps.run("build", lambda: (case.inputs(), case.build())[1])
    if ok:
        record["params"] = sum(p.numel() for p in model.parameters())
        _run_frozen(case, model, case.inputs, tmp_path, steps, freeze_kwargs or {})
    record["seconds"] = round(time.perf_counter() - start, 3)
    errors = record.pop("_errors", {})
    for step in STEPS:
        if step in errors:
            # Not chained (``from err``): pytest would print the failing frames' arguments, and a tensor whose
            # storage a model freed crashes repr; the original traceback is in the message instead.
            err = errors[step]
            trace = "".join(traceback.format_exception(type(err), err, err.__traceback__)[-6:])
            others = {s: m for s, m in record["failures"].items() if s != step}
            raise FAILED[step](f"{case.id} ({case.model}): {step} failed: {type(err).__name__}: {err}\n"
                               f"later failures: {others or 'none'}\n{trace}") from None
    return record


def _run_frozen(case: Case, model: nn.Module, inputs: Callable[[], tuple], tmp_path: Path, steps: _Steps,
                freeze_kwargs: dict) -> None:
    record = steps.record
    ok, _ = steps.run("freeze", lambda: timm_fslt.freeze(model, prune=PRUNE, lock=LOCK, seed=SEED, **freeze_kwargs))
    if not ok:
        for step in STEPS[2:]:
            steps.skip(step, "freeze failed")
        return

    def search():
        record["search"] = info = search_step(model, inputs)
        if info["flipped"] == 0:
            raise AssertionError(f"one step at lr={LR} flipped no mask bit ({len(info['dead_layers'])} of "
                                 f"{info['layers']} masked layers got no score gradient)")
    steps.run("search", search)
    reference: list = []

    def materialized():
        try:
            reference.extend(eval_outputs(model, inputs))
        except Exception as err:
            raise RuntimeError(f"the frozen model's eval forward failed: {type(err).__name__}: {err}") from err
        plain = timm_fslt.materialize(model)
        _same(reference, eval_outputs(plain, inputs), "materialize(model)")
        _same(reference, eval_outputs(model, inputs), "the frozen model after materialize")
    steps.run("materialize", materialized)
    directory = tmp_path / "ticket"
    saved, _ = steps.run("save", lambda: timm_fslt.save_ticket(model, directory, architecture=case.architecture))
    if saved:
        record["ticket_bytes"] = {p.name: p.stat().st_size for p in sorted(directory.iterdir())}
        if not reference:
            steps.skip("load", "no reference outputs (the frozen model's eval forward failed)")
        else:
            steps.run("load", lambda: _same(reference, eval_outputs(timm_fslt.load_ticket(directory), inputs),
                                            "load_ticket(saved ticket)"))
    else:
        steps.skip("load", "save failed")

    def state():
        stored = _ticket_state(directory, model) if saved else _contract_state(model)
        record["state"] = {k: list(v) for k, v in stored.items()}
        reasons = state_reasons(model)
        record["state_reasons"] = {k: reasons[k] for k in stored if k in reasons}
        bad = sorted(k for k, (dtype, _) in stored.items() if _is_float(dtype) and not k.endswith(ALLOWED_STATE))
        if bad:
            raise AssertionError(f"the ticket stores {len(bad)} floating tensors that are not norm running "
                                 f"statistics: {summarise_keys(bad)}")
    steps.run("state", state)


# -- timm: the smallest model of every architecture family -----------------------------------------

@dataclass(frozen=True)
class TimmSpec:
    """One family (a module of ``timm.models``): its smallest model by parameter count, as built here.

    ``model`` is a timm model name, built with ``timm.create_model(model, num_classes=10)`` when there
    are no kwargs (the ticket then infers its architecture from timm's ``pretrained_cfg``) and with
    ``timm_fslt.create_model(model, num_classes=10, **kwargs)`` otherwise (the kwargs are recorded);
    or ``"class:<module>.<Class>"`` for a family whose entrypoints fix the arguments that shrink it:
    the class itself, through the builder ``zoo_timm_class`` registered below, as a user would.
    ``size`` is the input's height and width; ``note`` says why this configuration.
    """
    module: str
    model: str
    size: int
    kwargs: dict
    note: str = ""


def T(module: str, model: str, size: int, note: str = "", **kwargs) -> TimmSpec:
    return TimmSpec(module, model, size, kwargs, note)


# The smallest model of each family by parameter count (counted on the meta device with
# num_classes=10: ``python tests/zoo_cases.py smallest``), at the smallest input it runs at;
# models above ~5M parameters shrunk (depth first, then width) where timm lets kwargs do it.
TIMM_SPECS = [
    T('beit', 'beit_base_patch16_224', 32, img_size=32, depth=2, embed_dim=192, num_heads=3,
      note='85.8M as built: depth 2, width 192'),
    T('byoanet', 'lambda_resnet26t', 32,
      note='halonet_h1 (7.6M, the smallest) needs a 256-px input: 2.5 s a forward on one thread'),
    T('byobnet', 'test_byobnet', 32, img_size=32),
    T('cait', 'cait_xxs24_224', 32, img_size=32, depth=4,
      note='depth 4 of 24'),
    T('coat', 'coat_tiny', 32, img_size=32, serial_depths=[1, 1, 1, 1], parallel_depth=2,
      note='5.3M as built: one serial block a stage, two parallel blocks'),
    T('conv6', 'conv6', 32, img_size=32),
    T('convit', 'convit_tiny', 32, img_size=32, depth=4,
      note='depth 4 of 12'),
    T('convmixer', 'class:convmixer.ConvMixer', 32, dim=256, depth=4, kernel_size=7, patch_size=7,
      note='20.3M as built; its entrypoint fixes dim and depth: the class at dim 256, depth 4'),
    T('convnext', 'test_convnext', 32),
    T('cpubone', 'cpubone_nano', 32),
    T('crossvit', 'crossvit_tiny_240', 32, depth=[[1, 1, 0]],
      note='6.7M as built: one multi-scale block of (1, 1, 0)'),
    T('csatv2', 'csatv2', 64, depths=[1, 1, 1, 1], transformer_depths=[0, 0, 1, 1],
      note='10.7M as built: one block a stage'),
    T('cspnet', 'cs3darknet_focus_s', 32),
    T('cspnext', 'cspnext_tiny', 32),
    T('davit', 'davit_tiny', 32, depths=[1, 1, 1, 1], embed_dims=[48, 96, 192, 384],
      note='27.6M as built: one block a stage, half width'),
    T('deepseek_vit', 'deepseek_vit_412m', 28, img_size=28, depth=2, embed_dim=192, num_heads=3,
      note='412M as built: depth 2, width 192'),
    T('deit', 'deit_tiny_patch16_224', 32, img_size=32),
    T('densenet', 'densenet121', 32, block_config=[2, 2, 2, 2],
      note='7.0M as built: two layers a dense block'),
    T('dla', 'dla46x_c', 32),
    T('dpn', 'dpn48b', 32, k_sec=[1, 1, 1, 1],
      note='8.3M as built: one block a stage'),
    T('edgenext', 'edgenext_xx_small', 32),
    T('efficientformer', 'efficientformer_l1', 224, depths=[1, 1, 1, 1],
      note="its last stage's attention biases are fixed to 7x7 tokens: 224 px"),
    T('efficientformer_v2', 'efficientformerv2_s0', 32, img_size=32),
    T('efficientnet', 'test_efficientnet', 32),
    T('efficientvim', 'efficientvim_m1', 32),
    T('efficientvit_mit', 'efficientvit_b0', 32),
    T('efficientvit_msra', 'efficientvit_m0', 32, img_size=32),
    T('eva', 'vit_tiny_patch16_dinov3_qkvb', 32, img_size=32),
    T('fasternet', 'fasternet_t0', 32),
    T('fastvit', 'fastvit_t8', 32),
    T('focalnet', 'class:focalnet.FocalNet', 32, depths=[1, 1, 1, 1], embed_dim=32,
      note='27.7M as built; its entrypoint fixes depths: the class at one block a stage, width 32'),
    T('gcvit', 'class:gcvit.GlobalContextVit', 32, img_size=32, depths=[1, 1, 1, 1], num_heads=[2, 4, 8, 16],
      embed_dim=64,
      note='11.4M as built; its entrypoint fixes depths: the class at one block a stage'),
    T('gemma4_vit', 'gemma4_vit_167m_enc', 48, img_size=48, depth=2, embed_dim=192, num_heads=3,
      note='167M as built: depth 2, width 192; the input must be a multiple of 48 px'),
    T('ghostnet', 'ghostnet_050', 32),
    T('hardcorenas', 'hardcorenas_b', 32),
    T('hgnet', 'hgnetv2_b0', 32),
    T('hiera', 'hiera_tiny_224', 32, img_size=32, stages=[1, 1, 1, 1], embed_dim=32,
      note='26.9M as built: one block a stage, width 32'),
    T('hieradet_sam2', 'sam2_hiera_tiny', 32, stages=[1, 1, 2, 1], global_att_blocks=[3], embed_dim=32,
      note='26.9M as built: stages (1, 1, 2, 1), width 32'),
    T('hrnet', 'hrnet_w18_small', 32),
    T('iformer', 'iformer_t', 32),
    T('inception_next', 'inception_next_atto', 32),
    T('inception_resnet_v2', 'inception_resnet_v2', 75,
      note='no smaller configuration; 75 px'),
    T('inception_v3', 'inception_v3', 75,
      note='no smaller configuration (no width or depth argument); 75 px is its minimum'),
    T('inception_v4', 'inception_v4', 75,
      note='no smaller configuration; 75 px'),
    T('lcnetv2', 'lcnetv2_small', 32),
    T('levit', 'levit_128s', 32, img_size=32, depth=[1, 1, 1],
      note='7.0M as built: one block a stage'),
    T('lowformer', 'lowformer_b0', 32, depth_list=[0, 1, 1, 1, 1],
      note='12.5M as built: one block a stage'),
    T('mambaout', 'test_mambaout', 32),
    T('maxxvit', 'test_coatnet', 32, img_size=32),
    T('metaformer', 'class:metaformer.MetaFormer', 32, depths=[1, 1, 1, 1], dims=[32, 64, 128, 256],
      note='11.4M as built (poolformerv2_s12); its entrypoint fixes depths: the class, one block a stage, width 32'),
    T('mlp_mixer', 'gmlp_ti16_224', 32, img_size=32),
    T('mnist', 'mnist_mlp', 28,
      note="timm_fslt's own: 1 channel, 28 px"),
    T('mobilenetv3', 'lcnet_035', 32),
    T('mobilenetv5', 'mobilenetv5_base', 32, channel_multiplier=0.125, num_features=256,
      note='80.6M as built: channels x 1/8, 256 features'),
    T('mobilevit', 'mobilevit_xxs', 32, img_size=32),
    T('mvitv2', 'class:mvitv2.MultiScaleVit', 32, img_size=32, cfg={'depths': [1, 1, 1, 1], 'embed_dim': 32},
      note='23.3M as built; its config is a dataclass: the class with '
           'MultiScaleVitCfg(depths=(1, 1, 1, 1), embed_dim=32)'),
    T('naflexvit', 'naflexvit_base_patch16_parfac_gap', 32, img_size=32, depth=2, embed_dim=192, num_heads=3,
      note='85.7M as built: depth 2, width 192'),
    T('nasnet', 'nasnetalarge', 32, stem_size=32, num_features=768,
      note='84.8M as built: stem 32, 768 features (32 channels a cell)'),
    T('nest', 'class:nest.Nest', 32, img_size=32, embed_dims=[64, 128, 256], num_heads=[2, 4, 8], depths=[1, 1, 2],
      note='16.2M as built; its entrypoint fixes depths: the class at depths (1, 1, 2), half width'),
    T('nextvit', 'nextvit_small', 32, depths=[1, 1, 5, 1],
      note='30.7M as built: depths (1, 1, 5, 1) (stage 3 needs a multiple of 5)'),
    T('nfnet', 'test_nfnet', 32),
    T('pit', 'pit_ti_224', 32, img_size=32),
    T('pnasnet', 'pnasnet5large', 32,
      note='no smaller configuration (no width or depth argument)'),
    T('pvt_v2', 'pvt_v2_b0', 32),
    T('qwen3_vit', 'qwen3_vit_88m', 32, img_size=32, depth=2, embed_dim=192, num_heads=3,
      note='87.4M as built: depth 2, width 192'),
    T('rdnet', 'rdnet_tiny', 32, num_blocks_list=[1, 1, 1, 1, 1, 1, 1],
      note='22.8M as built: one block a stage'),
    T('regnet', 'regnetx_002', 32),
    T('repghost', 'repghostnet_050', 32),
    T('repvit', 'repvit_m1', 32, img_size=32, depth=[1, 1, 1, 1],
      note='128 masked layers as built (depths 2, 2, 14, 2): one block a stage'),
    T('res2net', 'res2next50', 32, layers=[1, 1, 1, 1],
      note='22.6M as built: one block a stage'),
    T('resnest', 'resnest14d', 32),
    T('resnet', 'test_resnet', 32),
    T('resnet_cifar', 'resnet18_cifar', 32, width=0.25,
      note="timm_fslt's own, at width 1/4"),
    T('resnetv2', 'resnetv2_18', 32, layers=[1, 1, 1, 1],
      note='11.2M as built: one block a stage'),
    T('rexnet', 'rexnet_100', 32, width_mult=0.5,
      note='half width (3.5M as built, 16 s a cycle under load)'),
    T('selecsls', 'selecsls42', 32,
      note='no smaller configuration (its stages come from the variant name)'),
    T('senet', 'legacy_seresnet18', 32, layers=[1, 1, 1, 1],
      note='11.3M as built: one block a stage'),
    T('sequencer', 'sequencer2d_s', 32, img_size=32, layers=[1, 1, 1, 1],
      note='27.3M as built: one block a stage'),
    T('shvit', 'shvit_s1', 32),
    T('sknet', 'skresnet18', 32, layers=[1, 1, 1, 1],
      note='11.5M as built: one block a stage'),
    T('starnet', 'starnet_s050', 32),
    T('swiftformer', 'swiftformer_xs', 32, img_size=32),
    T('swin_transformer', 'swin_tiny_patch4_window7_224', 32, img_size=32, depths=[1, 1, 1, 1], embed_dim=32,
      num_heads=[1, 2, 4, 8],
      note='27.5M as built: one block a stage, width 32'),
    T('swin_transformer_v2', 'swinv2_tiny_window8_256', 32, img_size=32, depths=[1, 1, 1, 1], embed_dim=32,
      num_heads=[1, 2, 4, 8],
      note='27.6M as built: one block a stage, width 32'),
    T('swin_transformer_v2_cr', 'swinv2_cr_tiny_224', 32, img_size=32, depths=[1, 1, 1, 1], embed_dim=32,
      num_heads=[1, 2, 4, 8],
      note='27.6M as built: one block a stage, width 32'),
    T('tiny_vit', 'tiny_vit_5m_224', 32),
    T('tnt', 'tnt_s_legacy_patch16_224', 32, img_size=32, depth=2,
      note='23.4M as built: depth 2'),
    T('tresnet', 'tresnet_m', 32, layers=[1, 1, 1, 1], width_factor=0.5,
      note='29.4M as built: one block a stage, half width'),
    T('twins', 'twins_svt_small', 32, img_size=32, depths=[1, 1, 1, 1],
      note='23.6M as built: one block a stage'),
    T('vgg', 'vgg11', 32, mlp_ratio=0.015625,
      note='128.8M as built: a 64-wide classifier MLP instead of 4096 (the convs stay)'),
    T('visformer', 'visformer_tiny', 32, img_size=32, depth=4,
      note='depth 4 of 12'),
    T('vision_transformer', 'test_vit', 32, img_size=32),
    T('vision_transformer_hybrid', 'vit_tiny_r_s16_p8_224', 32, img_size=32),
    T('vision_transformer_relpos', 'test_vit_relpos', 32, img_size=32),
    T('vision_transformer_sam', 'samvit_base_patch16_224', 32, img_size=32, depth=2, embed_dim=192, num_heads=3,
      global_attn_indexes=[1],
      note='85.7M as built: depth 2, width 192'),
    T('vitamin', 'vitamin_small_224', 32, img_size=32, depth=2,
      note='21.9M as built: depth 2'),
    T('volo', 'class:volo.VOLO', 32, img_size=32, layers=[1, 1, 1, 1], embed_dims=[64, 128, 128, 128],
      num_heads=[2, 4, 4, 4],
      note='25.8M as built; its entrypoint fixes layers: the class at one block a stage, width 64/128'),
    T('vovnet', 'ese_vovnet19b_slim_dw', 32),
    T('xception', 'legacy_xception', 32,
      note='no smaller configuration (no width or depth argument)'),
    T('xception_aligned', 'class:xception_aligned.XceptionAligned', 32, preact=True, block_cfg=[
      dict(in_chs=64, out_chs=128, stride=2), dict(in_chs=128, out_chs=256, stride=2),
      dict(in_chs=256, out_chs=364, stride=2), dict(in_chs=364, out_chs=364, stride=1),
      dict(in_chs=364, out_chs=[364, 512, 512], stride=2),
      dict(in_chs=512, out_chs=[768, 768, 1024], no_skip=True, stride=1)],
      note='24.9M as built (xception41p); its blocks are a list argument: the class with one middle block, '
           'about half width'),
    T('xcit', 'xcit_nano_12_p8_224', 32, img_size=32),
]
TIMM = {spec.module: spec for spec in TIMM_SPECS}
CLASS_BUILDER = "zoo_timm_class"


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def build_timm_class(cls: str, **kwargs) -> nn.Module:
    """``timm.models.<module>.<Class>(**kwargs)`` (a ``cfg`` dict becomes the module's ``<Class>Cfg``)."""
    import importlib

    import timm

    module_name, _, class_name = cls.partition(".")
    if module_name not in timm.list_modules() or not class_name.isidentifier():
        raise ValueError(f"cls must be '<timm.models module>.<Class>', got {cls!r}")
    module = importlib.import_module(f"timm.models.{module_name}")
    model_class = getattr(module, class_name)
    if not (isinstance(model_class, type) and issubclass(model_class, nn.Module)):
        raise ValueError(f"{cls!r} is not a torch.nn.Module class")
    kwargs = copy.deepcopy(kwargs)  # some constructors (XceptionAligned) write into their block dicts
    if "cfg" in kwargs:
        kwargs["cfg"] = getattr(module, f"{class_name}Cfg")(**{k: _tuples(v) for k, v in kwargs["cfg"].items()})
    return model_class(**kwargs)


timm_fslt.register_builder(CLASS_BUILDER, build_timm_class, replace=True)


def timm_case(spec: TimmSpec) -> Case:
    import timm

    in_chans = 1 if spec.module == "mnist" else 3
    if spec.model.startswith("class:"):
        kwargs = dict(cls=spec.model[len("class:"):], num_classes=10, **spec.kwargs)
        architecture = {"builder": CLASS_BUILDER, "kwargs": kwargs}

        def build():
            return build_timm_class(**kwargs)
    elif spec.kwargs:
        architecture = None

        def build():
            return timm_fslt.create_model(spec.model, num_classes=10, **copy.deepcopy(spec.kwargs))
    else:
        architecture = None

        def build():
            return timm.create_model(spec.model, num_classes=10)

    def inputs():
        return (torch.randn(2, in_chans, spec.size, spec.size, generator=torch.Generator().manual_seed(0)),)
    return Case(id=spec.module, model=spec.model, build=build, inputs=inputs, architecture=architecture,
                note=spec.note, config=dict(spec.kwargs, input=spec.size))


def smallest_per_module() -> dict:
    """{module: (model, parameters)}: every timm model counted on the meta device (about 5 minutes)."""
    import timm

    best: dict = {}
    for module in timm.list_modules():
        for name in timm.list_models(module=module):
            with torch.device("meta"):
                n = sum(p.numel() for p in timm.create_model(name, num_classes=10).parameters())
            if module not in best or n < best[module][1]:
                best[module] = (name, n)
    return best


# -- PyG: the models of torch_geometric.nn.models and two-layer stacks of every conv ----------------
# One tiny random graph: two graphs of 6 nodes (a ring plus random chords, both directions), 8 input
# features, 4-dim edge features, 3 relation types, 3-d positions with normals; hidden width 16, 4 outputs.
N_NODES, F_IN, HIDDEN, F_OUT, EDGE_DIM, N_REL = 12, 8, 16, 4, 4, 3
PYG_BUILDER = "zoo_pyg"


def graph() -> dict:
    g = torch.Generator().manual_seed(1)
    pairs = set()
    for base in (0, 6):
        for i in range(6):
            pairs.add((base + i, base + (i + 1) % 6))
        for i in range(6):
            for j in range(i + 2, 6):
                if torch.rand(1, generator=g).item() < 0.4:
                    pairs.add((base + i, base + j))
    pairs = sorted(pairs | {(j, i) for i, j in pairs})
    edge_index = torch.tensor(pairs, dtype=torch.long).t().contiguous()
    n_edges = edge_index.shape[1]
    normal = torch.randn(N_NODES, 3, generator=g)
    return dict(
        x=torch.randn(N_NODES, F_IN, generator=g), edge_index=edge_index,
        edge_attr=torch.randn(n_edges, EDGE_DIM, generator=g),
        edge_type=torch.randint(0, N_REL, (n_edges,), generator=g),
        node_type=torch.arange(N_NODES) % 2,
        pos=torch.randn(N_NODES, 3, generator=g), normal=normal / normal.norm(dim=1, keepdim=True),
        batch=torch.arange(N_NODES) // 6,
        pos_edge_index=edge_index[:, 0::2], neg_edge_index=edge_index[:, 1::2],
        # a "mesh": every node an edge with 4 neighbours (MeshCNNConv)
        mesh_index=torch.stack([torch.arange(N_NODES).repeat_interleave(4),
                                (torch.arange(N_NODES).repeat_interleave(4) + torch.arange(1, 5).repeat(N_NODES))
                                % N_NODES]),
    )


def degree_histogram() -> torch.Tensor:
    from torch_geometric.utils import degree
    d = degree(graph()["edge_index"][1], N_NODES, dtype=torch.long)
    return torch.bincount(d)


def _mlp(*sizes, bias: bool = True) -> nn.Module:
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [nn.Linear(a, b, bias=bias)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers)


# {conv: (make(layer, c_in, c_out) -> conv, the forward's arguments, channel-preserving?)}
# Channel-preserving convs run at HIDDEN between a Linear in and a Linear out.
def _conv_specs() -> dict:
    import torch_geometric.nn as G

    H = HIDDEN
    return {
        "SimpleConv": (lambda i, a, b: G.SimpleConv(), ("x", "edge_index"), True),
        "GCNConv": (lambda i, a, b: G.GCNConv(a, b), ("x", "edge_index"), False),
        "ChebConv": (lambda i, a, b: G.ChebConv(a, b, K=2), ("x", "edge_index"), False),
        "SAGEConv": (lambda i, a, b: G.SAGEConv(a, b), ("x", "edge_index"), False),
        "GraphConv": (lambda i, a, b: G.GraphConv(a, b), ("x", "edge_index"), False),
        "GravNetConv": (lambda i, a, b: G.GravNetConv(a, b, space_dimensions=2, propagate_dimensions=4, k=3),
                        ("x", "batch"), False),
        "GatedGraphConv": (lambda i, a, b: G.GatedGraphConv(H, num_layers=2), ("x", "edge_index"), True),
        "ResGatedGraphConv": (lambda i, a, b: G.ResGatedGraphConv(a, b), ("x", "edge_index"), False),
        "GATConv": (lambda i, a, b: G.GATConv(a, b, heads=2, concat=False, edge_dim=EDGE_DIM),
                    ("x", "edge_index", "edge_attr"), False),
        "GATv2Conv": (lambda i, a, b: G.GATv2Conv(a, b, heads=2, concat=False, edge_dim=EDGE_DIM),
                      ("x", "edge_index", "edge_attr"), False),
        "TransformerConv": (lambda i, a, b: G.TransformerConv(a, b, heads=2, concat=False, edge_dim=EDGE_DIM),
                            ("x", "edge_index", "edge_attr"), False),
        "AGNNConv": (lambda i, a, b: G.AGNNConv(), ("x", "edge_index"), True),
        "TAGConv": (lambda i, a, b: G.TAGConv(a, b, K=2), ("x", "edge_index"), False),
        "GINConv": (lambda i, a, b: G.GINConv(_mlp(a, b, b)), ("x", "edge_index"), False),
        "GINEConv": (lambda i, a, b: G.GINEConv(_mlp(a, b, b), edge_dim=EDGE_DIM), ("x", "edge_index", "edge_attr"),
                     False),
        "ARMAConv": (lambda i, a, b: G.ARMAConv(a, b, num_stacks=2, num_layers=2), ("x", "edge_index"), False),
        "SGConv": (lambda i, a, b: G.SGConv(a, b, K=2), ("x", "edge_index"), False),
        "SSGConv": (lambda i, a, b: G.SSGConv(a, b, alpha=0.1, K=2), ("x", "edge_index"), False),
        "APPNP": (lambda i, a, b: G.APPNP(K=2, alpha=0.1), ("x", "edge_index"), True),
        "MFConv": (lambda i, a, b: G.MFConv(a, b, max_degree=4), ("x", "edge_index"), False),
        "RGCNConv": (lambda i, a, b: G.RGCNConv(a, b, num_relations=N_REL), ("x", "edge_index", "edge_type"), False),
        "FastRGCNConv": (lambda i, a, b: G.FastRGCNConv(a, b, num_relations=N_REL), ("x", "edge_index", "edge_type"),
                         False),
        "RGATConv": (lambda i, a, b: G.RGATConv(a, b, num_relations=N_REL), ("x", "edge_index", "edge_type"), False),
        "SignedConv": (lambda i, a, b: G.SignedConv(a if i == 0 else a // 2, b // 2, first_aggr=i == 0),
                       ("x", "pos_edge_index", "neg_edge_index"), True),
        "DNAConv": (lambda i, a, b: G.DNAConv(H, heads=2), ("history", "edge_index"), True),
        "PointNetConv": (lambda i, a, b: G.PointNetConv(_mlp(a + 3, b), _mlp(b, b)), ("x", "pos", "edge_index"),
                         False),
        "GMMConv": (lambda i, a, b: G.GMMConv(a, b, dim=EDGE_DIM, kernel_size=2), ("x", "edge_index", "edge_attr"),
                    False),
        "SplineConv": (lambda i, a, b: G.SplineConv(a, b, dim=EDGE_DIM, kernel_size=2),
                       ("x", "edge_index", "edge_attr"), False),
        "NNConv": (lambda i, a, b: G.NNConv(a, b, _mlp(EDGE_DIM, a * b)), ("x", "edge_index", "edge_attr"), False),
        "CGConv": (lambda i, a, b: G.CGConv(H, dim=EDGE_DIM), ("x", "edge_index", "edge_attr"), True),
        "EdgeConv": (lambda i, a, b: G.EdgeConv(_mlp(2 * a, b)), ("x", "edge_index"), False),
        "DynamicEdgeConv": (lambda i, a, b: G.DynamicEdgeConv(_mlp(2 * a, b), k=3), ("x", "batch"), False),
        "XConv": (lambda i, a, b: G.XConv(a, b, dim=3, kernel_size=3), ("x", "pos", "batch"), False),
        "PPFConv": (lambda i, a, b: G.PPFConv(_mlp(a + 4, b), _mlp(b, b)), ("x", "pos", "normal", "edge_index"),
                    False),
        "FeaStConv": (lambda i, a, b: G.FeaStConv(a, b, heads=2), ("x", "edge_index"), False),
        "PointTransformerConv": (lambda i, a, b: G.PointTransformerConv(a, b), ("x", "pos", "edge_index"), False),
        "HypergraphConv": (lambda i, a, b: G.HypergraphConv(a, b), ("x", "edge_index"), False),
        "LEConv": (lambda i, a, b: G.LEConv(a, b), ("x", "edge_index"), False),
        "PNAConv": (lambda i, a, b: G.PNAConv(a, b, aggregators=["mean", "max"], scalers=["identity", "amplification"],
                                              deg=degree_histogram(), edge_dim=EDGE_DIM),
                    ("x", "edge_index", "edge_attr"), False),
        "ClusterGCNConv": (lambda i, a, b: G.ClusterGCNConv(a, b), ("x", "edge_index"), False),
        "GENConv": (lambda i, a, b: G.GENConv(a, b), ("x", "edge_index"), False),
        "GCN2Conv": (lambda i, a, b: G.GCN2Conv(H, alpha=0.1, theta=0.5, layer=i + 1), ("x", "x0", "edge_index"),
                     True),
        "PANConv": (lambda i, a, b: G.PANConv(a, b, filter_size=2), ("x", "edge_index"), False),
        "WLConvContinuous": (lambda i, a, b: G.WLConvContinuous(), ("x", "edge_index"), True),
        "FiLMConv": (lambda i, a, b: G.FiLMConv(a, b, num_relations=N_REL), ("x", "edge_index", "edge_type"), False),
        "SuperGATConv": (lambda i, a, b: G.SuperGATConv(a, b, heads=2, concat=False), ("x", "edge_index"), False),
        "FAConv": (lambda i, a, b: G.FAConv(H), ("x", "x0", "edge_index"), True),
        "EGConv": (lambda i, a, b: G.EGConv(a, b, num_heads=2, num_bases=2), ("x", "edge_index"), False),
        "PDNConv": (lambda i, a, b: G.PDNConv(a, b, edge_dim=EDGE_DIM, hidden_channels=8),
                    ("x", "edge_index", "edge_attr"), False),
        "GeneralConv": (lambda i, a, b: G.GeneralConv(a, b, in_edge_channels=EDGE_DIM, attention=True),
                        ("x", "edge_index", "edge_attr"), False),
        "HEATConv": (lambda i, a, b: G.HEATConv(a, b, num_node_types=2, num_edge_types=N_REL, edge_type_emb_dim=4,
                                                edge_dim=EDGE_DIM, edge_attr_emb_dim=4),
                     ("x", "edge_index", "node_type", "edge_type", "edge_attr"), False),
        "LGConv": (lambda i, a, b: G.LGConv(), ("x", "edge_index"), True),
        "PointGNNConv": (lambda i, a, b: G.PointGNNConv(_mlp(H, 3), _mlp(H + 3, H), _mlp(H, H)),
                         ("x", "pos", "edge_index"), True),
        "GPSConv": (lambda i, a, b: G.GPSConv(H, G.GINConv(_mlp(H, H)), heads=2), ("x", "edge_index", "batch"), True),
        "AntiSymmetricConv": (lambda i, a, b: G.AntiSymmetricConv(H), ("x", "edge_index"), True),
        "DirGNNConv": (lambda i, a, b: G.DirGNNConv(G.SAGEConv(a, b)), ("x", "edge_index"), False),
        "MixHopConv": (lambda i, a, b: G.MixHopConv(a if i == 0 else 3 * H, b, powers=[0, 1, 2]),
                       ("x", "edge_index"), False),
        "MeshCNNConv": (lambda i, a, b: G.MeshCNNConv(a, b), ("x", "mesh_index"), False),
        # CUDA-only (pylibcugraphops, dgNN): skipped where those packages are missing (PYG_SKIP)
        "CuGraphSAGEConv": (lambda i, a, b: G.CuGraphSAGEConv(a, b), ("x", "edge_index"), False),
        "CuGraphGATConv": (lambda i, a, b: G.CuGraphGATConv(a, b), ("x", "edge_index"), False),
        "CuGraphRGCNConv": (lambda i, a, b: G.CuGraphRGCNConv(a, b, N_REL), ("x", "edge_index", "edge_type"), False),
        "FusedGATConv": (lambda i, a, b: G.FusedGATConv(a, b), ("x", "edge_index"), False),
    }


# Hetero convs: node types "a" and "b", relations a->b and b->a; forward(x_dict, edge_index_dict).
def _hetero_specs() -> dict:
    import torch_geometric.nn as G

    metadata = (["a", "b"], [("a", "to", "b"), ("b", "to", "a")])
    return {
        "HGTConv": lambda a, b: G.HGTConv(a, b, metadata, heads=2),
        "HANConv": lambda a, b: G.HANConv(a, b, metadata, heads=2),
        "HeteroConv": lambda a, b: G.HeteroConv({edge: G.SAGEConv(a, b) for edge in metadata[1]}),
    }


def hetero_graph() -> tuple:
    g = graph()
    ei = g["edge_index"]
    x_dict = {"a": g["x"][:6], "b": g["x"][6:]}
    # a->b: node i of "a" to node (j - 6) of "b" for every edge i -> j of the first graph shifted by 6
    first = ei[:, (ei[0] < 6) & (ei[1] < 6)]
    edge_index_dict = {("a", "to", "b"): first.clone(), ("b", "to", "a"): first.flip(0).clone()}
    return x_dict, edge_index_dict


class ConvStack(nn.Module):
    """Two layers of one PyG conv (ReLU between), as a user stacks them."""

    def __init__(self, conv: str):
        super().__init__()
        make, self.args, same = _conv_specs()[conv]
        self.lin_in = nn.Linear(F_IN, HIDDEN) if same else None
        sizes = [(HIDDEN, HIDDEN), (HIDDEN, HIDDEN)] if same else [(F_IN, HIDDEN), (HIDDEN, F_OUT)]
        self.convs = nn.ModuleList([make(i, a, b) for i, (a, b) in enumerate(sizes)])
        self.lin_out = nn.Linear(HIDDEN, F_OUT) if same else None

    def forward(self, x, edge_index, edge_attr, edge_type, node_type, pos, normal, batch, pos_edge_index,
                neg_edge_index, mesh_index):
        env = dict(edge_index=edge_index, edge_attr=edge_attr, edge_type=edge_type, node_type=node_type, pos=pos,
                   normal=normal, batch=batch, pos_edge_index=pos_edge_index, neg_edge_index=neg_edge_index,
                   mesh_index=mesh_index)
        h = self.lin_in(x) if self.lin_in is not None else x
        env["x0"] = h
        for i, conv in enumerate(self.convs):
            env["x"] = h
            if "history" in self.args:  # DNAConv attends over the layers' outputs so far
                env["history"] = torch.stack([env["x0"], h], dim=1)
            h = conv(*[env[a] for a in self.args])
            h = h[0] if isinstance(h, tuple) else h
            if i == 0:
                h = torch.relu(h)
        return self.lin_out(h) if self.lin_out is not None else h


class HeteroStack(nn.Module):
    def __init__(self, conv: str):
        super().__init__()
        make = _hetero_specs()[conv]
        self.convs = nn.ModuleList([make(F_IN, HIDDEN), make(HIDDEN, F_OUT)])

    def forward(self, x_dict, edge_index_dict):
        for i, conv in enumerate(self.convs):
            x_dict = conv(x_dict, edge_index_dict)
            if i == 0:
                x_dict = {k: torch.relu(v) for k, v in x_dict.items() if v is not None}
        return x_dict


# -- PyG models, with module-level pieces (deep-copyable) ---------------------------------------------

def _dgi_summary(z, *args, **kwargs):
    return torch.sigmoid(z.mean(dim=0))


def _dgi_corruption(x, edge_index):
    return x[torch.randperm(x.size(0))], edge_index


def _full_interaction_graph(pos, batch):
    """SchNet's interaction graph without torch_cluster: every pair of atoms in the same molecule."""
    same = batch[:, None] == batch[None, :]
    same.fill_diagonal_(False)
    edge_index = same.nonzero().t()
    return edge_index, (pos[edge_index[0]] - pos[edge_index[1]]).norm(dim=-1)


class _VEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        from torch_geometric.nn import GCNConv
        self.conv, self.mu, self.logstd = GCNConv(F_IN, HIDDEN), GCNConv(HIDDEN, F_OUT), GCNConv(HIDDEN, F_OUT)

    def forward(self, x, edge_index):
        h = torch.relu(self.conv(x, edge_index))
        return self.mu(h, edge_index), self.logstd(h, edge_index)


class _EdgeModel(nn.Module):  # MetaLayer's three blocks, as in PyG's documentation
    def __init__(self):
        super().__init__()
        self.mlp = _mlp(2 * F_IN + EDGE_DIM + HIDDEN, EDGE_DIM)

    def forward(self, src, dst, edge_attr, u, batch):
        return self.mlp(torch.cat([src, dst, edge_attr, u[batch]], 1))


class _NodeModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = _mlp(F_IN + EDGE_DIM + HIDDEN, F_IN)

    def forward(self, x, edge_index, edge_attr, u, batch):
        from torch_geometric.utils import scatter
        agg = scatter(edge_attr, edge_index[1], dim=0, dim_size=x.size(0), reduce="mean")
        return self.mlp(torch.cat([x, agg, u[batch]], 1))


class _GlobalModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = _mlp(HIDDEN + F_IN, HIDDEN)

    def forward(self, x, edge_index, edge_attr, u, batch):
        from torch_geometric.utils import scatter
        return self.mlp(torch.cat([u, scatter(x, batch, dim=0, reduce="mean")], 1))


def _model_specs() -> dict:
    """{model: (build() -> module, inputs(graph) -> forward arguments)}."""
    import torch_geometric.nn as G
    import torch_geometric.nn.models as M

    xe = lambda g: (g["x"], g["edge_index"])  # noqa: E731
    xeb = lambda g: (g["x"], g["edge_index"], g["batch"])  # noqa: E731
    h16 = lambda g: torch.randn(N_NODES, HIDDEN, generator=torch.Generator().manual_seed(2))  # noqa: E731
    return {
        "MLP": (lambda: M.MLP([F_IN, HIDDEN, F_OUT]), lambda g: (g["x"],)),
        "GCN": (lambda: M.GCN(F_IN, HIDDEN, 2, F_OUT), xe),
        "GraphSAGE": (lambda: M.GraphSAGE(F_IN, HIDDEN, 2, F_OUT), xe),
        "GIN": (lambda: M.GIN(F_IN, HIDDEN, 2, F_OUT), xe),
        "GAT": (lambda: M.GAT(F_IN, HIDDEN, 2, F_OUT, heads=2), xe),
        "PNA": (lambda: M.PNA(F_IN, HIDDEN, 2, F_OUT, aggregators=["mean", "max"], scalers=["identity"],
                              deg=degree_histogram()), xe),
        "EdgeCNN": (lambda: M.EdgeCNN(F_IN, HIDDEN, 2, F_OUT), xe),
        "JumpingKnowledge": (lambda: M.JumpingKnowledge("lstm", channels=HIDDEN, num_layers=2),
                             lambda g: ([h16(g), 2 * h16(g)],)),
        "HeteroJumpingKnowledge": (lambda: M.HeteroJumpingKnowledge(["a", "b"], "lstm", channels=HIDDEN, num_layers=2),
                                   lambda g: ({"a": [h16(g), 2 * h16(g)], "b": [3 * h16(g), h16(g)]},)),
        "MetaLayer": (lambda: M.MetaLayer(_EdgeModel(), _NodeModel(), _GlobalModel()),
                      lambda g: (g["x"], g["edge_index"], g["edge_attr"],
                                 torch.randn(2, HIDDEN, generator=torch.Generator().manual_seed(3)), g["batch"])),
        "DeepGraphInfomax": (lambda: M.DeepGraphInfomax(F_OUT, M.GCN(F_IN, HIDDEN, 2, F_OUT), _dgi_summary,
                                                        _dgi_corruption), xe),
        "GAE": (lambda: M.GAE(M.GCN(F_IN, HIDDEN, 2, F_OUT)), xe),
        "VGAE": (lambda: M.VGAE(_VEncoder()), xe),
        "ARGA": (lambda: M.ARGA(M.GCN(F_IN, HIDDEN, 2, F_OUT), _mlp(F_OUT, HIDDEN, 1)), xe),
        "ARGVA": (lambda: M.ARGVA(_VEncoder(), _mlp(F_OUT, HIDDEN, 1)), xe),
        "SignedGCN": (lambda: M.SignedGCN(F_IN, HIDDEN, 2), lambda g: (g["x"], g["pos_edge_index"],
                                                                        g["neg_edge_index"])),
        "GraphUNet": (lambda: M.GraphUNet(F_IN, HIDDEN, F_OUT, depth=2), xe),
        "SchNet": (lambda: M.SchNet(hidden_channels=HIDDEN, num_filters=HIDDEN, num_interactions=2, num_gaussians=8,
                                    cutoff=5.0, interaction_graph=_full_interaction_graph),
                   lambda g: (torch.arange(N_NODES) % 5 + 1, g["pos"], g["batch"])),
        "DimeNet": (lambda: M.DimeNet(HIDDEN, F_OUT, num_blocks=1, num_bilinear=4, num_spherical=3, num_radial=3),
                    lambda g: (torch.arange(N_NODES) % 5 + 1, g["pos"], g["batch"])),
        "DimeNetPlusPlus": (lambda: M.DimeNetPlusPlus(HIDDEN, F_OUT, num_blocks=1, int_emb_size=8, basis_emb_size=4,
                                                      out_emb_channels=8, num_spherical=3, num_radial=3),
                            lambda g: (torch.arange(N_NODES) % 5 + 1, g["pos"], g["batch"])),
        "ViSNet": (lambda: M.ViSNet(num_heads=2, num_layers=2, hidden_channels=HIDDEN, num_rbf=8),
                   lambda g: (torch.arange(N_NODES) % 5 + 1, g["pos"], g["batch"])),
        "GNNFF": (lambda: M.GNNFF(HIDDEN, HIDDEN, 2), lambda g: (torch.arange(N_NODES) % 5 + 1, g["pos"], g["batch"])),
        "DeepGCNLayer": (lambda: M.DeepGCNLayer(G.GENConv(HIDDEN, HIDDEN), nn.LayerNorm(HIDDEN), nn.ReLU(),
                                                block="res+"), lambda g: (h16(g), g["edge_index"])),
        "AttentiveFP": (lambda: M.AttentiveFP(F_IN, HIDDEN, F_OUT, edge_dim=EDGE_DIM, num_layers=2, num_timesteps=2),
                        lambda g: (g["x"], g["edge_index"], g["edge_attr"], g["batch"])),
        "RECT_L": (lambda: M.RECT_L(F_IN, HIDDEN), xe),
        "LINKX": (lambda: M.LINKX(N_NODES, F_IN, HIDDEN, F_OUT, num_layers=2), xe),
        "LightGCN": (lambda: M.LightGCN(N_NODES, HIDDEN, num_layers=2), lambda g: (g["edge_index"],)),
        "MaskLabel": (lambda: M.MaskLabel(F_OUT, F_IN),
                      lambda g: (g["x"], torch.arange(N_NODES) % F_OUT, torch.arange(N_NODES) % 2 == 0)),
        "GroupAddRev": (lambda: M.GroupAddRev(G.GraphConv(HIDDEN // 2, HIDDEN // 2), num_groups=2),
                        lambda g: (h16(g), g["edge_index"])),
        "PMLP": (lambda: M.PMLP(F_IN, HIDDEN, F_OUT, num_layers=2), xe),
        "NeuralFingerprint": (lambda: M.NeuralFingerprint(F_IN, HIDDEN, F_OUT, num_layers=2), xeb),
        "SGFormer": (lambda: M.SGFormer(F_IN, HIDDEN, F_OUT, trans_num_layers=1, gnn_num_layers=1), xeb),
        "Polynormer": (lambda: M.Polynormer(F_IN, HIDDEN, F_OUT, local_layers=1, global_layers=1), xeb),
        "ARLinkPredictor": (lambda: M.ARLinkPredictor(F_IN, HIDDEN, F_OUT), xe),
        "Node2Vec": (lambda: M.Node2Vec(graph()["edge_index"], embedding_dim=HIDDEN, walk_length=4, context_size=2),
                     lambda g: ()),
    }


def build_pyg(kind: str, name: str) -> nn.Module:
    """The builder tickets name (``{"builder": "zoo_pyg", "kwargs": {"kind": ..., "name": ...}}``)."""
    if kind == "conv":
        return ConvStack(name)
    if kind == "hetero":
        return HeteroStack(name)
    if kind == "model":
        return _model_specs()[name][0]()
    raise ValueError(f"kind must be 'conv', 'hetero' or 'model', got {kind!r}")


timm_fslt.register_builder(PYG_BUILDER, build_pyg, replace=True)

_CONV_ARGS = ("x", "edge_index", "edge_attr", "edge_type", "node_type", "pos", "normal", "batch", "pos_edge_index",
              "neg_edge_index", "mesh_index")


def pyg_case(case_id: str) -> Case:
    kind, name = case_id.split(":", 1)
    if kind == "conv":
        def inputs():
            g = graph()
            return tuple(g[k] for k in _CONV_ARGS)
    elif kind == "hetero":
        inputs = hetero_graph
    else:
        def inputs():
            return tuple(_model_specs()[name][1](graph()))
    return Case(id=case_id, model=name, build=lambda: build_pyg(kind, name), inputs=inputs,
                architecture={"builder": PYG_BUILDER, "kwargs": {"kind": kind, "name": name}})


# Names in torch_geometric.nn.conv / .models that are not a model to run, and why.
PYG_NOT_MODELS = {
    "MessagePassing": "the abstract base class of every conv",
    "to_captum_model": "a function", "to_captum_input": "a function", "captum_output_to_dicts": "a function",
    "InnerProductDecoder": "no parameters (z @ z.T)",
    "LabelPropagation": "no parameters (propagates labels)",
    "CorrectAndSmooth": "no parameters (post-processes predictions)",
    "WLConv": "no parameters; discrete colour refinement (integer outputs, no gradient)",
    "TGNMemory": "a temporal memory driven by update_state(events), not a forward on a graph",
    "RENet": "its forward takes a pre-processed event-history Data object",
    "GPSE": "its forward takes a Batch with precomputed positional-encoding targets (a pre-training model)",
    "GPSENodeEncoder": "an encoder of GPSE's precomputed encodings",
    "LPFormer": "its forward needs a personalised-PageRank matrix of the graph (a link-prediction pipeline)",
    "MetaPath2Vec": "only embedding tables of a heterogeneous graph (like Node2Vec)",
}


def pyg_ids() -> list:
    import torch_geometric.nn.conv as C
    import torch_geometric.nn.models as M

    convs = [c for c in C.__all__ if c not in PYG_NOT_MODELS]
    hetero = _hetero_specs()
    ids = [f"hetero:{c}" if c in hetero else f"conv:{c}" for c in convs]
    ids += [f"model:{m}" for m in M.__all__ if m not in PYG_NOT_MODELS]
    return ids


# -- the report ------------------------------------------------------------------------------------

_KINDS = [  # (regex on the key, kind)
    (r"running_(mean|var)$", "norm running stats"),
    (r"num_batches_tracked$", "num_batches_tracked"),
    (r"(pos_embed|pos_emb|position|rel_pos|relative_position|rpb|attention_biases|bias_table)", "position table"),
    (r"(cls_token|reg_token|dist_token|_token$|token$)", "token"),
    (r"(gamma|\.ls\d?\.|layer_scale|layerscale|\.ls\d?_|scale$)", "layer scale / gain"),
    (r"(weight_ih|weight_hh|in_proj_weight)", "recurrent/attention weight (unmasked)"),
    (r"\.?bias$", "bias"),
    (r"\.?weight$", "weight (unmasked)"),
]


def tensor_kind(key: str) -> str:
    for pattern, kind in _KINDS:
        if re.search(pattern, key):
            return kind
    return key.rsplit(".", 1)[-1]


def collapse(key: str) -> str:
    return re.sub(r"(?<=\.)\d+(?=\.)|^\d+(?=\.)", "*", key)


def summarise_keys(keys: list, limit: int = 6) -> str:
    groups: dict = {}
    for key in keys:
        groups.setdefault(collapse(key), []).append(key)
    shown = [f"{pattern} (x{len(ks)})" if len(ks) > 1 else pattern for pattern, ks in list(groups.items())[:limit]]
    return ", ".join(shown) + (f", ... ({len(groups)} patterns)" if len(groups) > limit else "")


def state_summary(record: dict) -> tuple:
    """(fraction of the ticket's bytes that is fp32 state, kinds of stored floating tensors)."""
    state = record.get("state") or {}
    ticket = sum((record.get("ticket_bytes") or {}).values())
    fp32 = sum(n * _element_bytes(d) for d, n in state.values() if d == "float32")
    kinds: dict = {}
    for key, (dtype, n) in state.items():
        if _is_float(dtype):
            kind = tensor_kind(key)
            entry = kinds.setdefault(kind, [0, 0, set()])
            entry[0] += 1
            entry[1] += n * _element_bytes(dtype)
            entry[2].add(collapse(key))
    text = "; ".join(f"{kind} x{c} ({b:,} B; e.g. {sorted(p)[0]})"
                     for kind, (c, b, p) in sorted(kinds.items(), key=lambda kv: -kv[1][1]))
    return (fp32 / ticket if ticket else None), text


def outcome(record: dict) -> str:
    """PASS, XFAIL (fails at the step its table entry expects), XPASS (an entry to flip) or FAIL."""
    fails = record.get("failures", {})
    first = next((s for s in STEPS if s in fails), None)
    expected = {**TIMM_XFAIL, **PYG_XFAIL}.get(record["case"])
    if expected is None:
        return "FAIL" if first else "PASS"
    if first is None:
        return "XPASS (flip its entry)"
    return "XFAIL" if expected[0].step == first else f"FAIL (expected {expected[0].step})"


def render(records: list, title: str = "", skipped: Optional[dict] = None) -> str:
    """A markdown table of one sweep's records (and the cases it skipped, with why)."""
    lines = [f"## {title}" if title else "", "",
             "| case | model (config) | result | failing steps | first error | s | params | masked layers / no grad | "
             "flipped | ticket B | fp32 state % | stored floating tensors |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    counts: dict = {}
    for r in records:
        fails = r.get("failures", {})
        first = next((s for s in STEPS if s in fails), None)
        search = r.get("search") or {}
        frac, kinds = state_summary(r)
        result = outcome(r)
        counts[result.split()[0]] = counts.get(result.split()[0], 0) + 1
        config = json.dumps(r["config"], separators=(",", ":")) if r.get("config") else ""
        lines.append("| {} | {} | {} | {} | {} | {:.1f} | {:,} | {} | {} | {} | {} | {} |".format(
            r["case"], (r["model"] + (f" `{config}`" if config else "")).replace("|", "\\|"), result,
            ", ".join(s for s in STEPS if s in fails) or "-",
            (fails[first].replace("|", "\\|").replace("\n", " ")[:200] if first else "-"),
            r.get("seconds", 0), r.get("params", 0),
            f"{search.get('layers', '?')} / {len(search.get('dead_layers', []))}" if search else "-",
            search.get("flipped", "-"), f"{sum(r['ticket_bytes'].values()):,}" if r.get("ticket_bytes") else "-",
            f"{100 * frac:.1f}" if frac is not None else "-", kinds.replace("|", "\\|") or "-"))
    for case_id, why in (skipped or {}).items():
        lines.append(f"| {case_id} | - | SKIP | - | {why} | - | - | - | - | - | - | - |")
    total = sum(r.get("seconds", 0) for r in records)
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    lines.insert(1, f"{len(records)} cases run ({summary}), {len(skipped or {})} skipped; {total:.0f} s in the "
                    "cycles (sum of the cases' own times).")
    return "\n".join(lines) + "\n"


def state_ranking(records: list, n: int = 15) -> str:
    """The cases whose tickets are most fp32 state, and the dead-gradient layers: what to look at first."""
    rows = sorted(((state_summary(r)[0] or 0.0, r) for r in records), key=lambda fr: -fr[0])[:n]
    lines = ["| case | fp32 state % of ticket | ticket B | stored floating tensors |", "|---|---|---|---|"]
    lines += [f"| {r['case']} | {100 * f:.1f} | {sum((r.get('ticket_bytes') or {}).values()):,} | "
              f"{state_summary(r)[1] or '-'} |" for f, r in rows if f > 0]
    dead = [(r["case"], len(r["search"]["dead_layers"]), r["search"]["layers"]) for r in records
            if (r.get("search") or {}).get("dead_layers")]
    lines += ["", "Masked sites with no score gradient after the step: " +
              (", ".join(f"{c} {d}/{t}" for c, d, t in dead) or "none")]
    return "\n".join(lines) + "\n"


def read_records(paths) -> list:
    records = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            records += [json.loads(line) for line in f if line.strip()]
    return records


def write_record(record: dict) -> None:
    path = os.environ.get("FSLT_ZOO_RECORD")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({k: v for k, v in record.items() if not k.startswith("_")}, default=str) + "\n")


def check_case(case: Case, tmp_path: Path, freeze_kwargs: Optional[dict] = None) -> dict:
    """The tests' body: run the cycle, append the record (``FSLT_ZOO_RECORD``), re-raise a failure."""
    record: dict = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_cycle(case, tmp_path, record, freeze_kwargs)
    finally:
        torch.set_num_threads(threads)
        write_record(record)


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "report":
        print(render(read_records(sys.argv[2:])))
    elif len(sys.argv) == 4 and sys.argv[1] == "status":  # status <timm.jsonl> <pyg.jsonl>
        print(render(read_records([sys.argv[2]]), "timm: the smallest model of every family",
                     {m: TIMM_SLOW[m] + " (not in this run)" for m in TIMM_SLOW
                      if m not in {r["case"] for r in read_records([sys.argv[2]])}}))
        print(render(read_records([sys.argv[3]]), "PyG: models and two-layer conv stacks",
                     {c: f"needs {p}: {w}" for c, (p, w) in PYG_SKIP.items() if not _installed(p)}))
        print("## Largest fp32-state shares and dead-gradient sites\n")
        print(state_ranking(read_records(sys.argv[2:4])))
    elif sys.argv[1:] == ["smallest"]:
        for module, (name, n) in smallest_per_module().items():
            print(f"{module:28} {name:40} {n:>13,}")
    else:
        sys.exit("usage: python tests/zoo_cases.py report <record.jsonl>... | status <timm.jsonl> <pyg.jsonl> | smallest")
