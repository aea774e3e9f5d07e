"""`reward-outliers`: on the over-optimisation sample pool, the completions a proxy reward
over-rates most against the gold reward; can label-free detectors catch them from activations?"""

import time
from dataclasses import asdict
from typing import Any

import numpy as np

from madlens.detectors import DETECTORS, get_detector
from madlens.lab.base import Experiment, LabResult, Section
from madlens.lab.overoptimization import FULL, QUICK, Budget, build_pool
from madlens.metrics import evaluate
from madlens.report import esc, figure, fmt, plot, roc_chart

REFERENCE = (
    "Heavy-tailed reward errors and catastrophic Goodhart (Kwa, Thomas & Garriga-Alonso "
    "2024, arXiv:2407.14503); Gao, Schulman & Hilton 2022 for the proxy / gold setting"
)
FINDING = (
    "Rare outputs whose proxy reward far exceeds their true reward drive over-optimisation; "
    "the hope is that such outliers are anomalous in the policy's activations and so can be "
    "caught by an anomaly detector fitted on ordinary outputs."
)
# The share of test completions called outliers: the largest proxy-minus-gold z-score gaps.
OUTLIER_SHARE = 0.02
# Bootstrap resamples of each AUROC / recall interval (the metrics dominate the run time).
EVAL_RESAMPLES = 200
DETECTOR_NAMES = ("mahalanobis", "knn", "pca-residual", "lof", "isolation-forest", "spectral")


def zscore(x: np.ndarray) -> np.ndarray:
    """(x - mean) / std over all of `x` (0 where `x` is constant)."""
    std = float(np.std(x))
    return (x - np.mean(x)) / std if std > 0 else np.zeros_like(x, dtype=np.float64)


def outlier_labels(proxy: np.ndarray, gold: np.ndarray, share: float = OUTLIER_SHARE) -> np.ndarray:
    """1 for the `share` of samples with the largest z(proxy) - z(gold) (at least one), else 0:
    the completions the proxy over-rates most relative to the gold reward."""
    gap = zscore(proxy) - zscore(gold)
    k = max(1, int(round(share * len(gap))))
    labels = np.zeros(len(gap), dtype=np.int64)
    labels[np.argsort(-gap, kind="stable")[:k]] = 1
    return labels


def detector_scores(trusted: np.ndarray, test: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Each label-free detector fitted on `trusted` (ordinary completions) and scored on
    `test`; detectors that read an unlabelled batch get `test` as it (no labels either way)."""
    scores = {}
    for name in DETECTOR_NAMES:
        cls = DETECTORS[name]
        params = cls.defaults_for(len(trusted))
        if "seed" in cls._param_names():
            params["seed"] = seed
        if name == "lof":  # its default (20 neighbours) needs more rows than a tiny pool has
            params["n_neighbors"] = min(20, len(trusted) - 1)
        detector = get_detector(name, **params)
        detector.fit(trusted, test if cls.uses_untrusted else None)
        scores[name] = np.asarray(detector.score(test), dtype=np.float64)
    return scores


def measure(
    model: str, budget: Budget, seed: int = 0, progress: bool = False, device: str = "auto"
) -> LabResult:
    """The experiment at any budget (`run` picks the quick or the full one)."""
    start = time.perf_counter()
    pool = build_pool(model, budget, seed, progress, device)
    t = budget.trusted_per_prompt
    width = pool.acts.shape[-1]
    trusted = pool.acts[:, :t].reshape(-1, width)
    test = pool.acts[:, t:].reshape(-1, width)
    gold = pool.gold[:, t:].reshape(-1)
    texts = [text for row in pool.texts for text in row[t:]]
    scores = detector_scores(trusted, test, seed)
    proxies: dict[str, Any] = {}
    sections = []
    for size, reward in pool.proxies.items():
        proxy = reward[:, t:].reshape(-1)
        labels = outlier_labels(proxy, gold)
        rows = {}
        for name, score in {**scores, "proxy reward (reference)": proxy}.items():
            m = evaluate(labels, score, n_resamples=EVAL_RESAMPLES, seed=seed)
            rows[name] = {k: m[k] for k in ("auroc", "auroc_ci", "tpr_at_1fpr", "tpr_at_1fpr_ci")}
        top = np.flatnonzero(labels)[np.argsort(-(zscore(proxy) - zscore(gold))[labels == 1])]
        proxies[str(size)] = {
            "labels": size,
            "n_outliers": int(labels.sum()),
            "n_test": len(labels),
            "outlier_gold_mean": float(gold[labels == 1].mean()),
            "other_gold_mean": float(gold[labels == 0].mean()),
            "outlier_proxy_mean": float(proxy[labels == 1].mean()),
            "other_proxy_mean": float(proxy[labels == 0].mean()),
            "detectors": rows,
            "examples": [
                {"text": texts[i], "proxy": float(proxy[i]), "gold": float(gold[i])}
                for i in top[:5]
            ],
        }
        roc = size == max(pool.proxies)  # one ROC chart: each is a large SVG
        sections.append(_section(size, proxies[str(size)], labels, scores if roc else {}))
    best = max(
        ((s, d, r["auroc"]) for s, p in proxies.items() for d, r in p["detectors"].items()
         if d in scores),
        key=lambda x: -1.0 if not np.isfinite(x[2]) else x[2],
    )  # fmt: skip
    figures = {
        "model": model,
        "hook": pool.hook,
        "budget": asdict(budget),
        "outlier_share": OUTLIER_SHARE,
        "n_trusted": len(trusted),
        "proxies": proxies,
        "best": {"proxy_labels": best[0], "detector": best[1], "auroc": best[2]},
        "pool_cached": pool.cached,
    }
    intro = Section(
        "Setup",
        f"The over-optimisation pool ({budget.prompts} prompts x {budget.samples} completions "
        f"of {model}). Outliers: the {OUTLIER_SHARE:.0%} of test completions with the largest "
        "z(proxy) - z(gold), one label set per proxy. Detectors are fitted without labels on "
        f"the first {t} completions of each prompt ({len(trusted)} ordinary completions, mean "
        f"of {pool.hook} over the completion) and score the other {len(test)}. The proxy "
        "reward itself is shown as a reference, not as a detector.",
        figure(fmt(best[2]), f"best detector AUROC ({best[1]}, proxy of {best[0]} labels)"),
    )
    return LabResult("reward-outliers", figures, [intro, *sections], FINDING,
                     verdict(proxies), time.perf_counter() - start)  # fmt: skip


def _section(
    size: int, row: dict[str, Any], labels: np.ndarray, scores: dict[str, np.ndarray]
) -> Section:
    table = "".join(
        f"<tr><td class='l'>{esc(name)}</td><td>{fmt(r['auroc'])} [{fmt(r['auroc_ci'][0])}, "
        f"{fmt(r['auroc_ci'][1])}]</td><td>{fmt(r['tpr_at_1fpr'])}</td></tr>"
        for name, r in row["detectors"].items()
    )
    examples = "".join(
        f"<tr><td>{fmt(e['proxy'], 2)}</td><td>{fmt(e['gold'], 2)}</td>"
        f"<td class='l'>{esc(e['text'])}</td></tr>"
        for e in row["examples"]
    )
    curves = [(name, labels, s) for name, s in scores.items()]
    return Section(
        f"Proxy of {size} labels: {row['n_outliers']} outliers among {row['n_test']}",
        f"Outliers: mean gold {row['outlier_gold_mean']:.3f} (others "
        f"{row['other_gold_mean']:.3f}), mean proxy {row['outlier_proxy_mean']:.3f} (others "
        f"{row['other_proxy_mean']:.3f}).",
        "<table><tr><th class='l'>score</th><th>AUROC [95% CI]</th><th>recall@1%FPR</th></tr>"
        f"{table}</table>"
        + (plot("ROC of the label-free detectors", roc_chart(curves)) if curves else "")
        + "<table class='text'><tr><th>proxy</th><th>gold</th><th>top outliers</th></tr>"
        f"{examples}</table>",
    )


def verdict(proxies: dict[str, Any]) -> str:
    """Whether any label-free detector catches the outliers, in one or two sentences."""
    parts, top, recall = [], float("nan"), float("nan")
    for size, row in proxies.items():
        dets = {k: v for k, v in row["detectors"].items() if not k.startswith("proxy reward")}
        name, best = max(dets.items(), key=lambda kv: np.nan_to_num(kv[1]["auroc"], nan=-1))
        parts.append(f"{size} labels: {name} {best['auroc']:.2f}")
        top = np.fmax(top, best["auroc"])
        recall = np.fmax(recall, max(np.nan_to_num(v["tpr_at_1fpr"]) for v in dets.values()))
    caught = (
        "catch them" if top >= 0.8 else "catch them weakly at best" if top >= 0.65 else
        "do not catch them"
    )  # fmt: skip
    return (
        f"Label-free activation detectors {caught}: best AUROC per proxy {'; '.join(parts)}; "
        f"recall at 1% FPR at most {recall:.2f}."
    )


def run(model: str, quick: bool, seed: int, progress: bool, device: str) -> LabResult:
    """The registered entry point: the quick or the full budget (the same pool as
    `overoptimization`, read from the cache when that ran first)."""
    return measure(model, QUICK if quick else FULL, seed, progress, device)


EXPERIMENT = Experiment(
    "reward-outliers",
    "completions a proxy reward over-rates: do label-free activation detectors catch them?",
    run,
    REFERENCE,
)
