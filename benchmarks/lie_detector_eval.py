"""Lie-detector AUROCs on the `lying` task: in distribution (two-fold cross-fit, as the bench
does), each question group alone, and transfer to an unseen fact domain (continents) and to an
unseen lying instruction (the lie prompt held out of the LoRA's training).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/lie_detector_eval.py [--full]

Transfer sets are fresh transcripts of the task's LoRA model (greedy, cached), labelled the
way the task labels them: a lie is a false answer given when told to lie. The detector is
trained on every labelled transcript of the task (trusted ones count as truthful).
"""

import argparse
import random

import numpy as np
from sklearn.metrics import roc_auc_score

from madlens.bench.runner import _two_fold
from madlens.detectors import get_detector
from madlens.detectors.lie_detector import GROUPS, elicitation_features
from madlens.models import load_model
from madlens.tasks import build_task
from madlens.tasks.lying import (
    HONEST_PROMPT,
    LIE_PROMPTS,
    TRAIN_LIE_PROMPTS,
    facts,
    lie_systems,
    transcripts,
)


def transfer_set(model, items, lie_prompts):
    honest, _ = transcripts(model, items, HONEST_PROMPT)
    lies, lies_true = transcripts(model, items, lie_systems(len(items), lie_prompts))
    labels = [0] * len(honest) + [0 if ok else 1 for ok in lies_true]
    return honest + lies, np.array(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--full", action="store_true", help="the full-size task, not --quick")
    parser.add_argument("--n-transfer", type=int, default=40, help="facts per transfer set")
    args = parser.parse_args()
    task = build_task("lying", args.model, quick=not args.full, check=False)
    model = load_model(task.model, dtype="bfloat16", adapter=task.adapter)
    x_trusted = elicitation_features(model, task.trusted)
    x_test = elicitation_features(model, task.test)
    y = task.labels
    print(f"lying task: {len(task.trusted)} trusted, {int((y == 0).sum())} truthful and "
          f"{int(y.sum())} lies in test; checks {task.checks}")  # fmt: skip
    print(f"{'setting':<44}{'AUROC':>7}")
    for groups in (None, *[(g,) for g in GROUPS]):
        scores = np.zeros(len(y))
        for train, held in zip(_two_fold(y, 0), _two_fold(y, 0)[::-1]):
            det = get_detector("lie-detector", groups=groups)
            det.fit(x_trusted, x_test[train], labels=y[train])
            scores[held] = det.score(x_test[held])
        label = "in distribution, all 48 questions" if groups is None else f"  {groups[0]} only"
        print(f"{label:<44}{roc_auc_score(y, scores):>7.3f}")
    det = get_detector("lie-detector").fit(x_trusted, x_test, labels=y)
    seen = {m["content"] for conv in task.test + task.trusted for m in conv if m["role"] == "user"}
    rng = random.Random(1)
    continents = [f for f in facts("continents") if f.question not in seen]
    rng.shuffle(continents)
    domain, y_domain = transfer_set(model, continents[: args.n_transfer], TRAIN_LIE_PROMPTS)
    fresh = [f for d in ("capitals", "cities") for f in facts(d) if f.question not in seen]
    rng.shuffle(fresh)
    unseen_prompt = [p for p in LIE_PROMPTS if p not in TRAIN_LIE_PROMPTS]
    prompt, y_prompt = transfer_set(model, fresh[: args.n_transfer], unseen_prompt)
    sets = [("transfer: unseen fact domain (continents)", domain, y_domain),
            ("transfer: unseen lying instruction", prompt, y_prompt)]  # fmt: skip
    for label, convs, labels in sets:
        if len(set(labels)) < 2:
            print(f"{label:<44}    n/a (no lies / no truthful answers: {labels.sum()} lies)")
            continue
        auroc = roc_auc_score(labels, det.score(elicitation_features(model, convs)))
        print(f"{label:<44}{auroc:>7.3f}  ({int(labels.sum())} lies / {len(labels)})")


if __name__ == "__main__":
    main()
