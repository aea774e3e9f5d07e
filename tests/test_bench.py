import json
import sys

import numpy as np
import pytest
from browser import dump_dom
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.preprocessing import StandardScaler

from madlens import bench as bench_module
from madlens.activations import capture as capture_module
from madlens.bench import format_table, problems, run_bench
from madlens.bench.runner import _two_fold, default_hooks, shortcut_rows
from madlens.bench.shortcuts import generic_views, split_verdicts
from madlens.cli import main
from madlens.data import write_jsonl
from madlens.detectors import DETECTORS, QUE
from madlens.errors import MadlensError
from madlens.models.tiny import tiny_tokenizer
from madlens.tasks import Task

ROW_KEYS = {"task", "detector", "hook", "auroc", "auroc_ci", "ap", "fpr_at_95tpr", "tpr_at_1fpr",
            "tpr_at_1fpr_ci", "n_normal", "n_anomalous", "fit_s", "score_s", "status"}  # fmt: skip


@pytest.fixture(scope="module")
def task_file(weather_task_file):
    return weather_task_file


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
    detectors = {r["detector"] for r in saved["rows"] if r["hook"] != "shortcut"}
    assert detectors == set(DETECTORS)
    shortcuts = [r for r in saved["rows"] if r["hook"] == "shortcut"]
    assert {r["detector"] for r in shortcuts} == {"shortcut:length", "shortcut:novel-tokens"}
    assert all(r["supervised"] for r in shortcuts)
    assert saved["tasks"]["weather"]["shortcuts"] == ["length", "novel-tokens"]
    mahalanobis_hooks = {r["hook"] for r in saved["rows"] if r["detector"] == "mahalanobis"}
    assert mahalanobis_hooks == {*hooks, "+".join(hooks)}
    assert {r["hook"] for r in saved["rows"] if r["detector"] == "perplexity"} == {"output"}
    exclusion = [r for r in saved["rows"] if r["detector"] == "exclusion-probe"]
    assert [(r["status"], r["reason"]) for r in exclusion] == [
        ("n/a", "the task has no measurements (Task.measured)")
    ]


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
    best = max(r["auroc"] for r in doc["rows"] if r["detector"] in DETECTORS
               and not DETECTORS[r["detector"]].supervised and r["auroc"])  # fmt: skip
    assert best > 0.9


def test_report_renders_in_chromium(bench_run):
    out, doc, _ = bench_run
    dom = dump_dom(out / "report.html")
    assert '<table id="headline">' in dom
    # one headline row per task, one cell per detector
    assert dom.count('<td class="l">weather</td>') >= 1
    assert dom.count('class="roc"') >= 2 and dom.count('class="bar"') > 10
    assert 'class="layer"' in dom
    # the shortcut baselines and the goal, with its verdict stated
    assert '<table id="shortcuts">' in dom and dom.count('class="shortcut"') == 2
    assert "shortcut NOT controlled" in dom  # symbol strings are longer and novel
    assert '<table id="goal">' in dom and "not assessable" in dom
    assert "chosen on test labels = optimistic" in dom


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


def test_terminal_matrix_fits_a_screen_and_shows_supervised_apart(bench_run):
    _, doc, results = bench_run
    text = format_table(doc, results)
    lines = text.splitlines()
    assert len(lines) <= len(DETECTORS) + 6 + 6  # + shortcut baselines and the goal
    assert max(len(line) for line in lines) <= 100
    at = lines.index(next(line for line in lines if line.startswith("shortcut baselines")))
    length = next(r for r in doc["rows"] if r["detector"] == "shortcut:length")
    assert f"length={length['auroc']:.2f}" in lines[at + 1]
    assert lines[at + 1].endswith("shortcut NOT controlled")
    assert "weather: no split controlled for its shortcuts" in text
    # the best label-free detector's recall at 1% FPR with its bootstrap CI, and of how many
    whole = doc["tasks"]["weather"]["goal"]["uncontrolled"]
    headline = {"+".join(default_hooks(2)), "output", "black-box"}
    free = [r for r in doc["rows"] if r["task"] == "weather" and r["hook"] in headline
            and not DETECTORS[r["detector"]].supervised and r["status"] == "ok"]  # fmt: skip
    best = next(r for r in free if r["detector"] == whole["detector"])
    assert best["auroc"] == max(r["auroc"] for r in free) and whole["of"] == len(free)
    recall = "{:.2f} [{:.2f}, {:.2f}]".format(best["tpr_at_1fpr"], *best["tpr_at_1fpr_ci"])
    assert f"{recall} (best of {whole['of']})" in text
    supervised_at = lines.index("supervised (cross-fitted):")
    for name, cls in DETECTORS.items():
        at = next(i for i, line in enumerate(lines) if line.split()[:1] == [name])
        assert (at > supervised_at) == cls.supervised
    maha = next(r for r in doc["rows"] if r["detector"] == "mahalanobis" and "+" in r["hook"])
    row = next(line for line in lines if line.startswith("mahalanobis "))
    assert f"{maha['auroc']:.2f}/{maha['tpr_at_1fpr']:.2f}" in row
    verbose = format_table(doc, results, verbose=True).splitlines()
    assert len(verbose) == len(doc["rows"]) + 2


def test_a_detector_that_raises_is_an_error_row(task_file, monkeypatch):
    def broken(self, trusted, untrusted, **fit_inputs):
        raise ValueError("planted failure")

    monkeypatch.setattr(QUE, "_fit", broken)
    doc, _ = run_bench([], ["que", "mahalanobis"], None, "tiny-test", task_file, quick=True,
                       progress=False)  # fmt: skip
    errors = [r for r in doc["rows"] if r["status"] == "error"]
    assert errors and {r["detector"] for r in errors} == {"que"}
    assert all(r["auroc"] is None and "planted failure" in r["reason"] for r in errors)
    assert {r["hook"] for r in errors} == {r["hook"] for r in doc["rows"]
                                           if r["detector"] == "mahalanobis"}  # fmt: skip
    found = problems(doc)
    assert len(found) == len(errors) and "que at" in found[0]


def test_untrusted_lines_are_what_batch_detectors_fit_on(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    lines = [{"text": f"A calm sentence, number {i}.", "split": "trusted"} for i in range(30)]
    lines += [{"text": f"An unlabeled sentence {i}.", "split": "untrusted"} for i in range(7)]
    lines += [{"text": f"A calm sentence, later {i}.", "split": "test", "label": 0}
              for i in range(6)]  # fmt: skip
    lines += [{"text": "".join(rng.choice(list("#@!%")) for _ in range(20)), "split": "test",
               "label": 1} for _ in range(6)]  # fmt: skip
    path = write_jsonl(tmp_path / "t.jsonl", lines)
    seen = []
    real = QUE._fit

    def spy(self, trusted, untrusted, **fit_inputs):
        seen.append((len(trusted), len(untrusted)))
        return real(self, trusted, untrusted, **fit_inputs)

    monkeypatch.setattr(QUE, "_fit", spy)
    doc, _ = run_bench([], ["que"], None, "tiny-test", path, quick=True, progress=False)
    assert seen and set(seen) == {(30, 7)}
    assert all(r["status"] == "ok" for r in doc["rows"])


def test_bad_arguments_fail_before_any_task_is_built(task_file, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("a task was built")

    monkeypatch.setattr(bench_module, "build_task", never)
    for kwargs, message in [
        ({"detectors": ["nope"]}, "unknown detector 'nope'"),
        ({"dtype": "float8"}, "unknown dtype 'float8'"),
        ({"hooks": ["blocks.9.hook_resid_post"]}, "blocks.9"),
    ]:
        args = {"tasks": ["ood"], "model": "tiny-test", "progress": False} | kwargs
        with pytest.raises(MadlensError, match=message):
            run_bench(**args)


def test_per_head_hooks_are_read_as_vectors(task_file):
    doc, _ = run_bench([], ["mahalanobis", "knn"], ["blocks.1.attn.hook_z"], "tiny-test",
                       task_file, quick=True, progress=False)  # fmt: skip
    assert {r["hook"] for r in doc["rows"]} == {"blocks.1.attn.hook_z", "shortcut"}
    assert all(r["status"] == "ok" and r["auroc"] > 0.5 for r in doc["rows"])


def test_cli_bench_exits_2_when_a_detector_raises(task_file, tmp_path, monkeypatch, run_cli):
    def broken(self, trusted, untrusted, **fit_inputs):
        raise ValueError("planted failure")

    monkeypatch.setattr(QUE, "_fit", broken)
    code, out, err = run_cli("bench", "--model", "tiny-test", "--task-file", str(task_file),
                             "--detectors", "que,knn", "--out", str(tmp_path / "o"))  # fmt: skip
    errors = [line for line in err.splitlines() if line.startswith("error:")]  # not progress bars
    assert code == 2 and len(errors) == 1 and "Traceback" not in err
    assert "que at" in errors[0] and "planted failure" in errors[0]
    assert next(line for line in out.splitlines() if line.startswith("que ")).split()[-1] == "error"
    saved = json.loads((tmp_path / "o" / "results.json").read_text())
    assert {r["status"] for r in saved["rows"] if r["detector"] == "que"} == {"error"}
    args = ["--task-file", str(task_file), "--detectors", "knn", "--out", str(tmp_path / "v")]
    code, out, _ = run_cli("bench", "--model", "tiny-test", "--verbose", *args)
    assert code == 0 and "R@1%" in out.splitlines()[0]


# --- shortcut baselines ----------------------------------------------------------------------


def _cue_task(cue: list[str], labels: np.ndarray, **kwargs) -> Task:
    test = [f"input {i}" for i in range(len(labels))]
    return Task(name="cue", model="tiny-test", trusted=["a trusted input"], test=test,
                labels=labels, shortcuts={"colour": cue}, **kwargs)  # fmt: skip


def _sklearn_cross_fit(cue: list[str], labels: np.ndarray, seed: int) -> float:
    """The reference: bag of words into a logistic regression, fitted on one fold and
    scored on the other, both ways, with scikit-learn alone."""
    scores = np.zeros(len(labels))
    first, second = _two_fold(labels, seed)
    for train, held in ((first, second), (second, first)):
        words = CountVectorizer(token_pattern=r"(?u)\b\w+\b").fit([cue[i] for i in train])
        model = LogisticRegression().fit(words.transform([cue[i] for i in train]), labels[train])
        scores[held] = model.decision_function(words.transform([cue[i] for i in held]))
    return roc_auc_score(labels, scores)


def test_a_cue_that_separates_gives_auroc_one_as_sklearn_does():
    labels = np.r_[np.zeros(30), np.ones(30)].astype(int)
    cue = ["the red door" if y == 0 else "the blue door" for y in labels]
    task = _cue_task(cue, labels)
    (row,) = shortcut_rows(task, task.shortcuts, seed=0, n_resamples=50)
    assert row["detector"] == "shortcut:colour" and row["hook"] == "shortcut"
    assert row["supervised"] and row["status"] == "ok"
    assert row["auroc"] == pytest.approx(_sklearn_cross_fit(cue, labels, 0)) == 1.0
    assert split_verdicts([row]) == {"cue": False}


def test_a_balanced_cue_gives_about_half_as_sklearn_does():
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(200), np.ones(200)].astype(int)
    cue = [str(c) for c in rng.choice(["red", "blue", "green"], size=len(labels))]
    task = _cue_task(cue, labels)
    (row,) = shortcut_rows(task, task.shortcuts, seed=3, n_resamples=50)
    reference = _sklearn_cross_fit(cue, labels, 3)
    assert row["auroc"] == pytest.approx(reference)
    assert abs(row["auroc"] - 0.5) < 0.1 and split_verdicts([row]) == {"cue": True}


def test_a_numeric_cue_and_a_controlled_group_split():
    labels = np.r_[np.zeros(40), np.ones(40)].astype(int)
    groups = ["plain"] * 20 + ["framed"] * 20 + ["attack"] * 40
    # the cue is the number of words of a framing: present on framed normals and attacks
    framing = np.array([0.0] * 20 + [5.0] * 20 + [5.0] * 40)
    task = Task(name="cue", model="tiny-test", trusted=["x"], test=[f"t{i}" for i in range(80)],
                labels=labels, groups=groups, shortcuts={"framing": framing},
                controls={"attack": ["framed"]})  # fmt: skip
    rows = {r["task"]: r for r in shortcut_rows(task, task.shortcuts, seed=0, n_resamples=50)}
    # the whole task: framed in half the normals, every attack: a step AUROC of 0.75
    first, second = _two_fold(labels, 0)
    scores = np.zeros(80)
    for train, held in ((first, second), (second, first)):
        scale = StandardScaler().fit(framing[train, None])
        model = LogisticRegression().fit(scale.transform(framing[train, None]), labels[train])
        scores[held] = model.decision_function(scale.transform(framing[held, None]))
    assert rows["cue"]["auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert rows["cue"]["auroc"] == pytest.approx(0.75, abs=0.03)
    # the attacks against their control: the cue is the same everywhere, nothing to separate
    controlled = rows["cue/attack"]
    assert controlled["status"] == "n/a" and controlled["constant"]
    assert (controlled["n_normal"], controlled["n_anomalous"]) == (20, 40)
    assert split_verdicts(list(rows.values())) == {"cue": False, "cue/attack": True}


def test_generic_cues_are_token_counts_of_the_task_tokenizer():
    tokenizer = tiny_tokenizer()
    trusted = ["the cat sat", "a dog ran"]
    test = ["the cat ran", "zebra quartz"]
    task = Task(name="g", model="tiny-test", trusted=trusted, test=test, labels=[0, 1])
    views = generic_views(task, tokenizer, 512)
    ids = [tokenizer(t)["input_ids"] for t in test]
    seen = {i for t in trusted for i in tokenizer(t)["input_ids"]}
    np.testing.assert_array_equal(views["length"], [len(x) for x in ids])
    np.testing.assert_array_equal(views["novel-tokens"], [sum(i not in seen for i in x)
                                                          for x in ids])  # fmt: skip
    assert views["novel-tokens"][0] == 0 < views["novel-tokens"][1]


def test_controls_must_map_anomalous_groups_to_normal_ones():
    labels = np.array([0, 0, 1])
    with pytest.raises(MadlensError, match="controls maps an anomalous test group"):
        Task(name="c", model="tiny-test", trusted=["x"], test=["a", "b", "c"], labels=labels,
             groups=["n", "m", "a"], controls={"n": ["m"]})  # fmt: skip
