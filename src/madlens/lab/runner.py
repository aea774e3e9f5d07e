"""`run_lab`: run one registered experiment and write `DIR/lab.json` (its figures, the
paper's finding, the verdict, how it ran) and a self-contained `DIR/lab.html`."""

import json
import math
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from madlens import __version__
from madlens.errors import MadlensError
from madlens.lab.base import Experiment, LabResult
from madlens.models.registry import DEFAULT_MODEL
from madlens.report import esc, page

JSON_FILE, HTML_FILE = "lab.json", "lab.html"


def experiments() -> dict[str, Experiment]:
    """The registered experiments, by name (read at call time: tests add their own)."""
    from madlens import lab

    return lab.EXPERIMENTS


def get_experiment(name: str) -> Experiment:
    """The experiment `name`, or one line naming the known ones."""
    found = experiments()
    if name not in found:
        known = ", ".join(sorted(found)) or "none"
        raise MadlensError(f"unknown experiment '{name}'; known experiments: {known}")
    return found[name]


def run_lab(
    name: str,
    out: str | Path,
    quick: bool = True,
    seed: int = 0,
    progress: bool = True,
    device: str = "auto",
    model: str = DEFAULT_MODEL,
) -> tuple[LabResult, dict[str, Any]]:
    """Run experiment `name` on `model` and write `out/lab.json` and `out/lab.html`.
    Returns the result and the JSON document; `seconds` is the whole run's wall time."""
    experiment = get_experiment(name)
    out = Path(out)
    start = time.perf_counter()
    result = experiment.run(model, quick=quick, seed=seed, progress=progress, device=device)
    if not isinstance(result, LabResult):
        raise MadlensError(f"experiment '{name}' returned {type(result).__name__}, not LabResult")
    result.seconds = round(time.perf_counter() - start, 1)
    doc = lab_document(experiment, result, model=model, quick=quick, seed=seed, device=device)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(doc, indent=1, ensure_ascii=False, allow_nan=False)
    (out / JSON_FILE).write_text(text + "\n", encoding="utf-8")
    (out / HTML_FILE).write_text(render(experiment, result, doc), encoding="utf-8")
    return result, doc


def finite(value: Any) -> Any:
    """`value` with every non-finite float (and numpy scalar / array) made JSON-safe: NaN and
    infinities become null, numpy values plain Python ones."""
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        value = value.tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def lab_document(
    experiment: Experiment, result: LabResult, *, model: str, quick: bool, seed: int, device: str
) -> dict[str, Any]:
    """The contents of `lab.json`."""
    return {
        "experiment": experiment.name,
        "description": experiment.description,
        "reference": experiment.reference,
        "madlens_version": __version__,
        "model": model,
        "quick": quick,
        "seed": seed,
        "device": device,
        "created": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "seconds": result.seconds,
        "finding": result.finding,
        "verdict": result.verdict,
        "figures": finite(result.figures),
    }


def render(experiment: Experiment, result: LabResult, doc: dict[str, Any]) -> str:
    """`lab.html`: the finding and verdict, then each section (title, text, HTML)."""
    budget = "--quick" if doc["quick"] else "full budget"
    parts = [
        f"<h1>madlens lab: {esc(experiment.name)}</h1>",
        f'<p class="note">{esc(experiment.description)}</p>',
    ]
    if experiment.reference:
        parts.append(f'<p class="note">Re-runs: {esc(experiment.reference)}</p>')
    parts.append(
        f'<p class="muted">model {esc(doc["model"])} · {budget} · seed {doc["seed"]} · device '
        f"{esc(doc['device'])} · {result.seconds:.0f} s · madlens {esc(doc['madlens_version'])}"
        f" · {esc(doc['created'])}</p>"
    )
    if result.finding:
        parts.append(f'<h2>The paper\'s finding</h2><p class="note">{esc(result.finding)}</p>')
    if result.verdict:
        parts.append(f'<h2>What we measured</h2><p class="note verdict">{esc(result.verdict)}</p>')
    for section in result.sections:
        parts.append(f"<h2>{esc(section.title)}</h2>")
        if section.text:
            parts.append(f'<p class="note">{esc(section.text)}</p>')
        if section.html:
            parts.append(f'<div class="section">{section.html}</div>')
    return page(f"madlens lab: {experiment.name}", "\n".join(parts))
