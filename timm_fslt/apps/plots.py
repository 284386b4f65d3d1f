"""Accuracy against ticket size: the figure of the demo and of ``recipes/sweep.py``.

``accuracy_vs_size`` draws series of (size in bits, accuracy %) points on a log size
axis, with optional error bars, a note beside each point and horizontal reference
lines, and writes the PNG atomically.  ``plot_demo_summary`` is the demo's figure.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from timm_fslt.atomic import write_bytes_atomic

__all__ = ["HLine", "Series", "accuracy_vs_size", "plot_demo_summary"]


@dataclass
class Series:
    """One source kind: points sorted by size, drawn with one marker and color."""
    label: str
    sizes: list
    accuracies: list  # in percent
    marker: str
    color: str
    marker_size: Optional[float] = None
    errors: Optional[list] = None  # error bars (in percent), not drawn when all are 0
    notes: Sequence[str] = ()  # one text per point, drawn beside it
    note_offset: tuple = (4, 4)  # points
    note_size: float = 7


@dataclass
class HLine:
    """A horizontal reference line (chance level, the weight-trained network)."""
    y: float
    label: str
    color: str
    linestyle: str = "--"
    linewidth: float = 1


def _draw_series(ax, s: Series) -> None:
    style = dict(marker=s.marker, color=s.color, linestyle="-" if len(s.sizes) > 1 else "none", label=s.label)
    if s.marker_size is not None:
        style["ms"] = s.marker_size
    if s.errors is None:
        ax.plot(s.sizes, s.accuracies, **style)
    else:  # an errorbar container even without bars: the legend lists containers after lines
        ax.errorbar(s.sizes, s.accuracies, yerr=s.errors if any(s.errors) else None, capsize=3, **style)
    for note, x, y in zip(s.notes, s.sizes, s.accuracies):
        ax.annotate(note, (x, y), textcoords="offset points", xytext=s.note_offset, fontsize=s.note_size,
                    color=s.color)


def accuracy_vs_size(path, series: Sequence[Series], *, title: str, xlabel: str, ylabel: str,
                     lines: Sequence[HLine] = (), title_size: Optional[float] = None,
                     ylim: Optional[tuple] = None, legend_loc: str = "best",
                     figsize: tuple = (6.4, 4.4)):
    """Accuracy vs size (log x) at 120 dpi, written to ``path`` atomically; returns ``path``."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize, dpi=120)
    for s in series:
        if s.sizes:
            _draw_series(ax, s)
    if ylim is not None:
        ax.set_ylim(*ylim)
    for line in lines:
        ax.axhline(line.y, color=line.color, linestyle=line.linestyle, linewidth=line.linewidth,
                   label=line.label)
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, **({} if title_size is None else {"fontsize": title_size}))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc=legend_loc)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    write_bytes_atomic(path, png.getvalue())
    return path


# -- the demo's figure --------------------------------------------------------------------------
_LEGEND = {"weights": "weights trained (fp32)", "dense": "dense source (prune 0, lock 0)",
           "sparse": "sparse source (prune f, lock 0)", "frozen": "frozen source (prune = lock = f/2)"}
_STYLE = {"weights": dict(marker="*", color="black", marker_size=13),
          "dense": dict(marker="s", color="tab:blue", marker_size=9),
          "sparse": dict(marker="^", color="tab:orange", marker_size=9),
          "frozen": dict(marker="o", color="tab:green", marker_size=9)}
_NOTE_OFFSET = {"sparse": (6, -12), "frozen": (6, 6)}  # labelled with their freezing ratio


def plot_demo_summary(summary: list[dict], path: Path, title: str) -> Path:
    """The demo's accuracy vs ticket size, one marker style per source kind (``demo.summarize`` rows)."""
    series = []
    for kind in _LEGEND:
        pts = sorted((s for s in summary if s["kind"] == kind), key=lambda s: s["ticket_bits"])
        notes = [f"{100 * s['matched_ratio']:g}%" for s in pts] if kind in _NOTE_OFFSET else ()
        series.append(Series(_LEGEND[kind], [s["ticket_bits"] for s in pts], [100 * s["test_acc"] for s in pts],
                             errors=[100 * s["test_acc_std"] for s in pts], notes=notes,
                             note_offset=_NOTE_OFFSET.get(kind, (4, 4)), note_size=8, **_STYLE[kind]))
    accs = [100 * (s["test_acc"] + s["test_acc_std"]) for s in summary] + \
        [100 * (s["test_acc"] - s["test_acc_std"]) for s in summary]
    bottom = max(0.0, min(accs) - 5.0)
    chance = [HLine(10.0, "chance (10 classes)", "grey", ":")] if bottom <= 10.0 else []
    return Path(accuracy_vs_size(
        Path(path), series, lines=chance, ylim=(bottom, min(100.0, max(accs) + 2.0)),
        title=title + "\nlabels: freezing ratio f; a sparse and a frozen point with the same f have "
                      "the same ticket size", title_size=9,
        xlabel="model size (bits to store the ticket / trained weights)", ylabel="test accuracy (%)",
        legend_loc="lower right", figsize=(7.5, 4.8)))
