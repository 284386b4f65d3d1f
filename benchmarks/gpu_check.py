"""GPU check: the same bits on CUDA as on the CPU, and what a frozen step costs there.

    .venv/bin/python benchmarks/gpu_check.py [--steps 10]

1. Freezes the benchmark models (Conv6, CIFAR ResNet-18, timm ResNet-50) with every
   weight_init on the CPU and on CUDA and compares the sha256 of every layer's weight,
   frozen code and initial scores (generator version 2 is integer-only up to one
   float64 multiplication, so they must be identical).
2. Times an SGD step of the frozen model against the same dense model (Conv6 and
   CIFAR ResNet-18 at batch 128 in float32 and bfloat16 autocast, ResNet-50 at batch 64).
3. Counts the host synchronisations of one frozen step (and of the dense step) with
   ``torch.cuda.set_sync_debug_mode("warn")``: the sync-free refresh (issue #19) should add none.
4. Trains copies of each frozen model for a few steps with the sync-free refresh (the GPU
   default) and with the synchronous one, in both scopes and with dynamic scales, and compares
   every mask and scale: they must be identical.
5. Trains each search method (multicoated, IteRand, a sparsity schedule) for a few steps on CUDA,
   copies the model to the CPU and re-selects there from the same scores: masks, multicoated
   levels and IteRand's re-drawn weights must be identical.
Prints one summary line (and the mismatching layers, if any); exit status 1 on a
mismatch.  Without a CUDA device it prints "no CUDA device" and exits 0.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import timm_fslt  # noqa: E402

MODELS = {"conv6": ({"timm": "conv6", "kwargs": {}}, (3, 32, 32), 128),
          "resnet18_cifar": ({"timm": "resnet18_cifar", "kwargs": {}}, (3, 32, 32), 128),
          "resnet50": ({"timm": "resnet50", "kwargs": {}}, (3, 224, 224), 64)}
INITS = ("kaiming_uniform", "kaiming_normal", "signed_kaiming_constant")


def _sha(t: torch.Tensor) -> str:
    t = t.detach().to("cpu").contiguous()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.view(torch.int16)
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()[:16]


def build(arch: dict, device) -> torch.nn.Module:
    return timm_fslt.create_model(arch["timm"], **arch["kwargs"]).to(device)


def model_digests(arch: dict, device, weight_init: str, prune: float = 0.35, lock: float = 0.35) -> dict:
    """{"<layer>/weight|frozen|scores": sha256 prefix} of a model frozen on ``device``."""
    model = timm_fslt.freeze(build(arch, device), prune=prune, lock=lock, weight_init=weight_init, seed=0)
    out = {}
    for name, module in timm_fslt.iter_frozen(model):
        supermask = module.parametrizations["weight"][0]
        out[f"{name}/weight"] = _sha(module.parametrizations["weight"].original)
        out[f"{name}/frozen"] = _sha(supermask.frozen)
        out[f"{name}/scores"] = _sha(supermask.scores)
    return out


def compare(reference: dict, other: dict) -> list[str]:
    """The keys whose digests differ (or exist on one side only), sorted."""
    return sorted(k for k in set(reference) | set(other) if reference.get(k) != other.get(k))


def step_time(model, shape, batch, device, autocast: bool, steps: int) -> float:
    """Seconds per SGD step (forward, backward, step), after warm-up."""
    x = torch.randn(batch, *shape, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)

    def one():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for _ in range(3):
        one()
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        one()
    torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / steps


def _sgd_step(model, x, y, opt) -> None:
    F.cross_entropy(model(x).float(), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def syncs_per_step(model, shape, batch, device) -> int:
    """Host synchronisations torch reports during one SGD step (after two warm-up steps)."""
    x = torch.randn(batch, *shape, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    for _ in range(2):
        _sgd_step(model, x, y, opt)
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _sgd_step(model, x, y, opt)
            model(x)  # (the refresh of this step's scores runs in the next forward)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def sync_free_mismatches(arch: dict, shape, device, steps: int = 3) -> list[str]:
    """Layers whose masks or scales differ between the sync-free and the synchronous refresh."""
    out = []
    for scope in ("global", "layerwise"):
        base = timm_fslt.freeze(build(arch, device), prune=0.35, lock=0.35, scope=scope, scale="dynamic")
        twins = {flag: copy.deepcopy(base) for flag in (True, False)}
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(8, *shape, device=device, generator=g)
        y = torch.randint(0, 10, (8,), device=device, generator=g)
        for flag, model in twins.items():
            timm_fslt.get_group(model).sync_free = flag
            opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0, momentum=0.9)
            for _ in range(steps):
                _sgd_step(model, x, y, opt)
            model(x)
        for a, b in zip(*(timm_fslt.get_group(twins[flag]).layers for flag in (True, False))):
            if not (torch.equal(a.mask, b.mask) and torch.equal(a.scale, b.scale)):
                out.append(f"{arch['timm']}/{scope}/{a.layer_name}")
    return out


METHOD_CASES = {"multicoated": dict(method="multicoated", scale="dynamic"),
                "iterand": dict(method="iterand", rerand_period=1, rerand_rate=0.5),
                "schedule": dict(sparsity_schedule=("linear", 0.4, 0.5), schedule_steps=4)}


def method_mismatches(arch: dict, shape, device, steps: int = 3) -> list[str]:
    """Layers whose mask, levels or re-drawn weights chosen on ``device`` differ from the CPU's choice
    from the same scores and rounds."""
    out = []
    for case, kwargs in METHOD_CASES.items():
        model = timm_fslt.freeze(build(arch, device), prune=0.35, lock=0.35, **kwargs)
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(8, *shape, device=device, generator=g)
        y = torch.randint(0, 10, (8,), device=device, generator=g)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0, momentum=0.9)
        for _ in range(steps):
            _sgd_step(model, x, y, opt)
        model(x)
        on_cpu = copy.deepcopy(model).to("cpu")
        timm_fslt.get_group(on_cpu).refresh(force=True)
        group, cpu_group = timm_fslt.get_group(model), timm_fslt.get_group(on_cpu)
        if len(_frozen_modules(model, on_cpu)) != len(group.layers):
            out.append(f"{arch['timm']}/{case}: not every masked tensor found")
        for layer, twin, (name, module) in zip(group.layers, cpu_group.layers, _frozen_modules(model, on_cpu)):
            same = torch.equal(layer.mask.cpu(), twin.mask)
            if group.method.coats is not None:
                same &= torch.equal(layer.level.cpu(), twin.level)
            if group.method.rerand is not None:
                w, w_cpu = (m.parametrizations[layer.param_name].original for m in module)
                same &= torch.equal(group.method.rerand.weight(layer, w, layer.free_index().index).cpu(),
                                    cpu_group.method.rerand.weight(twin, w_cpu, twin.free_index().index))
            if not same:
                out.append(f"{arch['timm']}/{case}/{layer.layer_name}")
    return out


def _frozen_modules(model, twin):
    """(name, (module, its twin)) of every module with a masked tensor, in the group's order."""
    twins = dict(twin.named_modules())
    layers = {id(layer): i for i, layer in enumerate(timm_fslt.get_group(model).layers)}
    found = []
    for name, module in model.named_modules():
        for plist in getattr(module, "parametrizations", {}).values():
            if id(plist[0]) in layers:
                found.append((layers[id(plist[0])], (name, (module, twins[name]))))
    return [pair for _, pair in sorted(found, key=lambda t: t[0])]


def format_summary(n_compared: int, mismatches: list[str], timings: dict, syncs: dict = None) -> str:
    """One line: digest verdict, then frozen/dense step time per model and precision."""
    verdict = (f"all {n_compared} CUDA digests equal the CPU's" if not mismatches else
               f"{len(mismatches)} of {n_compared} CUDA digests DIFFER from the CPU's (first: {mismatches[0]})")
    steps = "; ".join(f"{k} frozen {f * 1e3:.1f} ms / dense {d * 1e3:.1f} ms ({f / d:.2f}x)"
                      for k, (f, d) in timings.items())
    counted = "; ".join(f"{k} frozen {f} / dense {d}" for k, (f, d) in (syncs or {}).items())
    return (f"gpu_check: {verdict}" + (f"; step time {steps}" if steps else "")
            + (f"; host syncs per step {counted}" if counted else ""))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False); nothing checked")
        return 0
    cuda = torch.device("cuda")
    mismatches, n_compared, timings, syncs = [], 0, {}, {}
    for name in args.models:
        arch, shape, batch = MODELS[name]
        for init in INITS:
            cpu, gpu = model_digests(arch, "cpu", init), model_digests(arch, cuda, init)
            n_compared += len(cpu)
            mismatches += [f"{name}/{init}/{k}" for k in compare(cpu, gpu)]
        for autocast in ((False, True) if name != "resnet50" else (False,)):
            dense = build(arch, cuda)
            frozen = timm_fslt.freeze(copy.deepcopy(dense), prune=0.35, lock=0.35)
            key = f"{name} b{batch} {'bf16' if autocast else 'fp32'}"
            timings[key] = (step_time(frozen, shape, batch, cuda, autocast, args.steps),
                            step_time(dense, shape, batch, cuda, autocast, args.steps))
            if not autocast:
                syncs[name] = (syncs_per_step(frozen, shape, batch, cuda), syncs_per_step(dense, shape, batch, cuda))
            del dense, frozen
            torch.cuda.empty_cache()
        sync_free = sync_free_mismatches(arch, shape, cuda)
        n_compared += 1
        mismatches += [f"sync-free refresh differs: {key}" for key in sync_free]
        methods = method_mismatches(arch, shape, cuda)
        n_compared += 1
        mismatches += [f"method selection differs from the CPU's: {key}" for key in methods]
    for key in mismatches[:20]:
        print(f"  differs: {key}")
    print(format_summary(n_compared, mismatches, timings, syncs))
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
