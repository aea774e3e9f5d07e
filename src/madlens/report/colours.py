"""The reports' palette and colour scales: series colours, the AUROC scale (white at chance),
the diverging scale (blue, white, red) and the sequential one (white to purple)."""

import math

# Series colours, in the order charts assign them (matplotlib's tab10, reordered).
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf"]
# Categories that are not ordered (ColorBrewer Dark2), e.g. the classes of circuit heads.
DARK2 = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d"]
GREY, DARK_GREY, MISSING = "#7f7f7f", "#444444", "#eeeeee"
NORMAL, ANOMALOUS = PALETTE[0], PALETTE[1]
WHITE, GREEN, RED, BLUE, PURPLE = (255,) * 3, (100, 200, 100), (255, 100, 100), (33, 102, 172), (
    63, 0, 125)  # fmt: skip
DIVERGING_HIGH = (178, 24, 43)


def mix(a: tuple[int, int, int], b: tuple[int, int, int], t: float) -> str:
    """The colour a fraction `t` (clipped to [0, 1]) of the way from `a` to `b`, as #rrggbb."""
    t = min(max(t, 0.0), 1.0)
    r, g, bl = (round(x + (y - x) * t) for x, y in zip(a, b))
    return f"#{r:02x}{g:02x}{bl:02x}"


def _missing(value: float | None) -> bool:
    return value is None or not math.isfinite(value)


def auroc_colour(auroc: float | None) -> str:
    """White at 0.5 (chance), green towards 1, red towards 0; grey when not measured."""
    if _missing(auroc):
        return MISSING
    t = (auroc - 0.5) * 2
    return mix(WHITE, GREEN, t) if t >= 0 else mix(WHITE, RED, -t)


def diverging(value: float | None, scale: float) -> str:
    """Blue below zero, white at zero, red above, saturating at +-`scale`; grey for NaN."""
    if _missing(value):
        return MISSING
    t = value / scale if scale > 0 else 0.0
    return mix(WHITE, BLUE, -t) if t < 0 else mix(WHITE, DIVERGING_HIGH, t)


def sequential(value: float | None) -> str:
    """White at 0 to dark purple at 1 (e.g. attention weights); grey for NaN."""
    return MISSING if _missing(value) else mix(WHITE, PURPLE, value)
