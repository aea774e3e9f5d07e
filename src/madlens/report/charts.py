"""The reports' charts as inline SVG drawn by matplotlib (SVG backend, no GUI): line charts,
ROC curves and score histograms, plus the bar chart script for pages that draw in the browser."""

from __future__ import annotations

import io
import math
import re
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

import numpy as np

from madlens.report.colours import ANOMALOUS, GREY, NORMAL, PALETTE
from madlens.report.page import esc

if TYPE_CHECKING:  # matplotlib is imported when a chart is drawn, not with the package
    from matplotlib.figure import Figure

# Deterministic SVG text (same input, same bytes), text kept as <text>, no path thinning: a
# drawn ROC curve keeps every threshold's point.
RC = {
    "svg.fonttype": "none",
    "svg.hashsalt": "madlens",
    "path.simplify": False,
    "font.size": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.frameon": False,
}
# Artists are tagged with gid "class:NAME"; the SVG then carries class="NAME" on their group.
_GID = re.compile(r'<g id="class:([\w-]+)">')


def plot(title: str, svg: str) -> str:
    """A chart with its title, in the box the reports lay out in a `.plots` row."""
    return f'<div class="plot"><div>{esc(title)}</div>{svg}</div>'


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width / 72, height / 72), dpi=72, layout="constrained")


def _svg(fig: Figure) -> str:
    """The figure as an inline <svg> element: sized in px, no XML prolog, no metadata."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Creator": None, "Date": None, "Format": None,
                                             "Type": None})  # fmt: skip
    svg = buf.getvalue()
    svg = svg[svg.index("<svg") :]
    svg = svg.replace(' xmlns:xlink="http://www.w3.org/1999/xlink"', "", 1)
    svg = re.sub(r'(width|height)="([\d.]+)pt"', r'\1="\2px"', svg, count=2)
    return _GID.sub(r'<g class="\1">', svg)


def _tag(artists: object, css_class: str) -> None:
    for artist in artists if isinstance(artists, (list, tuple)) else [artists]:
        artist.set_gid(f"class:{css_class}")


def roc_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FPR and TPR at every distinct threshold, from (0, 0) to (1, 1) (ties handled together)."""
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], np.asarray(labels)[order].astype(bool)
    distinct = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tps, fps = np.cumsum(y)[distinct], np.cumsum(~y)[distinct]
    return np.r_[0, fps / max(1, (~y).sum())], np.r_[0, tps / max(1, y.sum())]


def roc_chart(curves: Sequence[tuple[str, np.ndarray, np.ndarray]], css_class: str = "roc") -> str:
    """ROC curves, one per `(label, labels, scores)`, over the chance diagonal."""
    with _rc():
        fig = _figure(360, 300)
        ax = fig.add_subplot()
        ax.plot([0, 1], [0, 1], color="#bbbbbb", linestyle="--", linewidth=1)
        for i, (label, labels, scores) in enumerate(curves):
            fpr, tpr = roc_points(np.asarray(labels), np.asarray(scores, dtype=float))
            (line,) = ax.plot(fpr, tpr, color=PALETTE[i % len(PALETTE)], linewidth=2, label=label)
            _tag(line, css_class)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="false positive rate", ylabel="true positive rate")
        ax.set_aspect("equal")
        if curves:
            ax.legend(loc="lower right")
        return _svg(fig)


def histogram_chart(labels: np.ndarray, scores: np.ndarray, bins: int = 24,
                    css_class: str = "bar") -> str:  # fmt: skip
    """Score histograms, normal (blue) against anomalous (red), each as a fraction of its class,
    over `bins` equal bins spanning the finite scores."""
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=float)
    finite = scores[np.isfinite(scores)]
    lo, hi = (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1.0
    edges = np.linspace(lo, hi, bins + 1)
    with _rc():
        fig = _figure(360, 220)
        ax = fig.add_subplot()
        for cls, colour, name in ((0, NORMAL, "normal"), (1, ANOMALOUS, "anomalous")):
            counts = np.histogram(scores[labels == cls], edges)[0] / max(1, (labels == cls).sum())
            bars = ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color=colour,
                          alpha=0.45, label=name)  # fmt: skip
            _tag(list(bars), css_class)
        ax.set(xlim=(lo, hi), xlabel="score", ylabel="fraction")
        ax.legend(loc="upper right")
        return _svg(fig)


def line_chart(
    series: dict[str, Sequence[tuple[float, float | None]]],
    *,
    xlabel: str,
    ylabel: str,
    ylim: tuple[float, float] = (0.0, 1.0),
    colours: dict[str, str] | None = None,
    dashed: frozenset[str] | set[str] = frozenset(),
    gridlines: Sequence[float] = (),
    css_class: str = "line",
) -> str:
    """One line per named series of `(x, y)` points, integer x ticks at every x, y clipped to
    `ylim` (missing / non-finite y skipped); `dashed` names are drawn dashed, the legend sits
    to the right."""
    xs = sorted({x for points in series.values() for x, _ in points}) or [0]
    with _rc():
        fig = _figure(330 + 6 * max((len(name) for name in series), default=0), 260)
        ax = fig.add_subplot()
        for y in gridlines:
            ax.axhline(y, color="#eeeeee", linewidth=1, zorder=0)
        for i, (name, points) in enumerate(series.items()):
            good = [(x, min(max(y, ylim[0]), ylim[1])) for x, y in points
                    if y is not None and math.isfinite(y)]  # fmt: skip
            colour = (colours or {}).get(name) or PALETTE[i % len(PALETTE)]
            (line,) = ax.plot([x for x, _ in good], [y for _, y in good], color=colour,
                              linewidth=2, linestyle="--" if name in dashed else "-",
                              label=name)  # fmt: skip
            _tag(line, css_class)
        ax.set(xlabel=xlabel, ylabel=ylabel, ylim=ylim, xticks=xs)
        ax.set_xlim(xs[0] - 0.2, xs[-1] + 0.2)
        if series:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
        return _svg(fig)


def _rc() -> AbstractContextManager:
    import matplotlib

    return matplotlib.rc_context(RC)


# The browser-side bar chart for pages that draw from embedded JSON (one SVG per call would not
# fit a page listing thousands of SAE latents): counts over [lo, hi] as bars, as in Python.
HISTOGRAM_JS = f"""
function histogramSvg(counts, lo, hi, cls){{
  const W = 400, H = 80, m = Math.max(...counts), bw = W / counts.length;
  const bars = counts.map((c,i) =>
    `<rect x="${{i*bw}}" y="${{H-H*c/m}}" width="${{bw-1}}" height="${{H*c/m}}" fill="{NORMAL}"/>`);
  return `<svg class="${{cls}}" width="${{W}}" height="${{H+16}}">${{bars.join("")}}
  <text x="0" y="${{H+14}}" font-size="11" fill="{GREY}">${{lo.toFixed(2)}}</text>
  <text x="${{W-40}}" y="${{H+14}}" font-size="11" fill="{GREY}">${{hi.toFixed(2)}}</text></svg>`;
}}
"""
