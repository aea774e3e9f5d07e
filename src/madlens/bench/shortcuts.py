"""Shortcut baselines: classifiers that see only a cue other than the mechanism (the input's
length, its tokens unseen in trusted data, a task's own `Task.shortcuts`), cross-fitted on
the test labels, and the verdicts built on them: is a split controlled, is the goal met."""

import math
import re
from typing import Any

import numpy as np
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from madlens.activations.positions import encode
from madlens.tasks import Task

SHORTCUT_HOOK = "shortcut"  # the `hook` of every shortcut-baseline row
PREFIX = "shortcut:"  # a shortcut baseline's row is named `shortcut:<cue>`
CONTROLLED_MAX = 0.6  # a split is controlled when no cue alone reaches a higher AUROC
GOAL_AUROC, GOAL_RECALL = 0.95, 0.9  # issue 14: a label-free detector on a controlled split
WORDS = r"(?u)\b\w+\b"  # every word, one-letter ones too (`a`, `I`, digits)


def generic_views(task: Task, tokenizer: Any, max_length: int) -> dict[str, np.ndarray]:
    """The two cues every task has, one number per test input, with the task model's
    tokenizer: `length` (tokens in the whole input as the model reads it: the prompt with its
    chat template, or the whole transcript) and `novel-tokens` (how many of its tokens are
    ids that occur in no trusted input)."""

    def ids(item: Any) -> list[int]:
        return encode(tokenizer, item, "all", max_length).input_ids

    seen = {t for item in task.trusted for t in ids(item)}
    test = [ids(item) for item in task.test]
    return {
        "length": np.array([len(x) for x in test], dtype=np.float64),
        "novel-tokens": np.array([sum(t not in seen for t in x) for x in test], dtype=np.float64),
    }


def is_text(view: Any) -> bool:
    """A text view (one string per input) rather than a numeric one."""
    return len(view) > 0 and all(isinstance(v, str) for v in view)


def constant(view: Any) -> bool:
    """The cue is the same on every input: no classifier on it can rank anything."""
    values = list(view) if is_text(view) else np.asarray(view, dtype=np.float64).tolist()
    return len(set(values)) <= 1


def cue_scores(view: Any, labels: np.ndarray, folds: list[np.ndarray]) -> np.ndarray:
    """Cross-fitted scores of a classifier that sees only the cue: fitted on one fold's
    labels and scored on the other, both ways. A text view is a bag of words
    (`CountVectorizer`) into a logistic regression; a numeric view, the standardised number
    into a logistic regression. Higher = more anomalous (the decision function)."""
    text = is_text(view)
    x = list(view) if text else np.asarray(view, dtype=np.float64).reshape(-1, 1)
    scores = np.zeros(len(labels))
    for train, held in ((folds[0], folds[1]), (folds[1], folds[0])):
        x_train = [x[i] for i in train] if text else x[train]
        if text and not any(re.search(WORDS, t) for t in x_train):
            continue  # no word to learn from in this fold: a constant score
        if text:
            model = make_pipeline(CountVectorizer(token_pattern=WORDS), LogisticRegression())
        else:
            model = make_pipeline(StandardScaler(), LogisticRegression())
        model.fit(x_train, labels[train])
        scores[held] = model.decision_function([x[i] for i in held] if text else x[held])
    return scores


def is_shortcut(row: dict[str, Any]) -> bool:
    """A shortcut-baseline row (supervised by construction, shown apart from detectors)."""
    return row.get("hook") == SHORTCUT_HOOK


def cue(row: dict[str, Any]) -> str:
    """The cue a shortcut row measures (`length` for `shortcut:length`)."""
    return row["detector"].removeprefix(PREFIX)


def controlled(row: dict[str, Any]) -> bool | None:
    """Whether the cue leaves the split controlled (AUROC <= 0.6; a cue that is the same on
    every input is controlled); None when the baseline could not be measured."""
    if row.get("status") == "n/a" and row.get("constant"):
        return True
    value = row.get("auroc")
    if row.get("status", "ok") != "ok" or value is None or not math.isfinite(value):
        return None
    return value <= CONTROLLED_MAX


def split_verdicts(rows: list[dict[str, Any]]) -> dict[str, bool | None]:
    """Per split (`task` or `task/group`) that has shortcut rows: True when every cue is
    controlled, False when one is not, None when one could not be measured (and none
    failed)."""
    out: dict[str, bool | None] = {}
    for row in rows:
        if not is_shortcut(row):
            continue
        ok, before = controlled(row), out.get(row["task"], True)
        both = (ok, before)
        out[row["task"]] = False if False in both else None if None in both else True
    return out


def goal(rows: list[dict[str, Any]], split: str, headline: set[str],
         label_free: set[str]) -> dict[str, Any] | None:  # fmt: skip
    """The issue's goal on one split: a label-free detector with headline AUROC >= 0.95 and
    recall at 1% FPR >= 0.9. `headline`: the hooks of headline rows; `label_free`: the
    detectors that see no labels. Returns the detector shown (one that meets both if any,
    else the highest AUROC), how many were compared (`of`) and whether the goal is met, or
    None when no label-free detector was measured there. The choice looks at test labels,
    so the figure is optimistic: best of `of`."""
    measured = [
        r for r in rows
        if r["task"] == split and r["hook"] in headline and r["detector"] in label_free
        and r.get("status", "ok") == "ok" and r["auroc"] is not None
        and math.isfinite(r["auroc"])
    ]  # fmt: skip
    if not measured:
        return None
    met = [r for r in measured if r["auroc"] >= GOAL_AUROC and r["tpr_at_1fpr"] >= GOAL_RECALL]
    best = max(met or measured, key=lambda r: (r["auroc"], r["tpr_at_1fpr"]))
    return {"split": split, "detector": best["detector"], "auroc": best["auroc"],
            "auroc_ci": best["auroc_ci"], "tpr_at_1fpr": best["tpr_at_1fpr"],
            "tpr_at_1fpr_ci": best.get("tpr_at_1fpr_ci"), "of": len(measured),
            "met": bool(met)}  # fmt: skip


def task_goals(rows: list[dict[str, Any]], task: str, headline: set[str],
               label_free: set[str]) -> dict[str, Any]:  # fmt: skip
    """A task's goal summary: the splits controlled for every cue, the goal on each of them
    (`goals`), and, when none is controlled, the goal on the whole task (`uncontrolled`), so
    nothing is hidden."""
    verdicts = {s: v for s, v in split_verdicts(rows).items()
                if s == task or s.startswith(task + "/")}  # fmt: skip
    splits = [s for s, v in verdicts.items() if v]
    goals = [g for s in splits if (g := goal(rows, s, headline, label_free)) is not None]
    return {
        "controlled_splits": splits,
        "uncontrolled_splits": [s for s, v in verdicts.items() if v is False],
        "goals": goals,
        "uncontrolled": None if splits else goal(rows, task, headline, label_free),
    }
