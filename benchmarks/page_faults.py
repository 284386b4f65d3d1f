"""Why the resnet18 ratio depends on what ran before it in the process: page faults per step.

    python benchmarks/page_faults.py               # resnet18 as the first model of the process
    python benchmarks/page_faults.py --after resnet50

Builds the dense and the frozen timm resnet18 (32 px, batch 128, 2 threads, prune 0.35 / lock 0.35,
``step_time.build``), optionally after a few steps of another frozen model, and times interleaved
steps (alternating order) while counting the minor page faults of each step
(``getrusage(RUSAGE_SELF).ru_minflt``).  Prints the median faults and milliseconds per step and
the median of the paired frozen/dense ratios.  A process that has freed large blocks has raised
glibc's mmap threshold, so a step's large temporaries come from the heap already mapped instead
of from fresh pages: both steps stop faulting, and the dense step, which faults most (its weights'
gradients are new weight-sized tensors every step), gains most.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_time as st  # noqa: E402


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--after", default=None, choices=list(st.MODELS), help="run this frozen model first")
    parser.add_argument("--rounds", type=int, default=22)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.after:
        model, opt = st.build(args.after, "frozen")
        x, y = st.batch(args.after, 16)
        for _ in range(3):
            st.step(model, opt, x, y)
        del model, opt, x, y
    x, y = st.batch("resnet18", 128)
    runs = {kind: st.build("resnet18", kind) for kind in ("dense", "frozen")}
    faults, times = {k: [] for k in runs}, {k: [] for k in runs}
    for r in range(args.rounds + 2):
        for kind in (("dense", "frozen") if r % 2 else ("frozen", "dense")):
            model, opt = runs[kind]
            before, start = _faults(), time.perf_counter()
            st.step(model, opt, x, y)
            times[kind].append(time.perf_counter() - start)
            faults[kind].append(_faults() - before)
    ratios = [f / d for f, d in zip(times["frozen"][2:], times["dense"][2:])]
    print(f"resnet18 after {args.after or 'nothing'}: " + "; ".join(
        f"{k} {statistics.median(faults[k][2:]):.0f} faults, {statistics.median(times[k][2:]) * 1e3:.1f} ms"
        for k in runs) + f"; frozen/dense paired {statistics.median(ratios):.3f}; {st.loadavg()}")


if __name__ == "__main__":
    main()
