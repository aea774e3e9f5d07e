"""`madlens lab`: re-runs of research findings on a model you control (see docs/lab.md).

Each experiment is a module of this package exposing `EXPERIMENT` (an `Experiment`); the
registry below lists them, one import per experiment."""

from madlens.lab import (
    backdoor_density,
    edit,
    graft,
    ooc,
    overoptimization,
    reversal,
    reward_outliers,
    steer,
)
from madlens.lab.base import Experiment, LabResult, Section
from madlens.lab.runner import run_lab

EXPERIMENTS: dict[str, Experiment] = {
    module.EXPERIMENT.name: module.EXPERIMENT
    for module in (
        steer,
        graft,
        reversal,
        ooc,
        edit,
        overoptimization,
        reward_outliers,
        backdoor_density,
    )
}

__all__ = ["EXPERIMENTS", "Experiment", "LabResult", "Section", "run_lab"]
