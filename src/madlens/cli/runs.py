"""`madlens runs list | show ID | compare A B`: read the run registry; and `record_run`, the
one call with which bench, truth sweep, sae train, circuits ioi and monitor fit record
themselves when they finish.

Reading never creates the registry; recording never makes a finished command fail (a
registry that cannot be written is one warning line)."""

import json
import math
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from madlens.cli.options import output_file

app = typer.Typer(
    help="The run registry: every bench, truth sweep, SAE training, circuit discovery and "
    "monitor fit, recorded (MADLENS_NO_RUNS=1 turns recording off).",
    no_args_is_help=True,
)
NO_RUNS = "no runs recorded yet"


# --- recording ---------------------------------------------------------------------------------


def _arguments() -> dict[str, Any]:
    """The running command's arguments as parsed (paths made absolute), or {} outside one."""
    try:
        from typer._click.globals import get_current_context
    except ImportError:  # pragma: no cover - older typer runs on click itself
        from click import get_current_context
    ctx = get_current_context(silent=True)
    if ctx is None:
        return {}
    return {k: str(Path(v).absolute()) if isinstance(v, Path) else v for k, v in ctx.params.items()}


def weights_fingerprint(spec: str, dtype: str = "auto") -> str | None:
    """The fingerprint `load_model(spec, dtype)` would give, where that is cheap: tiny-test
    (built in-process), the embedded default once converted, a local model dir. None for a
    Hugging Face id (its fingerprint needs the loaded model) or anything that fails."""
    try:
        from madlens.models import smollm2
        from madlens.models.loading import _dir_fingerprint, load_hf
        from madlens.models.registry import DEFAULT_MODEL

        if spec == "tiny-test":
            return load_hf(spec, dtype)[2]
        if spec == DEFAULT_MODEL:
            return (_dir_fingerprint(smollm2.converted_dir(), full=False) if smollm2.is_converted()
                    else None)  # fmt: skip
        path = Path(spec).expanduser()
        return _dir_fingerprint(path) if (path / "config.json").is_file() else None
    except Exception:  # a fingerprint is a courtesy: never a reason to fail
        return None


def record_run(
    command: str,
    rows: list[dict[str, Any]],
    *,
    start: float | None = None,
    wall_s: float | None = None,
    model: str | None = None,
    fingerprint: str | None = None,
    dtype: str = "auto",
    status: str = "ok",
    config: dict[str, Any] | None = None,
) -> str | None:
    """Record a finished command in the run registry: its arguments (`config`, default: the
    parsed command line), result rows, model and fingerprint (worked out from `model` when
    not given), wall time (`wall_s`, or since `start`, a `time.perf_counter()`). Prints the
    run id; on any failure prints one warning line instead. Returns the id or None."""
    try:
        from madlens import runs

        if not runs.enabled():
            return None
        if wall_s is None:
            wall_s = math.nan if start is None else time.perf_counter() - start
        if model is not None and Path(model).expanduser().is_dir():
            model = str(Path(model).expanduser().resolve())
        if fingerprint is None and model is not None:
            fingerprint = weights_fingerprint(model, dtype)
        run_id = runs.record(command, _arguments() if config is None else config, rows,
                             model=model, fingerprint=fingerprint, wall_s=wall_s,
                             status=status)  # fmt: skip
    except Exception as exc:  # recording must never fail a finished command
        reason = " ".join(str(exc).split()) or type(exc).__name__
        typer.echo(f"warning: run not recorded: {reason}", err=True)
        return None
    typer.echo(f"recorded run {run_id} (madlens runs show {run_id})")
    return run_id


# --- result rows of each command ---------------------------------------------------------------


def _scalars(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    return {f"{prefix}{k}": v for k, v in values.items()
            if v is None or isinstance(v, (bool, int, float, str))}  # fmt: skip


def truth_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """A truth sweep as rows: one per dataset x method x hook (accuracy, sign-fixed accuracy,
    CCS's loss), plus the zero-shot answer per dataset (hook `output`)."""
    rows = []
    for name, d in doc["datasets"].items():
        for method, by_hook in d["methods"].items():
            for hook, values in by_hook.items():
                row = {"task": name, "detector": method, "hook": hook, **_scalars(values)}
                if method == "ccs" and hook in d.get("ccs_loss", {}):
                    row["ccs_loss"] = d["ccs_loss"][hook]
                rows.append(row | {"n_eval": d["n_eval"]})
        rows.append({"task": name, "detector": "zero-shot", "hook": "output",
                     **_scalars(d["zero_shot"]), "n_eval": d["n_eval"]})  # fmt: skip
    return rows


def sae_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """An SAE training as one row: size, tokens, dead fraction, the held-out evaluation and
    the last training step's figures (`train_` prefixed)."""
    row = {"task": "sae", "detector": metrics["architecture"], "hook": metrics["hook"]}
    row |= _scalars({k: v for k, v in metrics.items() if k not in row and k != "config"})
    row |= _scalars(metrics.get("eval", {})) | _scalars(metrics.get("final_train", {}), "train_")
    return [row]


def circuit_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """An IOI circuit (its circuit.json) as rows: the circuit's figures (detector `circuit`),
    then one row per head found, by class (hook `LAYER.HEAD`)."""
    summary = {"task": "ioi", "detector": "circuit", "hook": "all heads"}
    summary |= _scalars({k: v for k, v in doc.items() if k not in ("model", "dtype")})
    rows = [summary]
    for name, heads in doc["heads"].items():
        rows += [{"task": "ioi", "detector": name, "hook": f"{layer}.{head}", "layer": layer,
                  "head": head} for layer, head in heads]  # fmt: skip
    return rows


def monitor_rows(config: dict[str, Any]) -> list[dict[str, Any]]:
    """A fitted monitor (its monitor.json) as rows: one per detector with its threshold, the
    calibration FPR and the fit / calibration sizes."""
    hooks = "+".join(config["hooks"])
    thresholds = config.get("thresholds") or {}
    return [{"task": "monitor", "detector": d["name"], "hook": hooks,
             "threshold": thresholds.get(d["name"]), "fpr": config.get("fpr"),
             "n_fit": config.get("n_fit"), "n_calibration": config.get("n_calibration"),
             "position": config.get("position"), "params": d.get("params")}
            for d in config["detectors"]]  # fmt: skip


# --- reading -----------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "n/a"
        return f"{value:.4g}" if abs(value) >= 1e4 or 0 < abs(value) < 1e-3 else f"{value:.3f}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def align(rows: list[list[str]], right: set[int] = frozenset()) -> list[str]:
    """Text rows as aligned columns (the first row is the header)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(c.rjust(widths[i]) if i in right else c.ljust(widths[i])
                  for i, c in enumerate(row)).rstrip()
        for row in rows
    ]  # fmt: skip


def _created(run: Any) -> str:
    return run.created.strftime("%Y-%m-%d %H:%M:%S")


@app.command("list")
def list_command(
    limit: Annotated[int, typer.Option(min=1, help="at most this many runs")] = 20,
    command: Annotated[
        str | None, typer.Option(help="only this command's runs (bench, truth sweep, ...)")
    ] = None,
) -> None:
    """The newest runs first: id, time, command, model, git revision, wall time, rows, mean
    AUROC, status."""
    from madlens import runs

    found = runs.list_runs(limit, command)
    if not found:
        typer.echo(NO_RUNS if command is None or not runs.exists() else f"no '{command}' runs")
        return
    header = ["id", "created (UTC)", "command", "model", "git", "wall s", "rows", "mean AUROC",
              "status"]  # fmt: skip
    table = [header] + [
        [r.id, _created(r), r.command, r.model or "-", r.git, _cell(r.wall_s), str(r.n_rows),
         _cell(r.mean_auroc), r.status]
        for r in found
    ]  # fmt: skip
    for line in align(table, right={5, 6, 7}):
        typer.echo(line)


@app.command("show")
def show(
    run_id: Annotated[str, typer.Argument(metavar="ID", help="a run id, or a unique prefix")],
    as_json: Annotated[bool, typer.Option("--json", help="print the run as JSON")] = False,
) -> None:
    """One run: what ran (command, arguments, madlens version, git revision, model and its
    fingerprint, wall time) and its result rows."""
    from madlens import runs

    if not runs.exists():
        typer.echo(NO_RUNS)
        return
    run = runs.get_run(run_id)
    if as_json:
        doc = {k: getattr(run, k) for k in runs.RUN_COLUMNS} | {"rows": run.rows}
        doc["created"] = run.created.isoformat() + "Z"
        typer.echo(json.dumps(doc, indent=2, ensure_ascii=False))
        return
    for label, value in [
        ("run", run.id), ("created", f"{_created(run)} UTC"), ("command", run.command),
        ("status", run.status), ("model", run.model or "-"),
        ("fingerprint", run.fingerprint or "-"), ("madlens", run.madlens_version or "-"),
        ("git", run.git_revision + (" (dirty)" if run.git_dirty else "") if run.git_revision
         else "-"), ("wall", f"{_cell(run.wall_s)} s"), ("rows", str(len(run.rows))),
    ]:  # fmt: skip
        typer.echo(f"{label:<12} {value}")
    typer.echo("config")
    for key, value in run.config.items():
        typer.echo(f"  {key:<18} {json.dumps(value, ensure_ascii=False)}")
    if run.rows:
        typer.echo("")
        for line in _row_table(run.rows):
            typer.echo(line)


WIDE = 14  # rows with more fields than this are shown one field a line


def _row_table(rows: list[dict[str, Any]]) -> list[str]:
    """Result rows as a table: task, detector, hook, then every other field (first seen
    first; an AUROC's CI next to it); one field a line per row when there are many."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys and k not in ("task", "detector", "hook")]
    keys = [k for k in keys if k not in ("auroc_ci", "reason")]
    table = [["task", "detector", "hook", *keys]]
    for row in rows:
        cells = [str(row.get(k, "")) for k in ("task", "detector", "hook")]
        for k in keys:
            cell = _cell(row.get(k))
            if k == "auroc" and isinstance(row.get("auroc_ci"), list):
                cell += " [" + ", ".join(_cell(x) for x in row["auroc_ci"]) + "]"
            cells.append(cell)
        table.append(cells)
    if len(table[0]) <= WIDE:
        return align(table)
    lines = []
    for i, cells in enumerate(table[1:], 1):
        lines += [f"row {i}", *("  " + line for line in align(list(zip(table[0], cells))))]
    return lines


def comparison_lines(comparison: Any) -> list[str]:
    """The terminal form of a `runs.Comparison`."""
    c, metric = comparison, comparison.metric
    lines = [
        f"a  {c.a.id}  {_created(c.a)}  {c.a.command}  {c.a.model or '-'}  git {c.a.git}",
        f"b  {c.b.id}  {_created(c.b)}  {c.b.command}  {c.b.model or '-'}  git {c.b.git}",
    ]
    for name, va, vb in c.config_changes:
        lines.append(f"   {name}: {json.dumps(va)} -> {json.dumps(vb)}")
    if not c.rows:
        return [*lines, f"neither run has a {metric} on any row"]

    def ci(lo: float | None, hi: float | None) -> str:
        return "" if lo is None or hi is None else f"[{lo:.3f}, {hi:.3f}]"

    table = [["task", "detector", "hook", f"{metric} a", "95% CI a", f"{metric} b", "95% CI b",
              "diff", ""]]  # fmt: skip
    for d in c.rows:
        table.append([d.task, d.detector, d.hook, _cell(d.a), ci(d.a_lo, d.a_hi), _cell(d.b),
                      ci(d.b_lo, d.b_hi), "" if d.diff is None else f"{d.diff:+.3f}",
                      d.mark])  # fmt: skip
    lines += ["", *align(table, right={3, 5, 7}), ""]
    lines.append("= CIs overlap, + b clearly better, - b clearly worse, ? no CI")
    lines.append(c.summary())
    return lines


@app.command("compare")
def compare(
    a: Annotated[str, typer.Argument(metavar="A", help="the run to compare against (id)")],
    b: Annotated[str, typer.Argument(metavar="B", help="the new run (id)")],
    metric: Annotated[
        str, typer.Option(help="the row field compared (auroc, accuracy_sign_fixed, ...)")
    ] = "auroc",
    html: Annotated[
        Path | None, typer.Option(help="also write the comparison as an HTML page")
    ] = None,
) -> None:
    """Run B against run A, row by row (task, detector, hook): the metric in each with its
    95% CI, the difference, and whether the CIs overlap (=) or B is clearly better (+) or
    worse (-)."""
    from madlens import runs

    if html is not None:
        output_file(html)
    if not runs.exists():
        typer.echo(NO_RUNS)
        return
    comparison = runs.compare(a, b, metric=metric)
    for line in comparison_lines(comparison):
        typer.echo(line)
    if html is not None:
        html.parent.mkdir(parents=True, exist_ok=True)
        html.write_text(runs.render_comparison(comparison), encoding="utf-8")
        typer.echo(f"wrote {html}")
