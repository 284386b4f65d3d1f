"""What the CPU step changes of issues #19 and #17 buy, measured in one process, interleaved.

    python benchmarks/step_variants.py                  # timm resnet18 at 32 px, batch 128, 30 rounds
    python benchmarks/step_variants.py --model conv6 --rounds 12

Six configurations of ``step_time.py`` visited in rotating order every round: dense weight training,
and the frozen step (prune 0.35, lock 0.35) four ways: ``fresh`` (a new ``W * mask`` every step and
the backward gathering ``grad[free]`` and ``W[free]`` with torch ops: before #19), ``kept`` (the product
written into last step's memory, ``SupermaskGroup.keep_products``), ``fused`` (kept, and the scores'
gradient in one compiled pass, ``native.free_gradient``; masks by the generic torch refresh) and
``compiled`` (fused, and the masks selected and written by the compiled two-pass refresh,
``nn/cpu_refresh.py``) and ``cached`` (compiled, with each layer's weights at its free positions
kept for the backward, ``SupermaskGroup.cache_free_weights``, whose product is then the torch ops':
today's CPU default).  Prints the median (and quartiles) of the per-round
ratios against dense and between the variants.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_time as st  # noqa: E402
import timm_fslt  # noqa: E402
from timm_fslt.regen import native  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18", choices=list(st.MODELS))
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    batch = st.MODELS[args.model][3]
    x, y = st.batch(args.model, batch)
    fused_gradient = native.free_gradient
    runs = {}
    for kind in ("dense", "fresh", "kept", "fused", "compiled", "cached"):
        model, opt = st.build(args.model, "dense" if kind == "dense" else "frozen")
        if kind != "dense":
            group = timm_fslt.get_group(model)
            group.keep_products, group.cache_free_weights = kind != "fresh", kind == "cached"
            group.compiled_refresh = kind in ("compiled", "cached")
        runs[kind] = (model, opt)
    kinds = list(runs)
    times = {kind: [] for kind in kinds}
    for r in range(args.rounds + 2):  # (the first two rounds warm up)
        for kind in kinds[r % len(kinds):] + kinds[:r % len(kinds)]:
            native.free_gradient = fused_gradient if kind in ("fused", "compiled", "cached") else (lambda *a: None)
            start = time.perf_counter()
            st.step(*runs[kind], x, y)
            if r >= 2:
                times[kind].append(time.perf_counter() - start)
    native.free_gradient = fused_gradient
    print(f"{args.model}, batch {batch}, {args.threads} threads, {args.rounds} rounds; {st.machine().get('cpu', '?')}; "
          f"dense step median {statistics.median(times['dense']):.3f} s")
    for label, num, den in (("fresh/dense", "fresh", "dense"), ("kept/dense", "kept", "dense"),
                            ("fused/dense", "fused", "dense"), ("kept/fresh", "kept", "fresh"),
                            ("compiled/dense", "compiled", "dense"), ("fused/kept", "fused", "kept"),
                            ("compiled/fused", "compiled", "fused"), ("cached/dense", "cached", "dense"),
                            ("cached/compiled", "cached", "compiled")):
        ratios = [a / b for a, b in zip(times[num], times[den])]
        q = statistics.quantiles(ratios, n=4)
        print(f"  {label}: median {statistics.median(ratios):.3f} (quartiles {q[0]:.3f}-{q[2]:.3f})")


if __name__ == "__main__":
    main()
