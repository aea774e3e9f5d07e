"""Custom tasks from a JSONL file: `{"text"}` or `{"messages"}` plus `"split"` (trusted /
untrusted / test) and, on test lines, `"label"` (0 normal, 1 anomalous)."""

from pathlib import Path

import numpy as np

from madlens.data import read_jsonl, record_input
from madlens.errors import MadlensError
from madlens.tasks.base import Task

SPLITS = ("trusted", "untrusted", "test")


def load_task_file(path: str | Path, model: str, position: str = "last") -> Task:
    """Read and validate a custom task file; every problem names its line."""
    path = Path(path)
    splits: dict[str, list] = {s: [] for s in SPLITS}
    labels = []
    for record in read_jsonl(path):
        where = f"{path}:{record['_line']}"
        item = record_input(record, where)
        split = record.get("split")
        if split not in SPLITS:
            raise MadlensError(
                f"{where}: 'split' must be one of {', '.join(SPLITS)}, got {split!r}"
            )
        if split == "test":
            label = record.get("label")
            if label not in (0, 1) or isinstance(label, bool):
                raise MadlensError(f"{where}: a test line needs 'label': 0 or 1")
            labels.append(label)
        elif "label" in record:
            raise MadlensError(f"{where}: only test lines carry a label (this is '{split}')")
        splits[split].append(item)
    if not splits["trusted"]:
        raise MadlensError(f"{path}: no line has split 'trusted'")
    if not splits["test"]:
        raise MadlensError(f"{path}: no line has split 'test'")
    if len(set(labels)) < 2:
        raise MadlensError(f"{path}: the test lines hold only one class (label {labels[0]})")
    if position in ("response", "mean"):
        for item in splits["trusted"] + splits["test"]:
            if isinstance(item, str) or item[-1]["role"] != "assistant":
                raise MadlensError(f"{path}: position '{position}' needs every line to be a "
                                   "conversation ending with an assistant turn")  # fmt: skip
    return Task(
        name=path.stem, model=model, trusted=splits["trusted"], test=splits["test"],
        labels=np.array(labels), untrusted=splits["untrusted"] or None, position=position,
        description=f"custom task from {path.name}",
    )  # fmt: skip
