"""Run a recipe at several (prune, lock, sparsity) points; collect results; plot accuracy vs size.

    accelerate launch recipes/sweep.py --recipe cifar10 --output-dir runs/sweep-conv6 -- --model conv6
    accelerate launch recipes/sweep.py --recipe ogbn_arxiv --points 0,0,0.7 0.5,0,0.7 0.49,0.21,0.7 \\
        --weights --output-dir runs/sweep-gin -- --data-root data/ogb

    accelerate launch recipes/sweep.py --recipe cifar10 --methods edge_popup multicoated iterand \
        --output-dir runs/sweep-methods -- --model conv6 --rerand-period 300

Everything after ``--`` goes to the recipe unchanged (method options such as ``--coat-sparsities``,
``--rerand-period``, ``--sparsity-schedule`` too: they apply to the methods that take them).
``--methods`` runs every point with each search method (default: Edge-Popup only); a point of
another method runs in ``<output-dir>/p<P>-l<L>-k<K>-<method>``.  Without ``--points`` the
preset's ``sweep`` list is used.  Each point runs in ``<output-dir>/p<P>-l<L>-k<K>``
with ``--resume auto``: a finished point is read back, an interrupted one continues,
so re-running the same command completes a sweep.  ``--weights`` adds the weight-
trained model of the same architecture as the upper reference.

Writes ``<output-dir>/sweep.json`` (one row per point) and, with two or more ticket
points, ``<output-dir>/accuracy_vs_size.png``: test accuracy against ticket size in
bits (log scale), dense-source, sparse-source and frozen tickets marked apart.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fslt_recipe as R  # noqa: E402
from accelerate import PartialState  # noqa: E402

from timm_fslt.atomic import write_json_atomic  # noqa: E402

RECIPES = ("cifar10", "imagenet", "ogbn_arxiv")
RESERVED = ("--prune", "--lock", "--sparsity", "--output-dir", "--method", "--resume", "--overwrite")


def parse_point(text: str) -> tuple:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise R.RecipeError(f"--points: {text!r} is not 'prune,lock' or 'prune,lock,sparsity'") from None
    if len(values) not in (2, 3):
        raise R.RecipeError(f"--points: {text!r} is not 'prune,lock' or 'prune,lock,sparsity'")
    return values if len(values) == 3 else values + (None,)


def point_kind(prune: float, lock: float) -> str:
    if lock > 0:
        return "frozen"
    return "sparse source" if prune > 0 else "dense source"


def point_name(prune: float, lock: float, sparsity: Optional[float]) -> str:
    k = "mid" if sparsity is None else f"{sparsity:g}"
    return f"p{prune:g}-l{lock:g}-k{k}"


def _row(name: str, kind: str, point: tuple, results: dict, method: str = "edge_popup") -> dict:
    totals = results["size_report"]["totals"]
    prune, lock, sparsity = point
    return {"name": name, "kind": kind, "method": method, "prune": prune, "lock": lock, "sparsity_target": sparsity,
            "sparsity": results["sparsity"], "val_acc": results["accuracy"]["val"],
            "test_acc": results["accuracy"]["test"], "ticket_bits": totals.get("ticket_bits"),
            "mask_bits": totals.get("mask_bits"), "model_bits": totals.get("model_bits"),
            "fp32_dense_bits": totals.get("fp32_dense_bits"), "wall_time_s": results.get("wall_time_s"),
            "output_dir": results["output_dir"]}


def run_point(recipe, recipe_args: Sequence[str], out_dir: str, extra: Sequence[str]) -> dict:
    """Results of one point: read back if it finished before, else (continue to) run it."""
    path = os.path.join(out_dir, "results.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            done = json.load(f)
        if done.get("completed"):
            return done
    return recipe.main([*recipe_args, *extra, "--output-dir", out_dir, "--resume", "auto"])


_STYLES = {"dense source": ("s", "tab:gray"), "sparse source": ("^", "tab:blue"), "frozen": ("o", "tab:red")}
_METHOD_MARKERS = {"edge_popup": "o", "multicoated": "s", "iterand": "^"}


def plot_accuracy_vs_size(rows: list, path: str, title: str = "") -> Optional[str]:
    """Test accuracy against model size (log bits); None when there are fewer than 2 tickets."""
    tickets = [r for r in rows if r["ticket_bits"] and r["test_acc"] is not None]
    if len(tickets) < 2:
        return None
    from timm_fslt.apps.plots import HLine, Series, accuracy_vs_size

    series = []
    methods = sorted({r.get("method", "edge_popup") for r in tickets}, key=list(_METHOD_MARKERS).index)
    for kind, (marker, color) in _STYLES.items():
        for method in methods:  # one method: the markers of the source kinds; several: one marker per method
            pts = sorted((r for r in tickets if r["kind"] == kind and r.get("method", "edge_popup") == method),
                         key=lambda r: r["ticket_bits"])
            label = f"{kind} ticket" + (f" ({method})" if len(methods) > 1 else "")
            series.append(Series(label, [r["ticket_bits"] for r in pts], [100 * r["test_acc"] for r in pts],
                                 _METHOD_MARKERS[method] if len(methods) > 1 else marker, color,
                                 notes=[f"{r['prune']:g}/{r['lock']:g}" for r in pts]))
    weights = [HLine(100 * r["test_acc"], f"weight training ({r['model_bits']:,} bits)", "black")
               for r in rows if r["kind"] == "weights" and r["test_acc"] is not None]
    return accuracy_vs_size(path, series, lines=weights, title=title or "accuracy vs model size",
                            xlabel="model size [bits] (ticket: 1 bit per free weight + non-regenerable state)",
                            ylabel="test accuracy [%]")


def main(argv: Optional[Sequence[str]] = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, rest = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(prog="recipes/sweep.py", description=__doc__.split("\n")[0])
    p.add_argument("--recipe", required=True, choices=RECIPES)
    p.add_argument("--points", nargs="+", metavar="P,L[,K]",
                   help="(prune, lock[, sparsity]) points; default: the preset's sweep list")
    p.add_argument("--methods", nargs="+", choices=R.M.SEARCH_METHODS, default=["edge_popup"],
                   help="search methods to run every point with (freeze(method=...))")
    p.add_argument("--weights", action="store_true", help="add the weight-trained reference")
    p.add_argument("--output-dir", required=True)
    args = p.parse_args(own)
    clash = [a for a in rest if a.split("=")[0] in RESERVED]
    if clash:
        raise R.RecipeError(f"the sweep sets {', '.join(sorted(set(clash)))} itself; remove them after '--'")
    recipe = importlib.import_module(args.recipe)
    methods = list(dict.fromkeys(args.methods))
    # Each method's settings: the arguments after '--' without the other methods' options.
    per_method = {m: R.resolve_settings(recipe.parser(), [*R.M.for_method(rest, m), "--method", m],
                                        recipe=recipe.RECIPE, default_model=recipe.DEFAULT_MODEL) for m in methods}
    settings = per_method[methods[0]]
    points = [parse_point(t) for t in args.points] if args.points else \
        [tuple(pt) + (None,) * (3 - len(pt)) for pt in settings["sweep"]]
    if not points and not args.weights:
        raise R.RecipeError("--points: nothing to run (the preset has no sweep list)")
    for prune, lock, sparsity in points:  # all points checked before the first one trains
        for method in methods:
            settings = per_method[method]
            point_settings = {**settings, "prune": prune, "lock": lock, "sparsity": sparsity, "method": method,
                              "_explicit": settings["_explicit"] + (["sparsity"] if sparsity is not None else [])}
            R.M.normalize(point_settings)
            R.check_settings(point_settings)

    rows = []
    for point in points:
        prune, lock, sparsity = point
        for method in methods:
            name = point_name(*point) + ("" if method == "edge_popup" else f"-{method}")
            extra = ["--method", method, "--prune", str(prune), "--lock", str(lock)]
            if sparsity is not None:
                extra += ["--sparsity", str(sparsity)]
            results = run_point(recipe, R.M.for_method(rest, method), os.path.join(args.output_dir, name), extra)
            rows.append(_row(name, point_kind(prune, lock), point, results, method))
    if args.weights:
        results = run_point(recipe, rest, os.path.join(args.output_dir, "weights"), ["--method", "weights"])
        rows.append(_row("weights", "weights", (0.0, 0.0, None), results))

    summary = {"recipe": args.recipe, "model": settings["model"], "points": rows}
    if PartialState().is_main_process:
        plot = plot_accuracy_vs_size(rows, os.path.join(args.output_dir, "accuracy_vs_size.png"),
                                     title=f"{args.recipe}: {settings['model']}")
        summary["plot"] = plot
        write_json_atomic(os.path.join(args.output_dir, "sweep.json"), summary)
        for r in rows:
            size = r["ticket_bits"] or r["model_bits"]
            print(f"{r['name']:<34} {r['kind']:<14} test acc {r['test_acc']:.4f}  size {size:,} bits")
    return summary


if __name__ == "__main__":
    R.main_guard(main)
