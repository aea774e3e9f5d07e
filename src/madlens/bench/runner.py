"""The bench runner: tasks x detectors x hooks -> one results row each (AUROC with its
bootstrap CI, AP, FPR@95TPR, recall at 1% FPR, timings, status), plus the scores the report
plots. It asks each detector what it needs (its declarations), never switches on names."""

import time
import warnings
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from madlens import __version__
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
    hooks = [h for _, h in result.scores if h not in ("output", "black-box", "n/a")]
    multi = [h for h in hooks if "+" in h]
    return multi[0] if multi else (hooks or [""])[0]


def unavailable(name: str, task: Task) -> str | None:
    """Why detector `name` cannot run on `task` (None when it can): it becomes an n/a row."""
    cls = DETECTORS[name]
    if cls.contrast_source == "task" and task.contrast is None:
        return "the task has no contrast pairs (Task.contrast)"
    return cls.cannot_read(task.test)


def na_row(
    task: Task, detector: str, reason: str, hook: str = "n/a", status: str = "n/a"
) -> dict[str, Any]:
    """A results row without metrics: `n/a` (the detector cannot run on the task) or `error`
    (it raised), with the reason."""
    nan2 = [None, None]
    return {
        "task": task.name, "detector": detector, "hook": hook, "auroc": None, "auroc_ci": nan2,
        "ap": None, "fpr_at_95tpr": None, "tpr_at_1fpr": None,
        "n_normal": int((task.labels == 0).sum()), "n_anomalous": int(task.labels.sum()),
        "fit_s": 0.0, "score_s": 0.0, "status": status, "reason": reason,
    }  # fmt: skip


def _two_fold(labels: np.ndarray, seed: int) -> list[np.ndarray]:
    """Stratified split of the test set into two folds (for skylines)."""
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
    monitor.fit_features(trusted, untrusted, contrast=contrast)
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
        "n_normal": metrics["n_normal"], "n_anomalous": metrics["n_anomalous"],
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
                                                contrast, seed)  # fmt: skip
        except Exception as exc:  # any failure becomes an `error` row, never a lost row
            result.rows.append(na_row(task, name, _reason(exc), hook=hook, status="error"))
            continue
        result.scores[(name, hook)] = scores
        result.rows.append(_row(task.name, name, hook, labels, scores, fit_s, score_s,
                                n_resamples, seed))  # fmt: skip
        for group in _anomalous_groups(task):
            keep = np.array([y == 0 or g == group for y, g in zip(labels, task.groups)])
            result.rows.append(_row(f"{task.name}/{group}", name, hook, labels[keep],
                                    scores[keep], fit_s, score_s, n_resamples, seed))  # fmt: skip
    result.seconds = time.perf_counter() - start
    return result


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
    groups = sorted({g for g, y in zip(task.groups, task.labels) if y == 1})
    return groups if len(groups) > 1 else []


def results_json(model: str, results: list[TaskResult]) -> dict[str, Any]:
    """The `results.json` document (contract in DESIGN.md), plus each task's checks."""
    return {
        "madlens_version": __version__,
        "model": model,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "rows": [row for r in results for row in r.rows],
        "tasks": {
            r.task.name: {
                "description": r.task.description,
                "checks": r.task.checks,
                "targets": r.task.targets,
                "adapter": r.task.adapter,
                "position": r.task.position,
                "n_trusted": len(r.task.trusted),
                "seconds": round(r.seconds, 1),
            }
            for r in results
        },  # fmt: skip
    }
