"""`madlens circuits ioi`: find and measure a model's indirect-object-identification
circuit by activation and path patching."""

import time
from typing import Annotated

import typer

from madlens.cli.options import Device, Dtype, Model, OutDir, Seed, output_dir
from madlens.cli.runs import circuit_rows, record_run
from madlens.models.registry import DEFAULT_MODEL

app = typer.Typer(help="Circuit discovery by activation and path patching.", no_args_is_help=True)


@app.command("ioi")
def ioi(
    out: OutDir,
    model: Model = DEFAULT_MODEL,
    dtype: Dtype = "auto",
    device: Device = "auto",
    n_prompts: Annotated[int, typer.Option(min=2, help="IOI prompt pairs")] = 50,
    seed: Seed = 0,
    threshold: Annotated[
        float, typer.Option(min=0.0, help="smallest |normalised effect| a head needs")
    ] = 0.03,
    min_attention: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="attention a head needs on its key token")
    ] = 0.1,
    max_heads: Annotated[
        int | None, typer.Option(min=1, help="circuit size cap (default: 10% of heads)")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="rows per patched forward")] = 512,
    cache: Annotated[bool, typer.Option(help="reuse cached experiments")] = True,
) -> None:
    """Find and measure a model's indirect-object-identification circuit automatically.

    Writes OUT/circuit.json (heads by class, faithfulness, completeness) and OUT/report.html.
    """
    from madlens.circuits.discovery import discover_ioi
    from madlens.circuits.report import write_outputs
    from madlens.models import load_model

    output_dir(out)
    start = time.perf_counter()
    lm = load_model(model, dtype=dtype, device=device)
    result = discover_ioi(
        lm, n_prompts=n_prompts, seed=seed, threshold=threshold, min_attention=min_attention,
        max_heads=max_heads, batch_size=batch_size, cache=cache,
    )  # fmt: skip
    paths = write_outputs(result, out)
    total = result.n_layers * result.n_heads
    typer.echo(
        f"{lm.name}: logit diff clean {result.clean_logit_diff:.2f}, "
        f"corrupted {result.corrupted_logit_diff:.2f}"
    )
    for name, heads in result.heads.items():
        listed = ", ".join(f"{layer}.{head}" for layer, head in heads) or "none"
        typer.echo(f"  {name.replace('_', ' '):<20} {listed}")
    typer.echo(
        f"circuit: {len(result.circuit)}/{total} heads ({len(result.circuit) / total:.1%}), "
        f"faithfulness {result.faithfulness:.1%}, completeness {result.completeness:.1%}; "
        f"target (<=10% of heads, >=80%) {'met' if result.meets_target() else 'not met'}"
    )
    typer.echo(f"wrote {paths['json']} and {paths['html']} in {time.perf_counter() - start:.0f} s")
    record_run("circuits ioi", circuit_rows(result.to_json()), start=start, model=model,
               fingerprint=lm.fingerprint)  # fmt: skip
