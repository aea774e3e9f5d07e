"""The contract every `madlens lab` experiment follows: a registered `Experiment` whose
`run` returns a `LabResult` (JSON-able figures plus HTML sections built with `report/`)."""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Section:
    """One part of `lab.html`: a title, a paragraph (plain text, escaped when rendered) and
    HTML built with the report toolkit (`report.line_chart`, `report.plot`, a table)."""

    title: str
    text: str = ""
    html: str = ""


@dataclass
class LabResult:
    """What an experiment measured. `figures` is JSON-able (numbers, lists, dicts of them)
    and goes to `lab.json`; `finding` is the paper's headline claim and `verdict` says in
    one or two sentences where the measurement agrees with it and where it does not."""

    experiment: str
    figures: dict[str, Any]
    sections: list[Section] = field(default_factory=list)
    finding: str = ""
    verdict: str = ""
    seconds: float = 0.0


@dataclass(frozen=True)
class Experiment:
    """A registered experiment: `run(model, quick, seed, progress, device) -> LabResult`,
    the paper it re-runs and a one-line description."""

    name: str
    description: str
    run: Callable[..., LabResult]
    reference: str = ""
