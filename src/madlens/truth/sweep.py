"""The truth sweep: per dataset and layer, the accuracy of CCS, CRC-TPC, a random direction,
a logistic ceiling and the model's zero-shot answer, with and without the label sign fix.

Every method fits on a seeded, stratified half of each dataset and is scored on the other.
"""

from datetime import UTC, datetime
from typing import Any

import numpy as np

from madlens.activations import extract
from madlens.data.truth import TRUTH_DATASETS, truth_dataset
from madlens.detectors.ccs import (
    CCS,
    accuracy,
    crc_tpc_direction,
    differences,
    logistic_ceiling,
    project,
    random_direction,
    sign_fixed,
)
from madlens.errors import MadlensError
from madlens.models import parse_hooks, resid_post

METHODS = ("ccs", "crc-tpc", "random", "logistic", "zero-shot")
TRANSFER_METHODS = ("ccs", "crc-tpc", "logistic")
POSITION = "mean"  # over the answer's tokens ("True" / "False")


def default_truth_hooks(n_layers: int) -> list[str]:
    """Six residual-stream layers spread across depth, ending with the last block."""
    return [resid_post(layer) for layer in sorted({max(0, round(n_layers * k / 6) - 1)
                                                   for k in range(1, 7)})]  # fmt: skip


def check_datasets(names: list[str]) -> list[str]:
    """Validate truth dataset names (one clear error)."""
    if not names:
        raise MadlensError(f"no truth datasets given; known: {', '.join(TRUTH_DATASETS)}")
    unknown = [n for n in names if n not in TRUTH_DATASETS]
    if unknown:
        raise MadlensError(
            f"unknown truth dataset '{unknown[0]}'; known: {', '.join(TRUTH_DATASETS)}"
        )
    return list(dict.fromkeys(names))


def check_transfer_hook(
    model: Any, names: list[str] | None, hooks: list[str] | None = None
) -> str | None:
    """The one hook (or layer number) `names` gives for the transfer matrix, checked to be
    one of the swept `hooks` (default: `default_truth_hooks`); None when none is given."""
    if names is None:
        return None
    parsed = parse_hooks(",".join(names), model.n_layers)
    if len(parsed) != 1:
        raise MadlensError(f"the transfer matrix takes one hook, got {len(parsed)}")
    swept = hooks or default_truth_hooks(model.n_layers)
    if parsed[0] not in swept:
        raise MadlensError(
            f"transfer hook {parsed[0]} is not one of the swept hooks ({', '.join(swept)})"
        )
    return parsed[0]


def _split(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified half / half split: (fit rows, evaluation rows)."""
    rng = np.random.default_rng(seed)
    fit, held = [], []
    for cls in (0, 1):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        fit.append(idx[: len(idx) // 2])
        held.append(idx[len(idx) // 2 :])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(held))


def _result(p_true: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    acc = accuracy(p_true, labels)
    return {"accuracy": acc, "accuracy_sign_fixed": sign_fixed(acc)}


def probe_accuracies(
    pos: np.ndarray, neg: np.ndarray, labels: np.ndarray, fit: np.ndarray, held: np.ndarray,
    seed: int = 0, eval_pairs: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> tuple[dict[str, dict[str, float]], float]:  # fmt: skip
    """Fit each probe on rows `fit` of (pos, neg) and score it on rows `held` (or on
    `eval_pairs = (pos, neg, labels)` of another dataset, for transfer). Returns accuracies
    by method and CCS's training loss."""
    e_pos, e_neg, e_labels = eval_pairs or (pos[held], neg[held], labels[held])
    ccs = CCS(seed=seed).fit(pos[fit], neg[fit])
    out = {
        "ccs": _result(ccs.predict(e_pos, e_neg), e_labels),
        "crc-tpc": _result(project(crc_tpc_direction(pos[fit], neg[fit]), e_pos, e_neg), e_labels),
        "random": _result(project(random_direction(pos.shape[1], seed), e_pos, e_neg), e_labels),
    }
    logistic = logistic_ceiling(pos[fit], neg[fit], labels[fit])
    out["logistic"] = _result(logistic.predict_proba(differences(e_pos, e_neg))[:, 1], e_labels)
    return out, ccs.loss_


def zero_shot(score: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy of the model's own answer, `logP(True) - logP(False) > 0`, and calibrated
    (threshold at the median score, so half are called true, as Burns et al. do)."""
    raw = accuracy(score > 0, labels)
    calibrated = accuracy(score > np.median(score), labels)
    return {"accuracy": raw, "accuracy_sign_fixed": sign_fixed(raw),
            "accuracy_calibrated": calibrated}  # fmt: skip


def _activations(model: Any, name: str, n: int | None, seed: int, hooks: list[str],
                 progress: bool) -> dict[str, Any]:  # fmt: skip
    dataset = truth_dataset(name, n, seed)
    positive, negative = dataset.contrast()
    acts = [extract(model, side, hooks, POSITION, logprobs=True, progress=progress)
            for side in (positive, negative)]  # fmt: skip
    # log-probs over the answer's tokens: log P("True" | prompt) and log P("False" | prompt)
    score = np.array([a.sum() for a in acts[0].token_logprobs]) - np.array(
        [a.sum() for a in acts[1].token_logprobs]
    )
    return {"dataset": dataset, "pos": acts[0], "neg": acts[1], "score": score,
            "labels": np.asarray(dataset.labels)}  # fmt: skip


def truth_sweep(
    model: Any,
    datasets: list[str],
    hooks: list[str] | None = None,
    n: int | None = 400,
    seed: int = 0,
    transfer_hook: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Accuracy by dataset, method and layer (with and without the sign fix), zero-shot
    accuracy, and transfer (fit on one dataset's half, score another's held half) at
    `transfer_hook` (default: the middle one of `hooks`). Returns the truth.json document."""
    datasets = check_datasets(datasets)
    hooks = model.check_hooks(hooks or default_truth_hooks(model.n_layers))
    transfer_hook = transfer_hook or hooks[len(hooks) // 2]
    if transfer_hook not in hooks:
        raise MadlensError(f"transfer hook {transfer_hook} is not one of the swept hooks")
    data, doc_sets = {}, {}
    for name in datasets:
        d = _activations(model, name, n, seed, hooks, progress)
        fit, held = _split(d["labels"], seed)
        d["fit"], d["held"] = fit, held
        data[name] = d
        methods: dict[str, dict[str, Any]] = {m: {} for m in METHODS if m != "zero-shot"}
        losses = {}
        for hook in hooks:
            accs, loss = probe_accuracies(d["pos"][hook], d["neg"][hook], d["labels"], fit,
                                          held, seed)  # fmt: skip
            for method, value in accs.items():
                methods[method][hook] = value
            losses[hook] = loss
        doc_sets[name] = {
            "n": len(d["labels"]), "n_fit": len(fit), "n_eval": len(held),
            "examples": d["dataset"].statements[:3],
            "zero_shot": zero_shot(d["score"][held], d["labels"][held]),
            "methods": methods, "ccs_loss": losses,
        }  # fmt: skip
    transfer: dict[str, dict[str, dict[str, Any]]] = {m: {} for m in TRANSFER_METHODS}
    for train in datasets:
        src = data[train]
        for test in datasets:
            dst = data[test]
            pairs = (dst["pos"][transfer_hook][dst["held"]], dst["neg"][transfer_hook][dst["held"]],
                     dst["labels"][dst["held"]])  # fmt: skip
            accs, _ = probe_accuracies(
                src["pos"][transfer_hook], src["neg"][transfer_hook], src["labels"],
                src["fit"], src["held"], seed, pairs,
            )  # fmt: skip
            for method in TRANSFER_METHODS:
                transfer[method].setdefault(train, {})[test] = accs[method]
    from madlens import __version__

    return {
        "madlens_version": __version__, "model": model.name,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "hooks": hooks, "position": POSITION, "n_per_dataset": n, "seed": seed,
        "transfer_hook": transfer_hook, "datasets": doc_sets, "transfer": transfer,
        "summary": summarize(doc_sets, hooks),
    }  # fmt: skip


def summarize(doc_sets: dict[str, Any], hooks: list[str]) -> dict[str, Any]:
    """CCS against zero-shot per dataset: CCS at its best layer (sign-fixed, the published
    convention, and unfixed at that layer) and averaged over layers; the target is CCS beating
    zero-shot by >= 4 points on average."""
    rows = {}
    for name, d in doc_sets.items():
        ccs = d["methods"]["ccs"]
        best = max(hooks, key=lambda h: ccs[h]["accuracy_sign_fixed"])
        rows[name] = {
            "ccs_best_hook": best,
            "ccs_best_sign_fixed": ccs[best]["accuracy_sign_fixed"],
            "ccs_best_unfixed": ccs[best]["accuracy"],
            "ccs_mean_sign_fixed": float(np.mean([ccs[h]["accuracy_sign_fixed"] for h in hooks])),
            "logistic_best": max(d["methods"]["logistic"][h]["accuracy"] for h in hooks),
            "zero_shot": d["zero_shot"]["accuracy"],
            "zero_shot_calibrated": d["zero_shot"]["accuracy_calibrated"],
        }
        rows[name]["gain_points"] = 100 * (
            rows[name]["ccs_best_sign_fixed"] - rows[name]["zero_shot_calibrated"]
        )
    gain = float(np.mean([r["gain_points"] for r in rows.values()])) if rows else float("nan")
    return {"per_dataset": rows, "mean_gain_points": gain, "target_points": 4.0,
            "target_met": bool(gain >= 4.0)}  # fmt: skip


def format_sweep(doc: dict[str, Any]) -> str:
    """Terminal tables: accuracy by layer (sign-fixed / unfixed), the CCS vs zero-shot
    summary, and the transfer matrices."""
    hooks = doc["hooks"]
    layers = [h.split(".")[1] if h.startswith("blocks.") else h for h in hooks]
    lines = []
    for name, d in doc["datasets"].items():
        zs = d["zero_shot"]
        lines.append(f"\n{name} ({d['n']} statements, {d['n_eval']} scored): accuracy, "
                     f"sign-fixed / unfixed; zero-shot {zs['accuracy']:.3f} "
                     f"(calibrated {zs['accuracy_calibrated']:.3f})")  # fmt: skip
        lines.append(f"  {'layer':<10}" + "".join(f"{x:>13}" for x in layers))
        for method, by_hook in d["methods"].items():
            cells = "".join(
                f"{by_hook[h]['accuracy_sign_fixed']:>7.3f}/{by_hook[h]['accuracy']:.2f}"
                for h in hooks
            )
            lines.append(f"  {method:<10}{cells}")
    s = doc["summary"]
    lines.append("\nCCS (best layer, sign-fixed) vs zero-shot (calibrated):")
    for name, r in s["per_dataset"].items():
        lines.append(f"  {name:<14} CCS {r['ccs_best_sign_fixed']:.3f} (unfixed "
                     f"{r['ccs_best_unfixed']:.3f}, {r['ccs_best_hook']})  zero-shot "
                     f"{r['zero_shot_calibrated']:.3f}  gain {r['gain_points']:+.1f} "
                     "points")  # fmt: skip
    verdict = "met" if s["target_met"] else "not met"
    lines.append(f"  mean gain {s['mean_gain_points']:+.1f} points; target >= +4: {verdict}")
    names = list(doc["datasets"])
    for method, matrix in doc["transfer"].items():
        lines.append(f"\ntransfer, {method} at {doc['transfer_hook']} (row: fit on, column: "
                     "scored on; sign-fixed accuracy)")  # fmt: skip
        lines.append(f"  {'':<14}" + "".join(f"{n[:12]:>13}" for n in names))
        for train in names:
            row = matrix[train]
            cells = "".join(f"{row[test]['accuracy_sign_fixed']:>13.3f}" for test in names)
            lines.append(f"  {train:<14}{cells}")
    return "\n".join(lines)
