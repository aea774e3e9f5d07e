"""The report toolkit against independent references: HTML escaping and JSON embedding read
back by the standard library, the ROC chart's drawn points against sklearn's `roc_curve`, the
histogram's bars against `numpy.histogram`, heatmap cells against the colour scale."""

import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest
from sklearn.metrics import roc_curve

from madlens.report import (
    FAIL,
    PASS,
    auroc_colour,
    diverging,
    esc,
    heatmap,
    histogram_chart,
    json_script,
    line_chart,
    mix,
    page,
    roc_chart,
    roc_points,
    sequential,
    verdict,
)

NASTY = "<script>alert('x')</script> & \"quoted\" </div>"


class _Collect(HTMLParser):
    """Text, attributes and script bodies as a browser's parser sees them."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.text, self.attrs, self.scripts, self._in_script = [], [], [], False

    def handle_starttag(self, tag, attrs):
        self.attrs += [v for _, v in attrs]
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        (self.scripts if self._in_script else self.text).append(data)


def test_escaping_round_trips_through_an_html_parser():
    doc = page(NASTY, f"<p title='{esc(NASTY)}'>{esc(NASTY)}</p>" + json_script({"k": NASTY}, "d"))
    parsed = _Collect()
    parsed.feed(doc)
    assert NASTY in parsed.text and NASTY in parsed.attrs  # as text and in the title attribute
    assert "<script>alert" not in doc
    (data,) = [s for s in parsed.scripts if s.startswith("{")]
    assert json.loads(data) == {"k": NASTY}  # the embedded JSON survives, unclosed
    assert doc.startswith("<!DOCTYPE html>") and "http" not in doc  # nothing to fetch


def test_verdict_uses_the_shared_pass_fail_classes():
    assert f"class='{PASS}'" in verdict(True) and f"class='{FAIL}'" in verdict(False)
    assert "reported" in verdict(None)
    assert f".{PASS}{{" in page("t", "") and f".{FAIL}{{" in page("t", "")


def test_colour_scales_at_their_anchors():
    assert auroc_colour(0.5) == "#ffffff" and auroc_colour(1.0) == "#64c864"
    assert auroc_colour(0.0) == "#ff6464" and auroc_colour(None) == auroc_colour(float("nan"))
    assert diverging(0.0, 2.0) == "#ffffff" and diverging(-2.0, 2.0) == "#2166ac"
    assert diverging(5.0, 2.0) == "#b2182b"  # saturates
    assert sequential(0.0) == "#ffffff" and sequential(1.0) == "#3f007d"
    assert mix((0, 0, 0), (255, 255, 255), 0.5) == "#808080"


def _paths(svg, css_class):
    """Vertices of every path inside the groups of `css_class`, in SVG pixels."""
    groups = re.findall(rf'<g class="{css_class}">(.*?)</g>', svg, flags=re.S)
    paths = [re.search(r'd="([^"]*)"', g).group(1) for g in groups]
    return [np.array(re.findall(r"([-\d.]+) ([-\d.]+)", d), dtype=float) for d in paths]


def test_roc_chart_draws_sklearn_roc_curve():
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(40), np.ones(25)]
    scores = np.round(rng.normal(size=65) + labels, 1)  # ties on purpose
    (drawn,) = _paths(roc_chart([("detector", labels, scores)]), "roc")
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    # pixels -> data: the curve runs from (0, 0) to (1, 1); SVG's y axis points down
    (x0, y0), (x1, y1) = drawn[0], drawn[-1]
    data = np.c_[(drawn[:, 0] - x0) / (x1 - x0), (drawn[:, 1] - y0) / (y1 - y0)]
    np.testing.assert_allclose(data, np.c_[fpr, tpr], atol=1e-4)
    np.testing.assert_allclose(np.column_stack(roc_points(labels, scores)), np.c_[fpr, tpr])


def test_histogram_bars_are_class_fractions():
    rng = np.random.default_rng(1)
    labels = np.r_[np.zeros(50), np.ones(30)]
    scores = rng.normal(size=80) + 2 * labels
    bars = _paths(histogram_chart(labels, scores, bins=10), "bar")
    assert len(bars) == 20  # one rectangle per bin and class
    heights = np.array([b[:, 1].max() - b[:, 1].min() for b in bars])
    edges = np.linspace(scores.min(), scores.max(), 11)
    expected = np.r_[np.histogram(scores[labels == 0], edges)[0] / 50,
                     np.histogram(scores[labels == 1], edges)[0] / 30]  # fmt: skip
    scale = heights.max() / expected.max()
    np.testing.assert_allclose(heights, expected * scale, atol=0.05)


def test_line_chart_draws_one_line_per_series_and_skips_missing_points():
    svg = line_chart({"a": [(0, 0.5), (1, 0.7), (2, 0.9)], "b": [(0, 0.6), (1, None), (2, 0.8)]},
                     xlabel="layer", ylabel="AUROC", css_class="curve")  # fmt: skip
    a, b = _paths(svg, "curve")
    assert len(a) == 3 and len(b) == 2
    assert a[0, 1] > a[1, 1] > a[2, 1]  # rising AUROC: y pixels fall
    assert ">a<" in svg and ">b<" in svg  # the legend, as text


def test_heatmap_cells_follow_the_colour_scale():
    values = np.array([[0.0, 0.25, 1.0], [0.5, float("nan"), 0.75]])
    svg = heatmap(values, "t <x>", row_labels=["r0", "r1"], col_labels=["a", "b", "c"],
                  colour=sequential, outlined={(1, 2): "#123456"})  # fmt: skip
    cells = re.findall(r'<rect class="cell" data-key="(\d)\.(\d)"[^>]*fill="([^"]+)">'
                       r"<title>([^<]*)</title>", svg)  # fmt: skip
    assert len(cells) == 6
    for i, j, fill, title in cells:
        assert fill == sequential(values[int(i), int(j)])
        value = values[int(i), int(j)]
        assert title.endswith("n/a" if np.isnan(value) else f"{value:.3f}")
    assert 'stroke="#123456"' in svg and "t &lt;x&gt;" in svg


@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_heatmap_with_a_diverging_scale(scale):
    values = np.array([[-1.0, 0.0, 1.0]])
    svg = heatmap(values, "d", row_labels=["0"], col_labels=["a", "b", "c"],
                  colour=lambda v: diverging(v, scale), keyed=False)  # fmt: skip
    fills = re.findall(r'<rect class="cell" [^>]*fill="([^"]+)"', svg)
    assert fills == [diverging(v, scale) for v in values[0]] and "data-key" not in svg
