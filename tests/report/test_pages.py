"""Every report on the toolkit, rendered in headless Chromium from real tiny-test runs: one
screenshot per report must not be blank, the page must fetch nothing, and the bench report
must show supervised detectors apart (by their declaration), error rows and recall at 1% FPR."""

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from browser import dump_dom, screenshot
from PIL import Image

from madlens.bench import run_bench
from madlens.bench.report import render_report
from madlens.detectors import DETECTORS

DETECTORS_RUN = ["mahalanobis", "knn", "perplexity", "logistic-probe-skyline", "lie-detector"]


def assert_not_blank(png: Path, min_colours: int = 40, min_ink: float = 0.02) -> None:
    """Many distinct colours and a share of non-white pixels: something was drawn."""
    pixels = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3)
    colours = len(np.unique(pixels, axis=0))
    ink = float((pixels.min(axis=1) < 240).mean())
    assert colours >= min_colours and ink >= min_ink, (colours, ink)


def assert_self_contained(html: str) -> None:
    assert "<link" not in html and not re.search(r"<script[^>]*\bsrc=", html)
    assert set(re.findall(r"https?://[^\s\"'<>)]+", html)) <= {"http://www.w3.org/2000/svg"}


def _shot(page: Path, tmp_path: Path, size: str = "1300,1800") -> None:
    assert_self_contained(page.read_text())
    assert_not_blank(screenshot(page, tmp_path / "shot.png", size))


@pytest.fixture(scope="module")
def bench(tmp_path_factory, weather_task_file):
    folder = tmp_path_factory.mktemp("bench")
    task_file = weather_task_file
    doc, results = run_bench([], DETECTORS_RUN, None, "tiny-test", task_file, quick=True,
                             progress=False)  # fmt: skip
    hook = "blocks.1.hook_resid_post"
    doc["rows"].append(
        {"task": "weather", "detector": "knn", "hook": hook, "auroc": None,
         "auroc_ci": [None, None], "ap": None, "fpr_at_95tpr": None, "tpr_at_1fpr": None,
         "fit_s": 0.0, "score_s": 0.0, "status": "error", "reason": "singular <matrix>"}
    )  # fmt: skip
    for row in doc["rows"]:  # rows written before `status` existed count as measured
        if row.get("status") == "ok" and row["detector"] == "mahalanobis":
            del row["status"]
    return doc, results, folder


def _header_groups(html: str) -> tuple[list[str], list[str]]:
    """The headline's detector columns: (label-free, supervised), from the two header rows."""
    table = html[html.index("<table id='headline'>") :]
    n_free = int(re.search(r"<th colspan='(\d+)'>label-free</th>", table).group(1))
    second = table[
        table.index("</tr><tr>") + 9 : table.index("</tr>", table.index("</tr><tr>") + 9)
    ]
    names = re.findall(r"<th[^>]*>([^<]+)</th>", second)
    return names[:n_free], names[n_free:]


def test_bench_report(bench, tmp_path):
    doc, results, _ = bench
    html = render_report(doc, results)
    free, supervised = _header_groups(html)
    assert set(supervised) == {d for d in DETECTORS_RUN if DETECTORS[d].supervised}
    assert {"mahalanobis", "knn", "perplexity"} <= set(free)
    # the error row, with its reason, in the error table and the all-rows table
    assert "<table id='errors'>" in html and html.count("singular &lt;matrix&gt;") == 2
    assert "id='not-applicable'" in html and "transcripts" in html  # lie-detector: n/a
    # recall at 1% FPR, with its bootstrap CI, beside each measured headline AUROC
    row = next(r for r in doc["rows"] if r["detector"] == "perplexity")
    lo, hi = row["tpr_at_1fpr_ci"]
    assert f"{row['auroc']:.2f}<br><span class='sub' title='recall at 1% FPR, bootstrap 95% " \
           f"CI'>{row['tpr_at_1fpr']:.2f} [{lo:.2f}–{hi:.2f}]</span>" in html  # fmt: skip
    # the shortcut baselines: supervised, so never a headline column
    assert "<table id='shortcuts'>" in html and "<table id='goal'>" in html
    assert not any(name.startswith("shortcut:") for name in free + supervised)
    page = tmp_path / "report.html"
    page.write_text(html, encoding="utf-8")
    dom = dump_dom(page)
    assert dom.count('class="roc"') >= 2 and dom.count('class="bar"') > 10
    assert 'class="layer"' in dom
    _shot(page, tmp_path)


def test_bench_groups_detectors_by_their_declaration_not_their_name(bench, monkeypatch):
    doc, results, _ = bench
    monkeypatch.setattr(DETECTORS["knn"], "supervised", True)
    monkeypatch.setattr(DETECTORS["logistic-probe-skyline"], "supervised", False)
    free, supervised = _header_groups(render_report(doc, results))
    assert "knn" in supervised and "logistic-probe-skyline" in free


def test_truth_report(tiny, tmp_path):
    from madlens.truth import truth_sweep
    from madlens.truth.report import write_truth_outputs

    doc = truth_sweep(tiny, ["larger_than", "capitals"], n=16, progress=False)
    paths = write_truth_outputs(doc, tmp_path / "truth")
    dom = dump_dom(paths["html"])
    assert 'id="summary"' in dom and dom.count('class="curve"') >= 2 * 8
    _shot(paths["html"], tmp_path)


def test_circuits_report(tiny, tmp_path):
    from madlens.circuits.discovery import discover_ioi
    from madlens.circuits.ioi import make_ioi
    from madlens.circuits.report import write_outputs
    from madlens.models.tiny import tiny_tokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many small forwards: one thread is faster on a shared machine
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            data = make_ioi(tiny_tokenizer(), 8, 0)
        result = discover_ioi(tiny, data=data, cache=False, progress=False)
    finally:
        torch.set_num_threads(threads)
    paths = write_outputs(result, tmp_path / "circuit")
    html = paths["html"].read_text()
    dom = dump_dom(paths["html"])
    cells = len(re.findall(r'<rect class="cell"', html))
    assert cells and f'data-cells="{cells}"' in dom  # the toolkit's heatmap script ran
    assert "class='fail'" in html or "class='pass'" in html or 'class="fail"' in html
    _shot(paths["html"], tmp_path, "1300,2400")


def test_sae_dashboard(tiny, tmp_path):
    from madlens.sae import TopKConfig, TopKSAE
    from madlens.sae.capture import stream_activations
    from madlens.sae.dashboard import feature_stats, write_dashboard

    hook, context = "blocks.1.hook_resid_post", 16
    windows = np.random.default_rng(0).integers(3, 250, size=(12, context))
    rows = np.concatenate(list(stream_activations(tiny, windows, hook, skip_first=False,
                                                  progress=False)))  # fmt: skip
    sae = TopKSAE(TopKConfig(tiny.d_model, 32, k=4))
    stats = feature_stats(sae, rows, context, tiny)
    page = write_dashboard(stats, windows, tiny.tokenizer.decode, tmp_path / "dash.html",
                           "SAE features <tiny>")  # fmt: skip
    html = page.read_text()
    assert "<title>SAE features &lt;tiny&gt;</title>" in html
    dom = dump_dom(page)
    assert len(re.findall(r'<tr data-f="\d+"', dom)) == 32
    assert 'class="hist"' in dom and 'class="ctx"' in dom and "top logit effects" in dom
    _shot(page, tmp_path, "1300,1000")
