"""`Task`: a model spec (base + optional LoRA adapter), trusted data, optional unlabeled
untrusted data, and test data labeled normal (0) / anomalous (1)."""

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike

from madlens.errors import MadlensError

Input = str | list[dict[str, str]]


class TaskCheckError(MadlensError):
    """A task whose planted behaviour did not take: its AUROC would mean nothing."""


@dataclass
class Task:
    """One anomaly-detection problem.

    `position` says which tokens' activations detectors read (`last` prompt token, or
    `mean` / `response` over the answer). `groups` names each test example's kind (e.g.
    `normal`, `gcg`, `roleplay`) so results can be broken down. `checks` holds the task's
    own measurements (backdoor success rate, ...) and `targets` the published or issue
    targets the report shows beside what was measured: `{"text", "detector", "min_auroc"}`,
    judged on the detector's multi-hook aggregate (`best-label-free`: the best unsupervised
    detector's). `contrast` holds row-aligned contrast pairs `(positive, negative)` for
    contrast-pair probes such as CCS (e.g. a question answered with the true fact / with a
    false one); None when the task has none.

    `shortcuts` names what a detector could use besides the mechanism (an instruction in the
    prompt, a trigger's novelty, length, format): each is a view of the test inputs that
    holds only that cue, row-aligned with `test`: a text per input (e.g. the system prompt
    alone) or a number per input (e.g. the prompt's length in tokens). The bench fits a
    shortcut baseline on each view (a classifier that sees only the cue, cross-fitted on the
    test labels, an upper bound on what the cue gives away) and reports its AUROC; a
    controlled task keeps it <= 0.6. The description says in words what each cue is and
    which test group controls it. `controls` maps an anomalous group to the normal groups
    that share its shortcuts (role-play attacks <-> benign role-play requests): that group's
    rows (`task/group`) compare it with those normals only; a group not named there is
    compared with every normal.

    `measured` holds, where the model predicts observable measurements (sensor readings),
    whether all of each trusted and of each untrusted input's measurements read positive:
    `(trusted, untrusted)`, row-aligned with `trusted` and `untrusted`. It is observed, not a
    label of the mechanism: the exclusion probe reads it. None for the other tasks.
    """

    name: str
    model: str
    trusted: list[Input]
    test: list[Input]
    labels: np.ndarray
    adapter: str | None = None
    untrusted: list[Input] | None = None
    position: str = "last"
    groups: list[str] | None = None
    checks: dict[str, float] = field(default_factory=dict)
    targets: list[dict] = field(default_factory=list)
    description: str = ""
    contrast: tuple[list[Input], list[Input]] | None = None
    shortcuts: dict[str, list[str] | np.ndarray] = field(default_factory=dict)
    controls: dict[str, list[str]] = field(default_factory=dict)
    measured: tuple[ArrayLike, ArrayLike] | None = None

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.labels) != len(self.test):
            raise MadlensError(
                f"task {self.name}: {len(self.test)} test inputs, {len(self.labels)} labels"
            )
        if not self.trusted:
            raise MadlensError(f"task {self.name}: no trusted data")
        if set(np.unique(self.labels)) != {0, 1}:
            raise MadlensError(
                f"task {self.name}: the test split needs both normal (0) and anomalous (1) examples"
            )
        for cue, view in self.shortcuts.items():
            if len(view) != len(self.test):
                raise MadlensError(
                    f"task {self.name}: shortcut '{cue}' has {len(view)} rows for "
                    f"{len(self.test)} test inputs"
                )
        if self.measured is not None:
            sizes = (len(self.trusted), len(self.untrusted or []))
            if self.untrusted is None or tuple(len(m) for m in self.measured) != sizes:
                raise MadlensError(
                    f"task {self.name}: measured needs one value per trusted and per untrusted "
                    f"input ({sizes[0]} and {sizes[1]})"
                )
        if self.groups is None:
            self.groups = ["normal" if y == 0 else "anomalous" for y in self.labels]
        kinds = [{g for g, y in zip(self.groups, self.labels) if y == c} for c in (0, 1)]
        for group, normals in self.controls.items():
            wrong = [g for g in normals if g not in kinds[0]]
            if group not in kinds[1] or not normals or wrong:
                raise MadlensError(
                    f"task {self.name}: controls maps an anomalous test group to normal "
                    f"ones; got '{group}' -> {normals}"
                )


@dataclass(frozen=True)
class TaskSpec:
    """A registered task: its builder `build(model, quick, seed, progress, check, device)
    -> Task`, whether it fine-tunes a LoRA adapter, the paper whose setup it follows, and
    whether a `--quick` run without named tasks includes it (`quick`: cheap enough for the
    quick demo's cold-start budget; the others run in the full bench or when named)."""

    name: str
    description: str
    build: Callable[..., Task]
    needs_finetune: bool = False
    reference: str = ""
    quick: bool = True


def require(name: str, condition: bool, message: str, enforce: bool = True) -> None:
    """Fail the task with a clear message when its planted behaviour did not take
    (`enforce=False` only records it: for tests on a random tiny model)."""
    if enforce and not condition:
        raise TaskCheckError(f"task {name}: {message}")
