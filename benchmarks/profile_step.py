"""Where does a search step's extra time go?  A breakdown against the dense step.

    python benchmarks/profile_step.py                       # timm resnet18, 32 px, batch 128, 2 threads
    python benchmarks/profile_step.py --quick               # fewer rounds, batch 32
    python benchmarks/profile_step.py --model resnet18_cifar --json out.json

Two measurements, in one process:

* **phases of the whole step**, interleaved with the dense weight-training step (rounds
  alternate the order): the mask refresh that the next forward runs (selection and mask
  write), the forward, the backward and the optimizer step, each timed with
  ``perf_counter`` around it.  The dense step has the same phases without the refresh.
* **sub-steps in isolation**, on the frozen model's own tensors, repeated and interleaved:
  the whole refresh (``refresh_total``: the CPU's compiled passes, ``nn/cpu_refresh.py``), the
  generic torch refresh (``refresh_generic``) and its pieces (``|s|`` into one buffer, the
  finiteness check, the selection, the mask writes), the ``W * mask`` products of every layer
  (which the compiled refresh keeps current instead, where a mask bit changes), and the backward's gather at
  the free positions (``grad[free] * W[free] * sign(s)``), plus the dense optimizer step
  against the frozen one (momentum SGD over all weights vs over the free scores only).

A ``torch.profiler`` table of the frozen step's top operators is printed too (``--profile``,
on by default).  Frozen = ``timm_fslt.freeze(prune=0.35, lock=0.35, scope="global")``;
optimizer ``SGD(lr=0.01, momentum=0.9, weight_decay=1e-4)``, cross-entropy on a fixed batch,
as in ``step_time.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_time  # noqa: E402  (machine(), loadavg())

MODELS = {  # name -> (timm name, kwargs, input size)
    "resnet18": ("resnet18", {"num_classes": 10}, 32),
    "resnet18_cifar": ("resnet18_cifar", {}, 32),
    "conv6": ("conv6", {}, 32),
    "resnet50": ("resnet50", {"num_classes": 1000}, 224),
}


def build(model_name: str, frozen: bool, prune: float, lock: float):
    import timm
    import timm_fslt

    timm_name, kwargs, _ = MODELS[model_name]
    torch.manual_seed(0)
    model = timm.create_model(timm_name, **kwargs)
    if frozen:
        timm_fslt.freeze(model, prune=prune, lock=lock, scope="global")
    params = [p for p in model.parameters() if p.requires_grad]
    return model.train(), torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)


def make_batch(model_name: str, size: int):
    _, kwargs, res = MODELS[model_name]
    g = torch.Generator().manual_seed(1)
    return (torch.randn(size, 3, res, res, generator=g),
            torch.randint(0, kwargs.get("num_classes", 10), (size,), generator=g))


def phased_step(model, opt, x, y) -> dict:
    """One training step, each phase timed; the refresh runs explicitly first (a no-op for dense)."""
    import timm_fslt

    t0 = time.perf_counter()
    if timm_fslt.is_frozen(model):
        timm_fslt.get_group(model).refresh()
    t1 = time.perf_counter()
    loss = F.cross_entropy(model(x), y)
    t2 = time.perf_counter()
    opt.zero_grad()
    loss.backward()
    t3 = time.perf_counter()
    opt.step()
    t4 = time.perf_counter()
    return {"refresh": t1 - t0, "forward": t2 - t1, "backward": t3 - t2, "optimizer": t4 - t3, "step": t4 - t0}


def time_phases(runs: dict, x, y, repeats: int) -> dict:
    times = {c: [] for c in runs}
    names = list(runs)
    for r in range(repeats):
        for c in (names if r % 2 == 0 else names[::-1]):
            model, opt = runs[c]
            times[c].append(phased_step(model, opt, x, y))
    med = {c: {k: statistics.median(t[k] for t in v) for k in v[0]} for c, v in times.items()}
    paired = statistics.median(f["step"] / d["step"] for f, d in zip(times["frozen"], times["dense"]))
    return {"median_s": med, "median_paired_step_ratio": paired, "rounds": times,
            "min_step_s": {c: min(t["step"] for t in v) for c, v in times.items()}}


def sub_steps(model, opt_frozen, dense_opt, x, y, repeats: int) -> dict:
    """The refresh's pieces, the products, the backward gather and both optimizer steps, in isolation."""
    import timm_fslt
    from timm_fslt.nn.functional import _free_values, _mul_sign_, masked_product
    from timm_fslt.regen.topk import keys_topk_mask, magnitude_keys

    group = timm_fslt.get_group(model)
    layers = group.layers
    # one real step, so that every layer has its incoming weight gradient (captured by a hook)
    grads = {}
    def capture(key):
        def hook(module, inputs, out):
            out.register_hook(lambda g: grads.__setitem__(key, g.detach().clone()))
        return hook

    hooks = [layer.register_forward_hook(capture(i)) for i, layer in enumerate(layers)]
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    for h in hooks:
        h.remove()
    frees = [layer.free_index() for layer in layers]
    sizes = [f.n_free for f in frees]
    flat = torch.empty(sum(sizes), dtype=torch.float32)
    locked = sum(f.n_locked + layer.removed_kept for layer, f in zip(layers, frees))
    k = min(max(group.kept_target() - locked, 0), flat.numel())
    state = {}

    def magnitudes():
        for layer, free, part in zip(layers, frees, flat.split(sizes)):
            layer._write_magnitudes(part, free)

    def finite_check():
        return int(flat.view(torch.int32).max()) >= 0x7F800000

    def keys_and_select():
        state["keys"] = magnitude_keys(flat)
        state["sel"] = keys_topk_mask(state["keys"], k)

    def write_masks():
        for layer, free, sel in zip(layers, frees, state["sel"].split(sizes)):
            layer._write_mask(sel, free)

    weights = [_weight_of(model, layer) for layer in layers]

    def products_only():
        for w, layer in zip(weights, layers):
            masked_product(w, layer.mask, None)

    def gather():
        for i, (w, layer, free) in enumerate(zip(weights, layers, frees)):
            g = grads[i]
            if free.index is None:
                gs = torch.mul(g, w).reshape(-1)
            else:
                gs = _free_values(g, free.index).mul_(_free_values(w, free.index))
            _mul_sign_(gs, layer.scores.detach().reshape(-1))

    def opt_frozen_step():
        opt_frozen.step()

    def opt_dense_step():
        dense_opt.step()

    def generic_refresh():  # the torch refresh, whose pieces follow (not the CPU's compiled one)
        group.compiled_refresh = False
        try:
            group.refresh(force=True)
        finally:
            group.compiled_refresh = None

    fns = {"refresh_total": lambda: group.refresh(force=True), "refresh_generic": generic_refresh,
           "magnitudes": magnitudes,
           "finite_check": finite_check, "keys_and_select": keys_and_select, "mask_write": write_masks,
           "products": products_only, "backward_gather": gather,
           "optimizer_frozen": opt_frozen_step, "optimizer_dense": opt_dense_step}
    magnitudes()
    keys_and_select()
    times = {n: [] for n in fns}
    names = list(fns)
    for r in range(repeats):
        for n in names[r % len(names):] + names[:r % len(names)]:
            if n == "keys_and_select" or n == "finite_check":
                magnitudes()  # (keys are made in place from |s|)
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    out = {n: statistics.median(v) for n, v in times.items()}
    out["min_s"] = {n: min(v) for n, v in times.items()}  # (the intrinsic cost, on a shared machine)
    out["n_weights"] = sum(layer.numel for layer in layers)
    out["n_free"] = sum(sizes)
    out["n_layers"] = len(layers)
    return out


def _weight_of(model, layer):
    """The random weight buffer W that ``layer`` (a FrozenSupermask) masks."""
    for module in model.modules():
        plist = getattr(module, "parametrizations", None)
        if plist is None:
            continue
        for name in plist:
            if any(p is layer for p in plist[name]):
                return plist[name].original
    raise LookupError(layer.layer_name)


def profile_table(model, opt, x, y, steps: int = 3) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            phased_step(model, opt, x, y)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)


def report(res: dict) -> str:
    m, ph, sub = res["machine"], res["phases"]["median_s"], res["sub_steps"]
    d, f = ph["dense"], ph["frozen"]
    ms = 1e3
    lines = [f"{res['model']} {res['input']} px, batch {res['batch']}, {m['threads']} threads, "
             f"prune {res['prune']} / lock {res['lock']}; {m.get('cpu', '?')}, torch {m['torch']}; "
             f"load average {res['load_start']} at start, {res['load_end']} at end.", "",
             f"Step (median of paired rounds): frozen / dense = {res['phases']['median_paired_step_ratio']:.3f}", "",
             "| phase | dense ms | frozen ms | frozen - dense ms |", "|---|---|---|---|"]
    for k in ("refresh", "forward", "backward", "optimizer", "step"):
        lines.append(f"| {k} | {d[k] * ms:.1f} | {f[k] * ms:.1f} | {(f[k] - d[k]) * ms:+.1f} |")
    lines += ["", f"Sub-steps in isolation ({sub['n_layers']} layers, {sub['n_weights'] / 1e6:.2f}M weights, "
                  f"{sub['n_free'] / 1e6:.2f}M free):", "",
              "| sub-step | median ms | min ms | median, share of the dense step |", "|---|---|---|---|"]
    for k in ("refresh_total", "refresh_generic", "magnitudes", "finite_check", "keys_and_select", "mask_write", "products",
              "backward_gather", "optimizer_frozen", "optimizer_dense"):
        lines.append(f"| {k} | {sub[k] * ms:.2f} | {sub['min_s'][k] * ms:.2f} | {sub[k] / d['step'] * 100:.1f}% |")
    lines += ["", f"Fastest step of the rounds: dense {res['phases']['min_step_s']['dense'] * ms:.1f} ms, "
                  f"frozen {res['phases']['min_step_s']['frozen'] * ms:.1f} ms."]
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet18", choices=list(MODELS))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=12)
    p.add_argument("--prune", type=float, default=0.35)
    p.add_argument("--lock", type=float, default=0.35)
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", default=None)
    p.add_argument("--txt", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.repeats = 32, 4
    torch.set_num_threads(args.threads)
    import timm_fslt  # noqa: F401  (registers conv6 / resnet18_cifar)

    res = {"model": args.model, "input": MODELS[args.model][2], "batch": args.batch, "prune": args.prune,
           "lock": args.lock, "machine": step_time.machine(), "load_start": step_time.loadavg()}
    x, y = make_batch(args.model, args.batch)
    runs = {"dense": build(args.model, False, 0, 0), "frozen": build(args.model, True, args.prune, args.lock)}
    for model, opt in runs.values():
        for _ in range(2):
            phased_step(model, opt, x, y)
    res["phases"] = time_phases(runs, x, y, args.repeats)
    res["sub_steps"] = sub_steps(runs["frozen"][0], runs["frozen"][1], runs["dense"][1], x, y, args.repeats)
    table = None if args.no_profile else profile_table(*runs["frozen"], x, y)
    res["load_end"] = step_time.loadavg()
    text = report(res)
    print(text)
    if table:
        print("\ntorch.profiler, frozen step (3 steps), top operators by self CPU time:\n" + table)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)
    if args.txt:
        with open(args.txt, "w") as fh:
            fh.write(text + ("\n\ntorch.profiler, frozen step (3 steps):\n" + table if table else "") + "\n")
    return res


if __name__ == "__main__":
    main()
