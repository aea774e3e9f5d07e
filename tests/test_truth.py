"""Truth datasets (counts, balance, determinism), the truth sweep on tiny-test, truth.html in
Chromium, the CLI, and the bench's n/a rows and task-contrast detectors."""

import json

import numpy as np
import pytest
from browser import dump_dom

from madlens.bench import format_table, render_report
from madlens.bench.runner import results_json, run_task
from madlens.data.truth import TRUTH_DATASETS, capital_rows, truth_dataset
from madlens.tasks import Task
from madlens.truth import truth_sweep
from madlens.truth.report import write_truth_outputs


@pytest.mark.parametrize(
    "name, n",
    [("larger_than", 45 * 44), ("smaller_than", 45 * 44), ("capitals", 2 * len(capital_rows()))],
)
def test_exact_counts(name, n):
    assert len(TRUTH_DATASETS[name]()) == n


def test_balanced_deterministic_and_distinct():
    for name, build in TRUTH_DATASETS.items():
        data = build()
        assert sum(data.labels) * 2 == len(data), name
        assert len(set(data.statements)) == len(data), name
        assert build().statements == data.statements
        sub = truth_dataset(name, 50, seed=3)
        assert len(sub) == 50 and sum(sub.labels) == 25
        assert truth_dataset(name, 50, seed=3).statements == sub.statements
    assert truth_dataset("cities", seed=1).statements != truth_dataset("cities").statements


def test_statements_and_pairs():
    larger = truth_dataset("larger_than")
    assert "Fifty-one is larger than fifty-two." in larger.statements
    i = larger.statements.index("Ninety-nine is larger than fifty-one.")
    assert larger.labels[i] == 1
    cities, neg = truth_dataset("cities"), truth_dataset("neg_cities")
    assert neg.statements[0] == cities.statements[0].replace(" is in ", " is not in ")
    assert neg.labels == [1 - y for y in cities.labels]
    pos, negs = cities.contrast()
    assert len(pos) == len(negs) == len(cities)
    assert pos[0][:-1] == negs[0][:-1]
    assert (pos[0][-1]["content"], negs[0][-1]["content"]) == ("True", "False")


@pytest.fixture(scope="module")
def sweep_doc(tiny, tmp_path_factory):
    doc = truth_sweep(tiny, ["larger_than", "capitals"], n=24, progress=False)
    out = tmp_path_factory.mktemp("truth")
    write_truth_outputs(doc, out)
    return doc, out


def test_sweep_document(sweep_doc):
    doc, out = sweep_doc
    saved = json.loads((out / "truth.json").read_text())
    assert saved["hooks"] == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    for d in saved["datasets"].values():
        assert set(d["methods"]) == {"ccs", "crc-tpc", "random", "logistic"}
        for by_hook in d["methods"].values():
            for v in by_hook.values():
                assert v["accuracy_sign_fixed"] == pytest.approx(
                    max(v["accuracy"], 1 - v["accuracy"])
                )
        assert 0 <= d["zero_shot"]["accuracy"] <= 1
    assert set(saved["transfer"]["ccs"]["larger_than"]) == {"larger_than", "capitals"}
    assert "mean_gain_points" in saved["summary"]


def test_truth_html_renders_in_chromium(sweep_doc):
    _, out = sweep_doc
    dom = dump_dom(out / "truth.html")
    assert 'id="summary"' in dom and dom.count('class="transfer"') == 3
    assert dom.count('class="curve"') >= 2 * 8
    assert "http" not in dom.replace("http://www.w3.org/2000/svg", "")


def test_cli_bad_input_is_one_line(run_cli, tmp_path):
    code, _, err = run_cli("truth", "sweep", "--model", "tiny-test", "--datasets",
                           "cities,nope", "--out", str(tmp_path))  # fmt: skip
    assert code == 2 and err.strip().count("\n") == 0 and "nope" in err


def _conv(question, answer, system=None):
    head = [{"role": "system", "content": system}] if system else []
    return head + [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def test_bench_runs_task_contrast_detectors_and_lists_n_a(tiny, tmp_path):
    rng = np.random.default_rng(0)
    words = ["red", "blue", "green", "cold", "warm", "tall", "short", "fast"]

    def answers(k, system=None):
        return [_conv(f"Say a word ({i})?", f"{rng.choice(words)} {rng.choice(words)}.", system)
                for i in range(k)]  # fmt: skip

    lying = Task(
        name="toy-lying", model="tiny-test", trusted=answers(12), position="mean",
        test=answers(10) + answers(10, "Lie to the user."), labels=np.r_[np.zeros(10), np.ones(10)],
        contrast=(answers(8), answers(8, "Lie.")),
    )  # fmt: skip
    texts = Task(name="toy-text", model="tiny-test", trusted=["a b c", "d e f"],
                 test=["x y", "z z z", "q"], labels=[0, 1, 1])  # fmt: skip
    detectors = ["ccs", "crc-tpc", "lie-detector", "mahalanobis"]
    results = [run_task(t, detectors, None, 0, 50, progress=False, dtype="float32")
               for t in (lying, texts)]  # fmt: skip
    doc = results_json("tiny-test", results)
    rows = {(r["task"], r["detector"], r["hook"]): r for r in doc["rows"]}
    assert ("toy-lying", "lie-detector", "black-box") in rows
    assert ("toy-lying", "ccs", "blocks.0.hook_resid_post+blocks.1.hook_resid_post") in rows
    na = {(r["detector"]): r["reason"] for r in doc["rows"] if r.get("status") == "n/a"}
    assert set(na) == {"ccs", "crc-tpc", "lie-detector"}
    assert "contrast" in na["ccs"] and "transcripts" in na["lie-detector"]
    matrix = format_table(doc, results).splitlines()
    for name in ("ccs", "crc-tpc", "lie-detector"):  # n/a on toy-text, the second column
        assert next(line for line in matrix if line.startswith(name + " ")).split()[-1] == "n/a"
    table = format_table(doc, results, verbose=True)
    assert table.count("n/a") >= 3 and "no contrast pairs" in table
    (tmp_path / "report.html").write_text(render_report(doc, results))
    html = (tmp_path / "report.html").read_text()
    assert "id='not-applicable'" in html and "no contrast pairs" in html
    json.dumps(doc)  # n/a rows are plain JSON (null metrics)
