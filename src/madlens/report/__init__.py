"""One HTML toolkit for every madlens report: the page shell, escaping, stylesheet, palette,
colour scales, pass/fail marks and charts (a leaf: it imports nothing else of madlens)."""

from madlens.report.charts import (
    HISTOGRAM_JS,
    histogram_chart,
    line_chart,
    plot,
    roc_chart,
    roc_points,
)
from madlens.report.colours import (
    ANOMALOUS,
    DARK2,
    DARK_GREY,
    GREY,
    NORMAL,
    PALETTE,
    auroc_colour,
    diverging,
    mix,
    sequential,
)
from madlens.report.heatmap import HEATMAP_JS, heatmap
from madlens.report.page import (
    CSS,
    ESCAPE_JS,
    FAIL,
    PASS,
    esc,
    figure,
    fmt,
    json_script,
    page,
    verdict,
)

__all__ = [
    "ANOMALOUS", "CSS", "DARK2", "DARK_GREY", "ESCAPE_JS", "FAIL", "GREY", "HEATMAP_JS",
    "HISTOGRAM_JS", "NORMAL", "PALETTE", "PASS", "auroc_colour", "diverging", "esc", "figure",
    "fmt", "heatmap", "histogram_chart", "json_script", "line_chart", "mix", "page", "plot",
    "roc_chart", "roc_points", "sequential", "verdict",
]  # fmt: skip
