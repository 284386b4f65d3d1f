"""What the CPU step changes of issues #19 and #17 buy, measured in one process, interleaved.

    python benchmarks/step_variants.py                  # timm resnet18 at 32 px, batch 128, 30 rounds
    python benchmarks/step_variants.py --model conv6 --rounds 12

Seven configurations of ``step_time.py`` visited in rotating order every round: dense weight
training, and the frozen step (prune 0.35, lock 0.35) six ways:

* ``fresh``: a new ``W * mask`` every step, the backward gathering ``grad[free]`` and ``W[free]``
  with torch ops (before #19);
* ``kept``: the product written into last step's memory (``SupermaskGroup.keep_products``);
* ``fused``: kept, and the scores' gradient in one compiled pass (``native.free_gradient``,
  ``functional.FUSED_GRADIENT``); the masks from the generic torch refresh (the CPU default when
  this session began);
* ``compiled``: fused, and the masks selected and written by the compiled refresh
  (``nn/cpu_refresh.py``), which also keeps the product current where a bit changes;
* ``unfused``: compiled, with the torch ops' gradient (today's CPU default);
* ``cached``: compiled, with each layer's weights at its free positions kept for the backward
  (``SupermaskGroup.cache_free_weights``; the backward is then the torch ops'; 4 bytes more per
  free weight).

Prints the median (and quartiles) of the per-round ratios against dense and between variants;
``--json`` also writes every step time.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_time as st  # noqa: E402
import timm_fslt  # noqa: E402
from timm_fslt.nn import functional  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18", choices=list(st.MODELS))
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the ratios and every step time to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    batch = st.MODELS[args.model][3]
    x, y = st.batch(args.model, batch)
    # kind -> (keep_products, cache_free_weights, compiled_refresh, fused gradient)
    variants = {"fresh": (False, False, False, False), "kept": (True, False, False, False),
                "fused": (True, False, False, True), "compiled": (True, False, True, True),
                "unfused": (True, False, True, False), "cached": (True, True, True, True)}
    runs = {"dense": st.build(args.model, "dense")}
    for kind, (keep, cache, compiled, _) in variants.items():
        model, opt = st.build(args.model, "frozen")
        group = timm_fslt.get_group(model)
        group.keep_products, group.cache_free_weights, group.compiled_refresh = keep, cache, compiled
        runs[kind] = (model, opt)
    kinds = list(runs)
    times = {kind: [] for kind in kinds}
    for r in range(args.rounds + 2):  # (the first two rounds warm up)
        for kind in kinds[r % len(kinds):] + kinds[:r % len(kinds)]:
            fused = kind != "dense" and variants[kind][3]
            functional.FUSED_GRADIENT = fused
            start = time.perf_counter()
            st.step(*runs[kind], x, y)
            if r >= 2:
                times[kind].append(time.perf_counter() - start)
    functional.FUSED_GRADIENT = False
    head = (f"{args.model}, batch {batch}, {args.threads} threads, {args.rounds} rounds; "
            f"{st.machine().get('cpu', '?')}; dense step median {statistics.median(times['dense']):.3f} s")
    print(head)
    pairs = [(f"{kind}/dense", kind, "dense") for kind in variants] + [
        ("kept/fresh", "kept", "fresh"), ("fused/kept", "fused", "kept"), ("compiled/fused", "compiled", "fused"),
        ("unfused/compiled", "unfused", "compiled"), ("cached/compiled", "cached", "compiled")]
    summary = {}
    for label, num, den in pairs:
        ratios = [a / b for a, b in zip(times[num], times[den])]
        q = statistics.quantiles(ratios, n=4)
        summary[label] = {"median": statistics.median(ratios), "quartiles": [q[0], q[2]]}
        print(f"  {label}: median {statistics.median(ratios):.3f} (quartiles {q[0]:.3f}-{q[2]:.3f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"title": head, "machine": st.machine(), "ratios": summary, "times_s": times}, f, indent=1)

if __name__ == "__main__":
    main()
