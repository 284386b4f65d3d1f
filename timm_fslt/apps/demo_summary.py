"""What the demo reports from its runs: per-point summaries over seeds, comparisons, the table."""
from __future__ import annotations

import statistics

__all__ = ["comparisons", "format_comparisons", "format_table", "summarize"]


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(rows: list[dict], points: list) -> list[dict]:
    """One row per point (``demo.Point``): accuracies averaged over seeds, sizes (identical across seeds)."""
    summary = []
    for point in points:
        mine = [r for r in rows if r["label"] == point.label]
        if not mine:
            continue
        acc, acc_std = _mean_std([r["test_acc"] for r in mine])
        val, _ = _mean_std([r["val_acc"] for r in mine])
        first = mine[0]
        summary.append({
            "kind": point.kind, "label": point.label, "prune": point.prune, "lock": point.lock,
            "freezing_ratio": first["freezing_ratio"], "matched_ratio": point.ratio,
            "test_acc": acc, "test_acc_std": acc_std, "val_acc": val, "seeds": len(mine),
            "sparsity": _mean_std([r["sparsity"] for r in mine])[0],
            "ticket_bits": first["ticket_bits"], "ticket_bytes": first["ticket_bytes"],
            "compression_vs_dense_source": first["compression_vs_dense_source"],
        })
    return summary


def comparisons(summary: list[dict]) -> list[dict]:
    """For each freezing ratio: the frozen ticket against the dense-source and the same-size sparse ticket."""
    by_label = {s["label"]: s for s in summary}
    dense = by_label.get("dense")
    out = []
    for s in summary:
        if s["kind"] != "frozen":
            continue
        sparse = by_label.get(f"sparse-{s['matched_ratio']:g}")
        out.append({
            "ratio": s["matched_ratio"], "frozen_acc": s["test_acc"],
            "compression_vs_dense_source": s["compression_vs_dense_source"],
            "points_vs_dense_source": None if dense is None else 100 * (s["test_acc"] - dense["test_acc"]),
            "points_vs_sparse_same_size": None if sparse is None else 100 * (s["test_acc"] - sparse["test_acc"]),
        })
    return out


_METHOD_NAMES = {"weights": "weights (trained)", "dense": "dense source", "sparse": "sparse source",
                 "frozen": "frozen source"}


def format_table(summary: list[dict]) -> str:
    multi = any(s["seeds"] > 1 for s in summary)
    head = (f"{'method':<18} {'prune':>5} {'lock':>5} {'accuracy %':>{13 if multi else 10}} {'sparsity':>8} "
            f"{'ticket bits':>12} {'ticket bytes':>12} {'vs dense-source ticket':>22}")
    lines = [head, "-" * len(head)]
    for s in summary:
        acc = f"{100 * s['test_acc']:.2f}" + (f" ±{100 * s['test_acc_std']:.2f}" if multi else "")
        if s["kind"] == "weights":
            ratio = f"{s['compression_vs_dense_source']:.3f}x (fp32)"
        else:
            ratio = f"{s['compression_vs_dense_source']:.2f}x smaller"
        lines.append(f"{_METHOD_NAMES[s['kind']]:<18} {s['prune']:>5.2f} {s['lock']:>5.2f} "
                     f"{acc:>{13 if multi else 10}} {s['sparsity']:>8.3f} {s['ticket_bits']:>12,} "
                     f"{s['ticket_bytes']:>12,} {ratio:>22}")
    return "\n".join(lines)


def format_comparisons(comps: list[dict]) -> str:
    lines = []
    for c in comps:
        parts = [f"frozen {100 * c['ratio']:g}%: ticket {c['compression_vs_dense_source']:.2f}x smaller than "
                 "the dense-source ticket"]
        if c["points_vs_dense_source"] is not None:
            parts.append(f"{c['points_vs_dense_source']:+.2f} accuracy points vs it")
        if c["points_vs_sparse_same_size"] is not None:
            parts.append(f"{c['points_vs_sparse_same_size']:+.2f} points vs the sparse-source ticket "
                         "of the same size")
        lines.append(", ".join(parts))
    return "\n".join(lines)
