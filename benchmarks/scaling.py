"""How the cost of a search grows with the model: a stack of nn.Linear layers, 1M to 300M weights.

    python benchmarks/scaling.py             # 6 sizes, 1M .. 300M weights (15-20 min on 2 shared cores)
    python benchmarks/scaling.py --quick     # 1M, 4M, 16M: a smoke run of a minute or two
    python benchmarks/scaling.py --sizes 1e6,1e7 --repeats 4 --json /tmp/s.json --plot /tmp/s.png

The model at a size N is ``LAYERS`` square bias-free ``nn.Linear(d, d)`` with ReLUs between them
(``d = sqrt(N / LAYERS)``) and a ``Linear(d, 10)`` head, on a fixed random batch (32 rows by
default) with cross-entropy, ``SGD(lr=0.01, momentum=0.9, weight_decay=1e-4)`` as in
``step_time.py``.  Frozen = ``timm_fslt.freeze(prune=0.35, lock=0.35, scope="global")``.
For each size, in fresh subprocesses (so one point's memory cannot leak into the next):

* **step overhead** -- a dense weight-training step and a search step, interleaved in one
  process (rotating order); the median of the per-round ratios search / dense.
* **selection** -- ``SupermaskGroup.refresh(force=True)``: the global threshold and the mask writes
  (on the CPU the compiled refresh, ``nn/cpu_refresh.py``), median of several.
* **regeneration** -- ``timm_fslt.freeze`` of the built stack (random weights, scores and
  frozen codes from the seed).
* **peak memory per weight** -- one process per configuration: the resident-set high-water
  mark of building the model and a few steps, minus the RSS after the imports, over N.

Writes the raw numbers (``--json``, default ``benchmarks/results/scaling.json``) and draws the four
curves against N (``--plot``, default ``benchmarks/scaling.png``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
LAYERS = 4
DEFAULT_SIZES = (1e6, 3.2e6, 1e7, 3.2e7, 1e8, 3e8)
QUICK_SIZES = (1e6, 4e6, 1.6e7)


def width(n: float) -> int:
    return max(8, int(round(math.sqrt(n / LAYERS))))


def build(n: float, frozen: bool, prune: float, lock: float):
    """(model, optimizer, regeneration seconds or None)."""
    import timm_fslt

    d = width(n)
    torch.manual_seed(0)
    parts = []
    for _ in range(LAYERS):
        parts += [nn.Linear(d, d, bias=False), nn.ReLU()]
    model = nn.Sequential(*parts, nn.Linear(d, 10, bias=False))
    regen = None
    if frozen:
        t0 = time.perf_counter()
        timm_fslt.freeze(model, prune=prune, lock=lock, scope="global")
        regen = time.perf_counter() - t0
    params = [p for p in model.parameters() if p.requires_grad]
    return model.train(), torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4), regen


def make_batch(n: float, size: int):
    g = torch.Generator().manual_seed(1)
    return torch.randn(size, width(n), generator=g), torch.randint(0, 10, (size,), generator=g)


def step(model, opt, x, y) -> None:
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def child_time(n: float, args) -> dict:
    """Interleaved steps, the selection and the regeneration, for one size (run in a subprocess)."""
    import timm_fslt

    build(1e4, True, args.prune, args.lock)  # first-call costs out of the regeneration time
    x, y = make_batch(n, args.batch)
    runs = {"dense": build(n, False, 0, 0)[:2]}
    model, opt, regen = build(n, True, args.prune, args.lock)
    runs["frozen"] = (model, opt)
    for m, o in runs.values():
        step(m, o, x, y)  # warm-up
    times = {c: [] for c in runs}
    names = list(runs)
    repeats = args.repeats if n < 5e7 else max(3, args.repeats // 2)  # (the big points take seconds a step)
    for r in range(repeats):
        for c in (names if r % 2 == 0 else names[::-1]):
            m, o = runs[c]
            t0 = time.perf_counter()
            step(m, o, x, y)
            times[c].append(time.perf_counter() - t0)
    group = timm_fslt.get_group(model)
    sel = []
    for _ in range(max(3, repeats // 2)):
        t0 = time.perf_counter()
        group.refresh(force=True)
        sel.append(time.perf_counter() - t0)
    n_weights = sum(layer.numel for layer in group.layers)
    return {"n_weights": n_weights, "n_free": sum(layer.scores.numel() for layer in group.layers),
            "width": width(n), "dense_step_s": statistics.median(times["dense"]),
            "frozen_step_s": statistics.median(times["frozen"]),
            "overhead_paired": statistics.median(f / d for f, d in zip(times["frozen"], times["dense"])),
            "selection_s": statistics.median(sel), "regeneration_s": regen, "times_s": times}


def child_memory(n: float, frozen: bool, args) -> dict:
    import timm_fslt  # noqa: F401  (the import footprint is the baseline)

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _status_kib("VmRSS") * 1024
    model, opt, _ = build(n, frozen, args.prune, args.lock)
    x, y = make_batch(n, args.batch)
    for _ in range(args.memory_steps):
        step(model, opt, x, y)
    return {"peak_rss": _status_kib("VmHWM") * 1024, "base_rss": base}


def run_child(kind: str, n: float, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, repr(n), "--batch", str(args.batch),
           "--repeats", str(args.repeats), "--threads", str(args.threads), "--prune", str(args.prune),
           "--lock", str(args.lock), "--memory-steps", str(args.memory_steps)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{kind} at {n:g} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = results["points"]
    n = [p["n_weights"] for p in pts]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))
    ax = axes[0][0]
    ax.plot(n, [p["overhead_paired"] for p in pts], "o-")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set(title="search step / dense step (paired median)", ylabel="ratio")
    ax = axes[0][1]
    ax.plot(n, [p["selection_s"] * 1e9 / p["n_free"] for p in pts], "o-", label="selection + mask write")
    ax.plot(n, [p["regeneration_s"] * 1e9 / p["n_weights"] for p in pts], "s-", label="regeneration (freeze)")
    ax.set(title="time per weight (selection: per free weight)", ylabel="ns")
    ax.legend()
    ax = axes[1][0]
    ax.plot(n, [p["memory"]["dense"]["per_weight"] for p in pts], "o-", label="dense weight training")
    ax.plot(n, [p["memory"]["frozen"]["per_weight"] for p in pts], "s-", label="search 0.35/0.35")
    ax.set(title="peak memory per weight (RSS footprint)", ylabel="bytes / weight")
    ax.legend()
    ax = axes[1][1]
    ax.plot(n, [p["dense_step_s"] for p in pts], "o-", label="dense step")
    ax.plot(n, [p["frozen_step_s"] for p in pts], "s-", label="search step")
    ax.plot(n, [p["selection_s"] for p in pts], "^-", label="selection")
    ax.plot(n, [p["regeneration_s"] for p in pts], "v-", label="regeneration")
    ax.set(title="absolute seconds", ylabel="s", yscale="log")
    ax.legend()
    for row in axes:
        for a in row:
            a.set_xscale("log")
            a.set_xlabel("weights N")
            a.grid(True, which="both", alpha=0.3)
    m = results["machine"]
    fig.suptitle(f"stack of {LAYERS} nn.Linear + head, batch {results['batch']}, {results['threads']} threads; "
                 f"{m.get('cpu', '?')}; load {results['load_start']} .. {results['load_end']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(results: dict) -> str:
    lines = [f"Stack of {LAYERS} nn.Linear + head, batch {results['batch']}, {results['threads']} threads, "
             f"prune {results['prune']} / lock {results['lock']}; {results['machine'].get('cpu', '?')}, "
             f"torch {results['machine']['torch']}; load average {results['load_start']} at start, "
             f"{results['load_end']} at end.", "",
             "| weights | dense step s | search step s | search/dense paired | selection ms | ns per free weight "
             "| regeneration s | ns per weight | peak B/weight dense | search |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for p in results["points"]:
        lines.append(f"| {p['n_weights'] / 1e6:.1f}M | {p['dense_step_s']:.4f} | {p['frozen_step_s']:.4f} | "
                     f"{p['overhead_paired']:.3f} | {p['selection_s'] * 1e3:.1f} | "
                     f"{p['selection_s'] * 1e9 / p['n_free']:.2f} | {p['regeneration_s']:.2f} | "
                     f"{p['regeneration_s'] * 1e9 / p['n_weights']:.1f} | "
                     f"{p['memory']['dense']['per_weight']:.1f} | {p['memory']['frozen']['per_weight']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default=None, help="comma-separated weight counts, e.g. 1e6,1e7,1e8")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prune", type=float, default=0.35)
    p.add_argument("--lock", type=float, default=0.35)
    p.add_argument("--memory-steps", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="1M, 4M, 16M weights, 4 repeats")
    p.add_argument("--json", default=os.path.join(HERE, "results", "scaling.json"))
    p.add_argument("--plot", default=os.path.join(HERE, "scaling.png"))
    p.add_argument("--child", nargs=2, metavar=("KIND", "N"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        kind, n = args.child[0], float(args.child[1])
        out = child_time(n, args) if kind == "time" else child_memory(n, kind == "frozen", args)
        print(json.dumps(out))
        return out
    sys.path.insert(0, HERE)
    import step_time  # machine(), loadavg()

    if args.quick:
        args.repeats = 4
    sizes = [float(s) for s in args.sizes.split(",")] if args.sizes else list(QUICK_SIZES if args.quick
                                                                               else DEFAULT_SIZES)
    results = {"machine": step_time.machine(), "load_start": step_time.loadavg(), "batch": args.batch,
               "threads": args.threads, "prune": args.prune, "lock": args.lock, "layers": LAYERS, "points": []}
    for n in sizes:
        print(f"[scaling] {n:.3g} weights ...", file=sys.stderr, flush=True)
        point = run_child("time", n, args)
        point["load"] = step_time.loadavg()
        point["memory"] = {}
        for kind in ("dense", "frozen"):
            mem = run_child(kind, n, args)
            mem["footprint"] = mem["peak_rss"] - mem["base_rss"]
            mem["per_weight"] = mem["footprint"] / point["n_weights"]
            point["memory"][kind] = mem
        results["points"].append(point)
    results["load_end"] = step_time.loadavg()
    text = report(results)
    print(text)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        with open(os.path.splitext(args.json)[0] + ".txt", "w") as f:
            f.write(text + "\n")
    if args.plot:
        plot(results, args.plot)
    return results


if __name__ == "__main__":
    main()
