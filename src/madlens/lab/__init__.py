"""`madlens lab`: re-runs of research findings on a model you control (see docs/lab.md).

Each experiment is a module of this package exposing `EXPERIMENT` (an `Experiment`); the
registry below lists them, one import per experiment."""

from madlens.lab.base import Experiment, LabResult, Section

EXPERIMENTS: dict[str, Experiment] = {}

__all__ = ["EXPERIMENTS", "Experiment", "LabResult", "Section"]
