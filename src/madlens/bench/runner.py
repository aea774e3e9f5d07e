"""The bench runner: tasks x detectors x hooks -> one results row each (AUROC and recall at
1% FPR with their bootstrap CIs, AP, FPR@95TPR, timings, status), plus the shortcut
baselines (`shortcut:<cue>` rows) and the scores the report plots. It asks each detector
what it needs (its declarations), never switches on names."""

import time
import warnings
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from tqdm.auto import tqdm

from madlens import __version__
from madlens.activations.capture import context_limit
from madlens.bench.shortcuts import (
    PREFIX,
    SHORTCUT_HOOK,
    constant,
    cue_scores,
    generic_views,
    is_text,
    task_goals,
)
from madlens.detectors import DETECTORS, ContrastPairs
from madlens.errors import MadlensError
from madlens.metrics import evaluate
from madlens.models import load_model, parse_hooks
from madlens.monitor import Features, Monitor, default_hooks
from madlens.tasks import Task


@dataclass
class TaskResult:
    """Everything the bench measured on one task."""

    task: Task
    rows: list[dict[str, Any]] = field(default_factory=list)
    scores: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    seconds: float = 0.0


def default_detectors() -> list[str]:
    """Every registered detector."""
    return list(DETECTORS)


def multi_hook_name(hooks: list[str]) -> str:
    """The row label of the multi-hook aggregate over `hooks`."""
    return "+".join(hooks)


def headline_hook(result: "TaskResult") -> str:
    """The hook a task's headline uses: its multi-hook aggregate, or its only hook."""
    hooks = [h for _, h in result.scores if h not in ("output", "black-box", "n/a", SHORTCUT_HOOK)]
    multi = [h for h in hooks if "+" in h]
    return multi[0] if multi else (hooks or [""])[0]


def unavailable(name: str, task: Task) -> str | None:
    """Why detector `name` cannot run on `task` (None when it can): it becomes an n/a row."""
    cls = DETECTORS[name]
    if cls.contrast_source == "task" and task.contrast is None:
        return "the task has no contrast pairs (Task.contrast)"
    if cls.reads_measurements and task.measured is None:
        return "the task has no measurements (Task.measured)"
    return cls.cannot_read(task.test)


def na_row(
    task: Task, detector: str, reason: str, hook: str = "n/a", status: str = "n/a"
) -> dict[str, Any]:
    """A results row without metrics: `n/a` (the detector cannot run on the task) or `error`
    (it raised), with the reason."""
    nan2 = [None, None]
    return {
        "task": task.name, "detector": detector, "hook": hook, "auroc": None, "auroc_ci": nan2,
        "ap": None, "fpr_at_95tpr": None, "tpr_at_1fpr": None, "tpr_at_1fpr_ci": nan2,
        "n_normal": int((task.labels == 0).sum()), "n_anomalous": int(task.labels.sum()),
        "fit_s": 0.0, "score_s": 0.0, "status": status, "reason": reason,
    }  # fmt: skip


def _two_fold(labels: np.ndarray, seed: int) -> list[np.ndarray]:
    """Stratified split of the test set into two folds (for skylines and shortcut
    baselines)."""
    rng = np.random.default_rng(seed)
    folds = np.zeros(len(labels), dtype=int)
    for cls in (0, 1):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        folds[idx[len(idx) // 2 :]] = 1
    return [np.flatnonzero(folds == f) for f in (0, 1)]


def _fit_score(
    monitor: Monitor,
    trusted: Features,
    untrusted: Features | None,
    test: Features,
    labels: np.ndarray,
    contrast: dict[str, ContrastPairs],
    seed: int,
    measured: tuple[ArrayLike, ArrayLike] | None = None,
) -> tuple[np.ndarray, float, float]:
    """Fit a one-detector monitor and score the test set; returns (scores, fit_s, score_s).

    Supervised detectors see labels, so they are cross-fitted: trained on one half of the
    test set and scored on the other, both ways. Detectors that use the unlabeled untrusted
    batch fit on it."""
    name = monitor.detectors[0]
    if DETECTORS[name].supervised:
        scores = np.zeros(len(labels))
        fit_s = score_s = 0.0
        first, second = _two_fold(labels, seed)
        for train, held in ((first, second), (second, first)):
            start = time.perf_counter()
            monitor.fit_features(trusted, test.take(train), labels=labels[train])
            fit_s += time.perf_counter() - start
            start = time.perf_counter()
            scores[held] = monitor.score_features(test.take(held)).scores[name]
            score_s += time.perf_counter() - start
        return scores, fit_s, score_s
    start = time.perf_counter()
    monitor.fit_features(trusted, untrusted, contrast=contrast, measured=measured)
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    scores = monitor.score_features(test).scores[name]
    return scores, fit_s, time.perf_counter() - start


def _row(task: str, detector: str, hook: str, labels: np.ndarray, scores: np.ndarray,
         fit_s: float, score_s: float, n_resamples: int, seed: int) -> dict[str, Any]:  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics = evaluate(labels, scores, n_resamples=n_resamples, seed=seed)
    return {
        "task": task, "detector": detector, "hook": hook, "auroc": metrics["auroc"],
        "auroc_ci": metrics["auroc_ci"], "ap": metrics["ap"],
        "fpr_at_95tpr": metrics["fpr_at_95tpr"], "tpr_at_1fpr": metrics["tpr_at_1fpr"],
        "tpr_at_1fpr_ci": metrics["tpr_at_1fpr_ci"], "n_normal": metrics["n_normal"],
        "n_anomalous": metrics["n_anomalous"],
        "fit_s": round(fit_s, 4), "score_s": round(score_s, 4), "status": "ok",
    }  # fmt: skip


def run_task(
    task: Task,
    detectors: list[str],
    hooks: list[str] | None = None,
    seed: int = 0,
    n_resamples: int = 1000,
    progress: bool = True,
    dtype: str = "auto",
    device: str = "auto",
    engine: str = "local",
    ray_address: str | None = None,
) -> TaskResult:
    """Run every detector on one task, per hook and on the multi-hook aggregate, with the
    task's model on `device`. `engine="ray"` extracts the task's activations through Ray
    workers first (`madlens.scale`, at `ray_address`); the rows are the same."""
    start = time.perf_counter()
    unknown = [d for d in detectors if d not in DETECTORS]
    if unknown:
        raise MadlensError(f"unknown detector '{unknown[0]}'; known: {', '.join(DETECTORS)}")
    result = TaskResult(task)
    reasons = {name: unavailable(name, task) for name in detectors}
    for name, reason in reasons.items():
        if reason is not None:
            result.rows.append(na_row(task, name, reason))
    detectors = [name for name in detectors if reasons[name] is None]
    model = load_model(task.model, dtype=dtype, adapter=task.adapter, device=device)
    hooks = model.check_hooks(
        parse_hooks(",".join(hooks), model.n_layers) if hooks else default_hooks(model.n_layers)
    )
    # A bench row is a one-detector Monitor fitted on the task's trusted split and scored
    # on its test split; the features are read once per task and shared by every row.
    readers = [d for d in detectors if DETECTORS[d].input_kind != "transcripts"]
    base = Monitor(model, hooks, task.position, readers or detectors, holdout=0,
                   progress=progress)  # fmt: skip
    trusted = test = untrusted = None
    contrast: dict[str, ContrastPairs] = {}
    if readers:
        if engine == "ray":
            _fill_through_ray(base, task, readers, ray_address)
        trusted, test = base.features(task.trusted), base.features(task.test)
        # Batch detectors fit on the task's unlabeled untrusted inputs; without them, on the
        # unlabeled test batch itself (a deployment scoring a batch has it too).
        if task.untrusted is None or task.untrusted == task.test:
            untrusted = test
        elif any(DETECTORS[d].uses_untrusted for d in readers):
            untrusted = base.features(task.untrusted)
        contrast = base.contrast_features(task.contrast)
    labels = task.labels
    jobs: list[tuple[str, str, Monitor, Any, Any, Any]] = []
    for name in detectors:
        cls = DETECTORS[name]
        if cls.input_kind == "transcripts":
            # It queries the model with follow-up questions; it never sees activations.
            # Trusted transcripts count as truthful rows; other trusted inputs are not used.
            one = Monitor(model, hooks, task.position, [name], holdout=0, progress=progress)
            known = [x for x in task.trusted if cls.cannot_read([x]) is None]
            try:
                jobs.append((name, "black-box", one, one.features(known), None,
                             one.features(task.test)))  # fmt: skip
            except Exception as exc:  # noqa: BLE001 - an error row, like a failed fit
                result.rows.append(na_row(task, name, _reason(exc), "black-box", "error"))
            continue
        if cls.input_kind == "outputs":
            one = Monitor(model, hooks, task.position, [name], holdout=0, progress=False)
            jobs.append((name, "output", one, trusted, untrusted, test))
            continue
        for hook_set in [[h] for h in hooks] + ([hooks] if len(hooks) > 1 else []):
            one = Monitor(model, hook_set, task.position, [name], holdout=0, progress=False)
            label = multi_hook_name(hook_set) if len(hook_set) > 1 else hook_set[0]
            jobs.append((name, label, one, trusted, untrusted, test))
    for name, hook, monitor, x_trusted, x_untrusted, x_test in tqdm(
        jobs, desc=f"detectors ({task.name})", disable=not progress
    ):
        try:
            scores, fit_s, score_s = _fit_score(monitor, x_trusted, x_untrusted, x_test, labels,
                                                contrast, seed, task.measured)  # fmt: skip
        except Exception as exc:  # any failure becomes an `error` row, never a lost row
            result.rows.append(na_row(task, name, _reason(exc), hook=hook, status="error"))
            continue
        result.scores[(name, hook)] = scores
        result.rows.append(_row(task.name, name, hook, labels, scores, fit_s, score_s,
                                n_resamples, seed))  # fmt: skip
        for group in _anomalous_groups(task):
            keep = group_split(task, group)
            result.rows.append(_row(f"{task.name}/{group}", name, hook, labels[keep],
                                    scores[keep], fit_s, score_s, n_resamples, seed))  # fmt: skip
    views = generic_views(task, model.tokenizer, context_limit(model)) | task.shortcuts
    result.rows += shortcut_rows(task, views, seed, n_resamples, result.scores)
    result.seconds = time.perf_counter() - start
    return result


def shortcut_rows(
    task: Task,
    views: dict[str, Any],
    seed: int,
    n_resamples: int,
    scores: dict[tuple[str, str], np.ndarray] | None = None,
) -> list[dict[str, Any]]:
    """One `shortcut:<cue>` row per cue and split (the task, and each anomaly kind against
    its normals): a classifier that sees only the cue, cross-fitted on that split's labels
    with the two folds the supervised detectors use. Supervised by construction (an upper
    bound on what the cue gives away), marked `supervised`. The whole task's scores go into
    `scores` (for the report's plots)."""
    splits = [(task.name, np.ones(len(task.labels), dtype=bool))]
    splits += [(f"{task.name}/{g}", group_split(task, g)) for g in _anomalous_groups(task)]
    rows = []
    for cue, view in views.items():
        name = PREFIX + cue
        for split, keep in splits:
            where = np.flatnonzero(keep)
            part = [view[i] for i in where] if is_text(view) else np.asarray(view)[where]
            labels = task.labels[where]
            counts = {"task": split, "n_normal": int((labels == 0).sum()),
                      "n_anomalous": int(labels.sum()), "supervised": True}  # fmt: skip
            if constant(part):
                same = "the cue is the same on every input of this split: it separates nothing"
                rows.append(na_row(task, name, same, SHORTCUT_HOOK) | counts | {"constant": True})
                continue
            start = time.perf_counter()
            try:
                cue_score = cue_scores(part, labels, _two_fold(labels, seed))
            except Exception as exc:  # noqa: BLE001 - an error row, like a failed detector
                rows.append(na_row(task, name, _reason(exc), SHORTCUT_HOOK, "error") | counts)
                continue
            row = _row(split, name, SHORTCUT_HOOK, labels, cue_score,
                       time.perf_counter() - start, 0.0, n_resamples, seed)  # fmt: skip
            if split == task.name and scores is not None:
                scores[(name, SHORTCUT_HOOK)] = cue_score
            rows.append(row | {"supervised": True})
    return rows


def group_split(task: Task, group: str) -> np.ndarray:
    """The test inputs of one anomaly kind's split: that kind and its normals (those
    `Task.controls` names for it, else every normal)."""
    normals = task.controls.get(group)
    return np.array([g == group if y == 1 else normals is None or g in normals
                     for y, g in zip(task.labels, task.groups)])  # fmt: skip


def _fill_through_ray(base: Monitor, task: Task, readers: list[str], address: str | None) -> None:
    """Fill the activation cache through Ray with what `base.features` reads just after
    (the same hooks, position and output statistics as `Monitor.features` asks `extract`
    for), so that those reads find everything cached."""
    from madlens.scale import Request, fill_cache

    reads = base.reads
    hooks = base.hooks if "activations" in reads else []
    outputs = "outputs" in reads
    sets = [task.trusted, task.test]
    if (
        task.untrusted is not None
        and task.untrusted != task.test
        and any(DETECTORS[d].uses_untrusted for d in readers)
    ):
        sets.append(task.untrusted)
    if hooks or outputs:
        requests = [Request(list(inputs), hooks, task.position, logits=outputs,
                            logprobs=outputs) for inputs in sets]  # fmt: skip
        fill_cache(base.model, requests, batch_size=base.batch_size, address=address,
                   progress=base.progress)  # fmt: skip


def _reason(exc: Exception) -> str:
    return str(exc) if isinstance(exc, MadlensError) else f"{type(exc).__name__}: {exc}"


def _anomalous_groups(task: Task) -> list[str]:
    """The anomaly kinds that get their own rows: every kind when there are several, or one
    compared with the normals that control it."""
    groups = sorted({g for g, y in zip(task.groups, task.labels) if y == 1})
    return groups if len(groups) > 1 or task.controls else []


def results_json(model: str, results: list[TaskResult]) -> dict[str, Any]:
    """The `results.json` document (contract in DESIGN.md), plus each task's checks, its
    cues and controls, and its goal summary (`shortcuts.task_goals`)."""
    rows = [row for r in results for row in r.rows]
    label_free = {name for name, cls in DETECTORS.items() if not cls.supervised}
    return {
        "madlens_version": __version__,
        "model": model,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "rows": rows,
        "tasks": {
            r.task.name: {
                "description": r.task.description,
                "checks": r.task.checks,
                "targets": r.task.targets,
                "adapter": r.task.adapter,
                "position": r.task.position,
                "n_trusted": len(r.task.trusted),
                "seconds": round(r.seconds, 1),
                "shortcuts": _cues(r),
                "controls": r.task.controls,
                "goal": task_goals(rows, r.task.name, _headline_hooks(r), label_free),
            }
            for r in results
        },  # fmt: skip
    }


def _cues(result: TaskResult) -> list[str]:
    """The cues the task's shortcut baselines read."""
    rows = [r for r in result.rows if r["hook"] == SHORTCUT_HOOK and r["task"] == result.task.name]
    return [r["detector"].removeprefix(PREFIX) for r in rows]


def _headline_hooks(result: TaskResult) -> set[str]:
    """The hooks of a task's headline rows: its multi-hook aggregate, logits, follow-ups."""
    return {headline_hook(result), "output", "black-box"}
