"""Is an Edge-Popup search step as cheap as ordinary training?  Measured, not assumed.

    python benchmarks/step_time.py                 # the full run (takes a while on 2 cores)
    python benchmarks/step_time.py --quick         # a smoke run in about a minute
    python benchmarks/step_time.py --models conv6 --repeats 5 --skip memory,freeze

What it measures, all in this one process unless said otherwise:

* step time -- interleaved, for each model: (a) a plain dense weight-training step
  of the model as timm builds it, (b) the timm_fslt frozen-supermask step
  (prune 0.35, lock 0.35, global scope) and (c) the dense-source ticket step
  (prune 0, lock 0).  A step is forward, cross-entropy, zero_grad, backward and
  ``SGD(momentum=0.9, weight_decay=1e-4).step()`` on one fixed random batch; for
  (b) and (c) it includes the mask refresh that the next forward runs.  Rounds
  visit the three configurations in rotating order, so load from other processes
  hits all of them alike.  Reported: medians, the ratios of the medians, and the
  median of the per-round ratios (robust to load bursts on a shared machine).
* peak memory -- one fresh subprocess per (model, configuration) runs a few steps
  and reports its peak resident set size (Linux VmHWM, reset after the imports:
  every page the process touched, torch's CPU tensors and the allocator's cached
  pages included) and the same peak minus the RSS after ``import torch, timm,
  timm_fslt`` (the training footprint that the comparison is about).
* threshold selection -- choosing the global threshold (the k-th largest |score|,
  k = half) among 25M scores with ``timm_fslt.regen.topk``, against a full
  ``torch.sort`` of them and against ``torch.kthvalue``.
* regeneration -- ``timm_fslt.freeze`` of a fresh timm ResNet-50 (and the CIFAR
  ResNet-18): random weights, scores and frozen codes from the seed.

Prints Markdown tables (and ``--json PATH`` writes the numbers).  ``--device cuda[:N]``
runs the same measurements on a GPU (with synchronisation around every timing).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

CONFIGS = {"dense": None, "frozen": (0.35, 0.35), "dense_source": (0.0, 0.0)}
LABELS = {"dense": "(a) dense weight training", "frozen": "(b) frozen 0.35/0.35",
          "dense_source": "(c) dense source 0/0"}
MODELS = {  # name -> (timm name, kwargs, input size, default batch)
    "conv6": ("conv6", {}, 32, 128),
    "resnet18_cifar": ("resnet18_cifar", {}, 32, 128),
    "resnet50": ("resnet50", {"num_classes": 1000}, 224, 8),
    "resnet18": ("resnet18", {"num_classes": 10}, 32, 128),  # timm's ImageNet stem on 32 px (issue #17)
}
SECTIONS = ("steps", "memory", "threshold", "freeze")


# -- building blocks ---------------------------------------------------------------
def build(model_name: str, config: str, channels_last: bool = False, device: str = "cpu"):
    """(model, optimizer) for one configuration; the frozen ones only train scores."""
    import timm
    import timm_fslt

    timm_name, kwargs, _, _ = MODELS[model_name]
    torch.manual_seed(0)
    model = timm.create_model(timm_name, **kwargs).to(device)  # frozen weights are made there
    if CONFIGS[config] is not None:
        prune, lock = CONFIGS[config]
        timm_fslt.freeze(model, prune=prune, lock=lock, scope="global")
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)
    return model.train(), opt


def batch(model_name: str, size: int, channels_last: bool = False, device: str = "cpu"):
    _, kwargs, res, _ = MODELS[model_name]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(size, 3, res, res, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, kwargs.get("num_classes", 10), (size,), generator=g)
    return x.to(device), y.to(device)


def parse_device(text: str) -> str:
    """--device: ``cpu``, ``cuda`` (taken as ``cuda:0``) or ``cuda:N``; anything else is refused."""
    match = re.fullmatch(r"cpu|cuda(?::(\d+))?", text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N (N a device index), got {text!r}")
    return "cpu" if text.strip() == "cpu" else f"cuda:{int(match.group(1) or 0)}"


def init_device(device: str) -> None:
    """Make ``device`` the current CUDA device and initialise CUDA on it (the caching allocator,
    before any memory-statistics call: ``reset_peak_memory_stats`` on an uninitialised device fails)."""
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
        torch.cuda.init()
        torch.empty(1, device=device)  # the allocator of this device is set up
        torch.cuda.synchronize(device)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def step(model, opt, x, y, autocast: bool = False, recompute: bool = False) -> None:
    import contextlib
    import timm_fslt

    frozen = timm_fslt.is_frozen(model)
    keep = timm_fslt.recompute_masked_weights(model) if recompute and frozen else contextlib.nullcontext()
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast), keep:
        loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def machine(device: str = "cpu") -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    if torch.cuda.is_available():  # the measured device's name (on a CPU run, the current one's)
        info["gpu"] = torch.cuda.get_device_name(device if device.startswith("cuda") else None)
    try:
        import timm
        info["timm"] = timm.__version__
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        info["cpu"] = fields.get("Model name", "?").strip()
        info["cores"] = fields.get("CPU(s)", "?").strip()
    except (OSError, ValueError):
        pass
    return info


def loadavg() -> str:
    try:
        return " ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "?"


# -- sections ----------------------------------------------------------------------
def time_steps(model_name: str, size: int, repeats: int, warmup: int, args) -> dict:
    x, y = batch(model_name, size, args.channels_last, args.device)
    runs = {c: build(model_name, c, args.channels_last, args.device) for c in CONFIGS}
    for c, (model, opt) in runs.items():
        for _ in range(warmup):
            step(model, opt, x, y, args.autocast, args.recompute)
    times = {c: [] for c in CONFIGS}
    names = list(CONFIGS)
    for r in range(repeats):
        for c in names[r % 3:] + names[:r % 3]:  # rotate the order every round
            model, opt = runs[c]
            sync(args.device)
            t0 = time.perf_counter()
            step(model, opt, x, y, args.autocast, args.recompute)
            sync(args.device)
            times[c].append(time.perf_counter() - t0)
    med = {c: statistics.median(v) for c, v in times.items()}
    paired = {c: statistics.median(b / a for b, a in zip(times[c], times["dense"]))
              for c in ("frozen", "dense_source")}
    return {"batch": size, "repeats": repeats, "median_s": med, "times_s": times,
            "ratio_of_medians": {c: med[c] / med["dense"] for c in ("frozen", "dense_source")},
            "median_paired_ratio": paired}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _preload_kernels() -> None:
    """Start numba and load every compiled kernel a search uses (a tiny frozen net, freezing, a step
    and a refresh), so that a memory window opened afterwards holds tensors, not that fixed cost."""
    import gc

    import timm_fslt

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 36, 4))
    net = timm_fslt.freeze(net, prune=0.35, lock=0.35)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 1])
    for _ in range(2):
        step(net, opt, x, y)
    timm_fslt.get_group(net).refresh()
    del net, opt
    gc.collect()


def memory_child(model_name: str, config: str, size: int, steps: int, autocast: bool,
                 device: str, recompute: bool = False, preload: bool = False) -> None:
    """Runs in a fresh process: prints the peak memory of a few training steps (JSON).

    CPU: the resident-set high-water mark (VmHWM), reset after the imports
    (``/proc/self/clear_refs``) so the import-time peak cannot hide the training
    peak; building (and, for frozen models, regenerating) the model is inside the
    window.  CUDA: ``torch.cuda.max_memory_allocated`` (tensors only).
    """
    import timm  # noqa: F401  (the import footprint is the baseline)
    import timm_fslt  # noqa: F401

    if preload:
        _preload_kernels()
    cuda = device.startswith("cuda")
    if cuda:
        init_device(device)  # before the statistics calls, which fail on an uninitialised device
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
        base = _status_kib("VmRSS") * 1024
    model, opt = build(model_name, config, device=device)
    x, y = batch(model_name, size, device=device)
    for _ in range(steps):
        step(model, opt, x, y, autocast, recompute)
    peak = torch.cuda.max_memory_allocated(device) if cuda else _status_kib("VmHWM") * 1024
    print(json.dumps({"peak_rss": peak, "base_rss": base}))


def measure_memory(model_name: str, size: int, steps: int, args) -> dict:
    out = {}
    for config in CONFIGS:
        cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", model_name, config,
               str(size), str(steps), "--device", args.device] + (["--autocast"] if args.autocast else []) \
            + (["--recompute"] if args.recompute else []) + (["--preload-kernels"] if args.preload_kernels else [])
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        env = dict(os.environ)
        if args.malloc_mmap_threshold:
            # glibc then serves every block above this size with its own mapping and
            # returns it to the OS when freed, so RSS follows the live tensors.
            env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if res.returncode != 0:
            raise RuntimeError(f"memory run {model_name}/{config} failed:\n{res.stderr[-2000:]}")
        data = json.loads(res.stdout.strip().splitlines()[-1])
        data["footprint"] = data["peak_rss"] - data["base_rss"]
        out[config] = data
    for c in ("frozen", "dense_source"):
        out[c]["footprint_ratio"] = out[c]["footprint"] / out["dense"]["footprint"]
        out[c]["peak_ratio"] = out[c]["peak_rss"] / out["dense"]["peak_rss"]
    return out


def time_threshold(n: int, repeats: int, device: str = "cpu") -> dict:
    from timm_fslt.regen import topk as threshold

    g = torch.Generator().manual_seed(0)
    values = torch.randn(n, generator=g).abs_().to(device)
    keys = threshold.magnitude_keys(values.clone())
    k = n // 2
    kth, _, _ = threshold.kth_largest(keys, k)
    assert kth == int(torch.kthvalue(keys, n - k + 1).values)  # exact, not approximate
    methods = {"threshold_s": lambda: threshold.kth_largest(keys, k),
               "threshold_and_mask_s": lambda: threshold.keys_topk_mask(keys, k),
               "torch_kthvalue_s": lambda: torch.kthvalue(values, n - k + 1),
               "torch_sort_s": lambda: torch.sort(values, descending=True)}
    times = {name: [] for name in methods}
    names = list(methods)
    for r in range(repeats):  # interleaved, rotating order, like the steps
        for name in names[r % len(names):] + names[:r % len(names)]:
            sync(device)
            t0 = time.perf_counter()
            methods[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    res = {"n": n, "k": k, **{name: statistics.median(v) for name, v in times.items()}}
    res["sort_over_threshold"] = res["torch_sort_s"] / res["threshold_s"]
    return res


def time_freeze(model_name: str, repeats: int, device: str = "cpu") -> dict:
    import timm
    import timm_fslt

    timm_name, kwargs, _, _ = MODELS[model_name]
    ts = []
    for _ in range(repeats):
        model = timm.create_model(timm_name, **kwargs).to(device)
        sync(device)
        t0 = time.perf_counter()
        timm_fslt.freeze(model, prune=0.35, lock=0.35)
        sync(device)
        ts.append(time.perf_counter() - t0)
    n = sum(layer.numel for layer in timm_fslt.get_group(model).layers)
    return {"params": n, "median_s": statistics.median(ts), "times_s": ts}


# -- report ------------------------------------------------------------------------
def report(results: dict) -> str:
    lines = []
    m = results["machine"]
    lines.append(f"Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} CPUs, torch {m['torch']}, "
                 f"timm {m.get('timm', '?')}, {m['threads']} torch threads; load average "
                 f"{results['load_start']} at start, {results['load_end']} at end.")
    opts = [o for o in ("autocast", "channels_last", "recompute", "preload_kernels") if results["options"].get(o)]
    if results["options"].get("malloc_mmap_threshold") and results.get("memory"):
        opts.append(f"memory runs with MALLOC_MMAP_THRESHOLD_={results['options']['malloc_mmap_threshold']}")
    if results["options"].get("device", "cpu") != "cpu":
        opts.append(f"device {results['options']['device']} ({m.get('gpu', '?')}; memory = "
                    "torch.cuda.max_memory_allocated)")
    if opts:
        lines.append(f"Options: {', '.join(opts)}.")
    if results.get("steps"):
        lines += ["", "| model | batch | (a) dense s/step | (b) frozen s/step | (c) dense source s/step "
                      "| b/a | c/a | b/a paired | c/a paired |", "|---|---|---|---|---|---|---|---|---|"]
        for name, r in results["steps"].items():
            med, rm, rp = r["median_s"], r["ratio_of_medians"], r["median_paired_ratio"]
            lines.append(f"| {name} | {r['batch']} | {med['dense']:.3f} | {med['frozen']:.3f} | "
                         f"{med['dense_source']:.3f} | {rm['frozen']:.3f} | {rm['dense_source']:.3f} | "
                         f"{rp['frozen']:.3f} | {rp['dense_source']:.3f} |")
    if results.get("memory"):
        lines += ["", "| model | batch | (a) dense peak RSS MB | (b) frozen | (c) dense source | "
                      "(a) footprint MB | (b) | (c) | b/a footprint | c/a footprint |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in results["memory"].items():
            mb = {c: r[c]["peak_rss"] / 2**20 for c in CONFIGS}
            fp = {c: r[c]["footprint"] / 2**20 for c in CONFIGS}
            lines.append(f"| {name} | {r['batch']} | {mb['dense']:.0f} | {mb['frozen']:.0f} | "
                         f"{mb['dense_source']:.0f} | {fp['dense']:.0f} | {fp['frozen']:.0f} | "
                         f"{fp['dense_source']:.0f} | {r['frozen']['footprint_ratio']:.3f} | "
                         f"{r['dense_source']['footprint_ratio']:.3f} |")
    if results.get("threshold"):
        t = results["threshold"]
        lines += ["", f"Global threshold among {t['n'] / 1e6:.0f}M scores (k = {t['k']:,}): "
                      f"timm_fslt {t['threshold_s'] * 1e3:.0f} ms (with the exact mask "
                      f"{t['threshold_and_mask_s'] * 1e3:.0f} ms), torch.kthvalue "
                      f"{t['torch_kthvalue_s'] * 1e3:.0f} ms, full torch.sort "
                      f"{t['torch_sort_s'] * 1e3:.0f} ms: {t['sort_over_threshold']:.1f}x faster than the sort."]
    if results.get("freeze"):
        lines += ["", "| regenerate from the seed (freeze 0.35/0.35) | weights | median s |", "|---|---|---|"]
        for name, r in results["freeze"].items():
            lines.append(f"| {name} | {r['params'] / 1e6:.1f}M | {r['median_s']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="conv6,resnet18_cifar,resnet50",
                        help=f"comma-separated, from {list(MODELS)}")
    parser.add_argument("--batch", default="", help="per-model batch, e.g. conv6=128,resnet50=8")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration first")
    parser.add_argument("--memory-steps", type=int, default=3)
    parser.add_argument("--malloc-mmap-threshold", type=int, default=0,
                        help="glibc MALLOC_MMAP_THRESHOLD_ for the memory runs (e.g. 131072): RSS then "
                             "tracks live tensors instead of freed blocks the allocator keeps")
    parser.add_argument("--threshold-n", type=int, default=25_000_000)
    parser.add_argument("--freeze-models", default="resnet18_cifar,resnet50")
    parser.add_argument("--skip", default="", help=f"comma-separated sections to skip, from {SECTIONS}")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--device", default="cpu", type=parse_device,
                        help="cpu (default), cuda (= cuda:0) or cuda:N; every CUDA call uses that device")
    parser.add_argument("--autocast", action="store_true", help="bf16 autocast in every step")
    parser.add_argument("--channels-last", action="store_true", help="channels_last models and inputs")
    parser.add_argument("--preload-kernels", action="store_true",
                        help="memory runs: start numba and load the compiled kernels before the window opens "
                             "(every configuration), so the footprints hold tensors, not numba's fixed ~160 MiB")
    parser.add_argument("--recompute", action="store_true",
                        help="run the frozen forwards inside timm_fslt.recompute_masked_weights")
    parser.add_argument("--quick", action="store_true",
                        help="conv6 batch 32, 3 repeats, 2M-score threshold, ResNet-18 regeneration only")
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    parser.add_argument("--memory-child", nargs=4, metavar=("MODEL", "CONFIG", "BATCH", "STEPS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device != "cpu":
        if not torch.cuda.is_available():
            parser.error(f"--device {args.device}: CUDA is not available on this machine")
        index, count = int(args.device.split(":")[1]), torch.cuda.device_count()
        if index >= count:
            parser.error(f"--device {args.device}: this machine has {count} CUDA device(s) (cuda:0 to "
                         f"cuda:{count - 1})")
        init_device(args.device)
    if args.memory_child:
        model_name, config, size, steps = args.memory_child
        memory_child(model_name, config, int(size), int(steps), args.autocast, args.device, args.recompute,
                     args.preload_kernels)
        return {}

    models = [m for m in args.models.split(",") if m]
    for m in models:
        if m not in MODELS:
            parser.error(f"--models: unknown model {m!r}; allowed: {list(MODELS)}")
    skip = {s for s in args.skip.split(",") if s}
    if skip - set(SECTIONS):
        parser.error(f"--skip: unknown section(s) {sorted(skip - set(SECTIONS))}; allowed: {list(SECTIONS)}")
    sizes = {m: MODELS[m][3] for m in models}
    for item in filter(None, args.batch.split(",")):
        name, _, value = item.partition("=")
        if name not in MODELS or not value.isdigit() or int(value) < 1:
            parser.error(f"--batch: expected model=positive int with model in {list(MODELS)}, got {item!r}")
        sizes[name] = int(value)
    freeze_models = [m for m in args.freeze_models.split(",") if m]
    if args.quick:
        models, sizes = ["conv6"], {"conv6": 32}
        args.repeats, args.warmup, args.memory_steps = 3, 1, 2
        args.threshold_n, freeze_models = 2_000_000, ["resnet18_cifar"]

    import timm_fslt  # noqa: F401  (registers conv6 / resnet18_cifar)

    results = {"machine": machine(args.device), "load_start": loadavg(),
               "options": {"autocast": args.autocast, "channels_last": args.channels_last,
                           "recompute": args.recompute, "preload_kernels": args.preload_kernels,
                           "device": args.device, "threads": args.threads,
                           "malloc_mmap_threshold": args.malloc_mmap_threshold}}
    if "steps" not in skip:
        results["steps"] = {}
        for m in models:
            print(f"[steps] {m} batch {sizes[m]} ...", file=sys.stderr, flush=True)
            results["steps"][m] = time_steps(m, sizes[m], args.repeats, args.warmup, args)
    if "memory" not in skip:
        results["memory"] = {}
        for m in models:
            print(f"[memory] {m} ...", file=sys.stderr, flush=True)
            results["memory"][m] = measure_memory(m, sizes[m], args.memory_steps, args)
            results["memory"][m]["batch"] = sizes[m]
    if "threshold" not in skip:
        print("[threshold] ...", file=sys.stderr, flush=True)
        results["threshold"] = time_threshold(args.threshold_n, repeats=5, device=args.device)
    if "freeze" not in skip:
        results["freeze"] = {}
        for m in freeze_models:
            print(f"[freeze] {m} ...", file=sys.stderr, flush=True)
            results["freeze"][m] = time_freeze(m, repeats=3, device=args.device)
    results["load_end"] = loadavg()
    print(report(results))
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(args.json + ".tmp", args.json)
    return results


if __name__ == "__main__":
    main()
