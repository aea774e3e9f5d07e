import json
import sys

import numpy as np
import pytest
from browser import dump_dom
from sklearn.metrics import average_precision_score, roc_auc_score

from madlens.activations import capture as capture_module
from madlens.bench import run_bench
from madlens.bench.runner import default_hooks
from madlens.cli import main
from madlens.data import write_jsonl
from madlens.detectors import DETECTORS

ROW_KEYS = {"task", "detector", "hook", "auroc", "auroc_ci", "ap", "fpr_at_95tpr", "n_normal",
            "n_anomalous", "fit_s", "score_s"}  # fmt: skip


@pytest.fixture(scope="module")
def task_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    lines = [{"text": f"The weather today is nice, number {i}.", "split": "trusted"}
             for i in range(40)]  # fmt: skip
    lines += [{"text": f"The weather later is fine, number {i}.", "split": "test", "label": 0}
              for i in range(12)]  # fmt: skip
    lines += [{"text": "".join(rng.choice(list("#@!%&*")) for _ in range(30)), "split": "test",
               "label": 1} for _ in range(12)]  # fmt: skip
    return write_jsonl(tmp_path_factory.mktemp("task") / "weather.jsonl", lines)


@pytest.fixture(scope="module")
def bench_run(task_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    doc, results = run_bench([], None, None, "tiny-test", task_file, quick=True, out=out,
                             progress=False)  # fmt: skip
    return out, doc, results


def test_results_json_follows_the_contract(bench_run):
    out, doc, results = bench_run
    saved = json.loads((out / "results.json").read_text())
    assert {"madlens_version", "model", "created", "rows"} <= set(saved)
    assert saved["model"] == "tiny-test"
    hooks = default_hooks(2)
    for row in saved["rows"]:
        assert ROW_KEYS <= set(row)
        assert row["n_normal"] == 12 and row["n_anomalous"] == 12
    detectors = {r["detector"] for r in saved["rows"]}
    assert detectors == set(DETECTORS)
    mahalanobis_hooks = {r["hook"] for r in saved["rows"] if r["detector"] == "mahalanobis"}
    assert mahalanobis_hooks == {*hooks, "+".join(hooks)}
    assert {r["hook"] for r in saved["rows"] if r["detector"] == "perplexity"} == {"output"}


def test_metrics_equal_sklearn_on_the_stored_scores(bench_run):
    _, doc, results = bench_run
    result = results[0]
    for row in doc["rows"]:
        if row.get("status") == "n/a":  # a detector that cannot run on this task
            assert row["auroc"] is None and row["reason"]
            continue
        scores = result.scores[(row["detector"], row["hook"])]
        assert row["auroc"] == pytest.approx(roc_auc_score(result.task.labels, scores))
        assert row["ap"] == pytest.approx(average_precision_score(result.task.labels, scores))
        lo, hi = row["auroc_ci"]
        assert lo <= row["auroc"] + 1e-9 and row["auroc"] <= hi + 1e-9


def test_random_strings_are_caught(bench_run):
    _, doc, _ = bench_run
    best = max(r["auroc"] for r in doc["rows"] if "skyline" not in r["detector"] and r["auroc"])
    assert best > 0.9


def test_report_renders_in_chromium(bench_run):
    out, doc, _ = bench_run
    dom = dump_dom(out / "report.html")
    assert '<table id="headline">' in dom
    # one headline row per task, one cell per detector
    assert dom.count('<td class="l">weather</td>') >= 1
    assert dom.count('class="roc"') >= 2 and dom.count('class="bar"') > 10
    assert 'class="layer"' in dom


def test_rerun_reads_the_activation_cache(task_file, tmp_path, monkeypatch):
    run_bench([], ["mahalanobis"], None, "tiny-test", task_file, quick=True, progress=False)

    def fail(*args, **kwargs):
        raise AssertionError("activations recomputed")

    monkeypatch.setattr(capture_module, "_run_batch", fail)
    doc, _ = run_bench([], ["mahalanobis"], None, "tiny-test", task_file, quick=True,
                       progress=False)  # fmt: skip
    assert all(np.isfinite(r["auroc"]) for r in doc["rows"])


def test_cli_bench_bad_task_file_is_one_line(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "split": "trusted"}\n{"text": "b", "split": "test"}\n')
    monkeypatch.setattr(sys, "argv", ["madlens", "bench", "--model", "tiny-test", "--task-file",
                                      str(bad), "--out", str(tmp_path / "o")])  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "bad.jsonl:2: a test line needs 'label'" in err and len(err.strip().splitlines()) == 1
