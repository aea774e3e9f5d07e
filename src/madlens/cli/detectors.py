"""`madlens detectors list`: every registered detector, what it needs, and its source."""

import typer

app = typer.Typer(help="The anomaly detectors.", no_args_is_help=True)
CONTRAST = {
    "none": "",
    "generic": " + generic contrast pairs",
    "refusal": " + harmful/harmless instructions",
    "task": " + task contrast pairs",
}


def needs(cls: type) -> str:
    """What a detector class reads: its input kind, contrast pairs, untrusted batch and
    measurements."""
    kind = {"transcripts": "transcripts (queries the model)"}.get(cls.input_kind, cls.input_kind)
    untrusted = " + untrusted batch" if cls.uses_untrusted else ""
    measured = " + measurements" if cls.reads_measurements else ""
    return f"{kind}{CONTRAST.get(cls.contrast_source, '')}{untrusted}{measured}"


@app.command("list")
def detectors_list() -> None:
    """List the detectors: name, what fit needs, whether it sees labels, and its reference."""
    from madlens.detectors import DETECTORS

    typer.echo(f"{'detector':<24} {'needs':<46} labels")
    for name, cls in DETECTORS.items():
        labels = "supervised" if cls.supervised else "label-free"
        typer.echo(f"{name:<24} {needs(cls):<46} {labels}")
        typer.echo(f"{'':<24} {cls.summary()}")
        if cls.reference:
            typer.echo(f"{'':<24} reference: {cls.reference}")
