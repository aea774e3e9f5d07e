"""`madlens monitor fit | score | show`: fit a monitor on trusted traffic, score new inputs."""

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from madlens.cli.options import (
    Device,
    Dtype,
    Engine,
    Hooks,
    Model,
    RayAddress,
    Seed,
    names,
    output_dir,
    output_file,
)
from madlens.cli.runs import monitor_rows, record_run
from madlens.models.registry import DEFAULT_MODEL

app = typer.Typer(
    help="Fit a monitor on trusted traffic, calibrate it, score new inputs.",
    no_args_is_help=True,
)

Data = Annotated[Path, typer.Option(help="JSONL file: one {'text'} or {'messages'} per line")]
CHUNK = 64  # inputs scored (and lines written) at a time


@app.command("fit")
def fit(
    trusted: Data,
    out: Annotated[Path, typer.Option(help="folder to save the monitor in")],
    untrusted: Annotated[
        Path | None,
        typer.Option(help="JSONL of unlabeled traffic, for detectors that fit on it (que, ...)"),
    ] = None,
    model: Model = DEFAULT_MODEL,
    adapter: Annotated[Path | None, typer.Option(help="a LoRA adapter dir to merge")] = None,
    detectors: Annotated[str, typer.Option(help="comma-separated detector names")] = (
        "mahalanobis"
    ),
    hooks: Hooks = None,
    position: Annotated[str, typer.Option(help="last (prompt) or mean (over the answer)")] = (
        "last"
    ),
    fpr: Annotated[
        float, typer.Option(help="false-positive rate the threshold is calibrated at, in (0, 1)")
    ] = 0.01,
    holdout: Annotated[
        float, typer.Option(help="fraction of trusted inputs held out of the fit to calibrate")
    ] = 0.25,
    dtype: Dtype = "auto",
    device: Device = "auto",
    seed: Seed = 0,
) -> None:
    """Fit detectors on trusted inputs, calibrate the threshold on held-out trusted inputs
    at --fpr (split conformal), and save the monitor to --out."""
    from madlens.data import read_inputs
    from madlens.errors import MadlensError
    from madlens.monitor import Monitor

    start = time.perf_counter()
    output_dir(out)
    if not 0 < fpr < 1:
        raise MadlensError(f"--fpr must be in (0, 1), got {fpr:g}")
    if not 0 < holdout < 1:
        raise MadlensError(f"--holdout must be in (0, 1), got {holdout:g}")
    detector_list = names(detectors, "detectors")
    monitor = Monitor(model, hooks=names(hooks, "hooks"), position=position,
                      detectors=detector_list, holdout=holdout, adapter=adapter, dtype=dtype,
                      seed=seed, device=device)  # fmt: skip
    trusted_inputs = read_inputs(trusted)
    untrusted_inputs = read_inputs(untrusted) if untrusted is not None else None
    monitor.fit(trusted_inputs, untrusted_inputs).calibrate(fpr)
    monitor.save(out)
    config = monitor.config()
    typer.echo(
        f"fitted {', '.join(monitor.detectors)} on {config['n_fit']} trusted inputs at "
        f"{len(monitor.hooks)} hook(s); calibrated at fpr {fpr:g} on "
        f"{config['n_calibration']} held-out inputs -> {out}"
    )
    record_run("monitor fit", monitor_rows(config), start=start, model=model,
               fingerprint=monitor.fingerprint)  # fmt: skip


@app.command("score")
def score(
    monitor: Annotated[Path, typer.Option(help="a folder written by 'madlens monitor fit'")],
    data: Data,
    out: Annotated[Path, typer.Option(help="JSONL file: one verdict per input line")],
    model: Annotated[
        str | None, typer.Option(help="load this model instead of the saved spec")
    ] = None,
    device: Device = "auto",
    engine: Engine = "local",
    ray_address: RayAddress = None,
) -> None:
    """Score every input of --data; write one JSON line per input (scores, p-values, the
    combined p-value, the flag, the hook that contributed most) as it goes, in input order
    (with --engine ray too)."""
    from itertools import chain

    from madlens.data.jsonl import read_jsonl, record_input
    from madlens.monitor import Monitor
    from madlens.scale.cluster import check_engine

    output_file(out)
    check_engine(engine, ray_address)
    loaded = Monitor.load(monitor, model=model, device=device, progress=False)
    records = read_jsonl(data)
    inputs = [record_input(r, f"{data}:{r['_line']}") for r in records]
    if engine == "ray":
        from madlens.scale import score_rows

        verdicts = score_rows(monitor, inputs, model=model, device=device, batch_size=CHUNK,
                              address=ray_address)  # fmt: skip
    else:
        verdicts = _score_locally(loaded, inputs)
    verdicts = iter(verdicts)
    first = next(verdicts)  # the model loads (its fingerprint checked) before anything is written
    flagged = 0
    with out.open("w", encoding="utf-8") as handle:
        for i, row in enumerate(chain([first], verdicts)):  # to the end: the engine closes
            record = records[i]
            line = {"line": record["_line"]}
            if "id" in record:
                line["id"] = record["id"]
            line.update(row)
            flagged += bool(row.get("flagged"))
            handle.write(json.dumps(line, ensure_ascii=False) + "\n")
            if i % CHUNK == CHUNK - 1:
                handle.flush()
    typer.echo(f"scored {len(inputs)} inputs, {flagged} flagged -> {out}")


def _score_locally(monitor: Any, inputs: list[Any]) -> Iterator[dict[str, Any]]:
    """Verdict rows of `inputs`, scored in this process CHUNK at a time."""
    from tqdm.auto import tqdm

    _ = monitor.model  # load (and check the fingerprint of) the model before the first chunk
    with tqdm(total=len(inputs), desc="score", unit="input") as bar:
        for start in range(0, len(inputs), CHUNK):
            verdict = monitor.score(inputs[start : start + CHUNK], cache=False)
            yield from verdict.rows()
            bar.update(len(verdict))


@app.command("show")
def show(
    folder: Annotated[Path, typer.Argument(help="a folder written by 'madlens monitor fit'")],
) -> None:
    """Print a saved monitor's model, hooks, detectors, thresholds and calibration."""
    from madlens.monitor import read_config

    config = read_config(folder)
    model = config["model"]
    typer.echo(
        f"model        {model['spec']}" + (f" + {model['adapter']}" if model["adapter"] else "")
    )
    typer.echo(f"fingerprint  {model['fingerprint']}  ({model['dtype']})")
    typer.echo(f"position     {config['position']}")
    typer.echo(f"hooks        {', '.join(config['hooks'])}")
    typer.echo(f"fit on       {config['n_fit']} trusted inputs")
    cal = config.get("n_calibration", 0)
    if config.get("fpr") is None:
        typer.echo("calibration  none")
    else:
        typer.echo(f"calibration  {cal} held-out inputs, fpr {config['fpr']:g} "
                   f"({config.get('combine', 'bonferroni')} over detectors)")  # fmt: skip
    thresholds = config.get("thresholds") or {}
    for det in config["detectors"]:
        params = ", ".join(f"{k}={v}" for k, v in det["params"].items())
        t = thresholds.get(det["name"])
        typer.echo(f"detector     {det['name']}({params})"
                   + (f"  threshold {t:.6g}" if t is not None else ""))  # fmt: skip
    typer.echo(
        f"madlens      {config.get('madlens_version', '?')}, created {config.get('created')}"
    )
