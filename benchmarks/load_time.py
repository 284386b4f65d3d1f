"""How long ``load_ticket`` takes next to what it replaces: building the model and loading its dense
fp32 safetensors checkpoint.  Measured in one process, interleaved, after a warm-up of each.

    python benchmarks/load_time.py                              # resnet50 and the slow families of issue #17
    python benchmarks/load_time.py --models resnet50 --rounds 7 --json out.json
    TIMM_FSLT_KERNELS=torch python benchmarks/load_time.py      # the pure-torch regeneration path

For each model: freeze (prune 0.35, lock 0.35) and save a ticket; save the plain model's
state dict as safetensors; then alternate (a) ``timm.create_model`` + ``load_state_dict(load_file())``
and (b) ``timm_fslt.load_ticket`` for ``--rounds`` rounds (``gc.collect()`` before each, so one
round's freed model is not collected inside the next).  Prints the medians, their ratio and the
median of the per-round ratios, plus a breakdown of one extra ticket load by phase.
"""
from __future__ import annotations

import argparse
import collections
import functools
import gc
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from load_memory import _cpu as cpu_name  # noqa: E402  (the same /proc/cpuinfo reading)

DEFAULT_MODELS = "resnet50,tresnet_m,nextvit_small,swinv2_tiny_window16_256,davit_tiny"


def breakdown(path: str) -> dict:
    """Seconds per phase of one ``load_ticket`` (wrapping the loader's steps)."""
    from timm_fslt import frozen
    from timm_fslt.ticket import loading as io
    import timm_fslt

    spent = collections.defaultdict(float)
    patched = []

    def wrap(module, name, label):
        original = getattr(module, name)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spent[label] += time.perf_counter() - start
        setattr(module, name, timed)
        patched.append((module, name, original))

    from timm_fslt.ticket import io as ticket_io
    for module, name, label in [
            (ticket_io, "read_ticket", "read files"), (io, "build_for_check", "meta build (count)"),
            (io, "check_timm_builds", "meta build (timm's config.json)"), (io, "build_architecture", "build"),
            (io, "check_digests", "digests"), (io, "_apply_mask", "mask bits"), (io, "_load_state", "state"),
            (frozen, "random_weight", "regenerate weights"), (frozen.freezing, "frozen_code", "regenerate codes"),
            (io, "freeze_for_ticket", "freeze (incl. regeneration)")]:
        wrap(module, name, label)
    gc.collect()
    start = time.perf_counter()
    try:
        timm_fslt.load_ticket(path)
    finally:
        for module, name, original in patched:
            setattr(module, name, original)
    spent["total"] = time.perf_counter() - start
    return dict(spent)


def measure(name: str, rounds: int, workdir: str) -> dict:
    import timm
    from safetensors.torch import load_file, save_file

    import timm_fslt

    kwargs = {"num_classes": 10}
    model = timm_fslt.freeze(timm.create_model(name, **kwargs), prune=0.35, lock=0.35)
    ticket = os.path.join(workdir, name)
    timm_fslt.save_ticket(model, ticket)
    del model
    dense = timm.create_model(name, **kwargs)
    checkpoint = os.path.join(workdir, name + ".safetensors")
    save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, checkpoint)
    n_params = sum(p.numel() for p in dense.parameters())
    del dense

    def dense_load():
        m = timm.create_model(name, **kwargs)
        m.load_state_dict(load_file(checkpoint))
        return m

    def ticket_load():
        return timm_fslt.load_ticket(ticket)

    times = {"dense": [], "ticket": []}
    dense_load(), ticket_load()  # warm-up (imports, kernel caches)
    for r in range(rounds):
        order = [("dense", dense_load), ("ticket", ticket_load)]
        for label, fn in (order if r % 2 == 0 else order[::-1]):
            gc.collect()
            start = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - start)
    ratios = [t / d for t, d in zip(times["ticket"], times["dense"])]
    row = {"model": name, "parameters": n_params, "dense_s": statistics.median(times["dense"]),
           "ticket_s": statistics.median(times["ticket"]), "ratio_paired": statistics.median(ratios),
           "times": times, "breakdown": breakdown(ticket)}
    row["ratio"] = row["ticket_s"] / row["dense_s"]
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=DEFAULT_MODELS)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from timm_fslt.regen import native
    kernels = "compiled (numba)" if native.kernels() is not None else "torch"
    load = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.models.split(","):
            print(f"[load] {name} ...", file=sys.stderr, flush=True)
            rows.append(measure(name, args.rounds, workdir))
    end = os.getloadavg()
    print(f"Machine: {cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} threads, "
          f"regeneration kernels: {kernels}; load average {load[0]:.1f} at start, {end[0]:.1f} at end.\n")
    print("| model | parameters | (a) build + dense safetensors s | (b) load_ticket s | b/a | b/a paired |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['model']} | {row['parameters'] / 1e6:.1f}M | {row['dense_s']:.3f} | {row['ticket_s']:.3f} | "
              f"{row['ratio']:.2f} | {row['ratio_paired']:.2f} |")
    print("\nOne more load_ticket, by phase (s; nested phases are inside 'freeze'):\n")
    for row in rows:
        parts = ", ".join(f"{k} {v:.3f}" for k, v in sorted(row["breakdown"].items(), key=lambda kv: -kv[1]))
        print(f"* {row['model']}: {parts}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": cpu_name(), "threads": args.threads, "kernels": kernels,
                       "load_average": [load[0], end[0]], "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
