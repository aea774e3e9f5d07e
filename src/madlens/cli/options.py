"""Typed options the commands share (model, dtype, device, hooks, out, seed) and the small
parsers that turn their strings into names, failing on a list that names nothing."""

from pathlib import Path
from typing import Annotated

import typer

from madlens.errors import MadlensError, check_output
from madlens.models.registry import DTYPE_CHOICES


def _check_dtype(value: str | None) -> str | None:
    if value is not None and value not in DTYPE_CHOICES:
        raise typer.BadParameter(
            f"unknown dtype '{value}'; choose one of {', '.join(DTYPE_CHOICES)}"
        )
    return value


def _check_device(value: str | None) -> str | None:
    """A device this machine has (`madlens.models.resolve_device`), checked before any work."""
    if value is None:
        return value
    from madlens.models.devices import resolve_device  # torch: only when a command runs

    try:
        resolve_device(value)
    except MadlensError as exc:
        raise typer.BadParameter(str(exc)) from exc
    return value


Model = Annotated[str, typer.Option(help="model name, Hugging Face id (org/name) or local dir")]
Dtype = Annotated[
    str,
    typer.Option(
        help="auto (bfloat16 where the device computes it natively: a CPU with native "
        "bfloat16, a CUDA GPU that supports it; else float32), float32, bfloat16 or float16",
        callback=_check_dtype,
    ),  # fmt: skip
]
Device = Annotated[
    str,
    typer.Option(
        help="where the model runs: auto (CUDA, else MPS, else the CPU), cpu, cuda, cuda:N or mps",
        callback=_check_device,
    ),  # fmt: skip
]
Hooks = Annotated[
    str | None,
    typer.Option(
        help="comma-separated hook names; integers mean resid_post layers (negative: from the "
        "end), all-resid every layer"
    ),  # fmt: skip
]
OutDir = Annotated[Path, typer.Option(help="output directory")]
Seed = Annotated[int, typer.Option(min=0, max=2**32 - 1, help="random seed")]


def _check_engine(value: str) -> str:
    from madlens.scale.cluster import ENGINES

    if value not in ENGINES:
        raise typer.BadParameter(f"unknown engine '{value}'; choose one of {', '.join(ENGINES)}")
    return value


Engine = Annotated[
    str,
    typer.Option(
        help="local (this process) or ray (a pool of Ray workers; pip install 'madlens[ray]')",
        callback=_check_engine,
    ),  # fmt: skip
]
RayAddress = Annotated[
    str | None,
    typer.Option(
        help="with --engine ray: a running cluster's address (host:port, ray://host:port, "
        "auto; default $RAY_ADDRESS, else a local cluster)"
    ),  # fmt: skip
]


def names(value: str | None, option: str) -> list[str] | None:
    """The names of a comma-separated option, or None when it was not given. A list that
    names nothing (`--tasks ,`) is an error, never "all"."""
    if value is None:
        return None
    found = [part.strip() for part in value.split(",") if part.strip()]
    if not found:
        raise MadlensError(f"--{option} '{value}' names nothing; give comma-separated names")
    return found


def output_dir(path: Path) -> Path:
    """Fail before any work when `path` cannot become an output directory: it is a file, or
    a file stands where one of its parents should be."""
    check_output(path, directory=True)
    for parent in Path(path).absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise MadlensError(f"cannot create output directory {path}: {parent} is a file")
            break
    return path


def output_file(path: Path) -> Path:
    """Fail before any work when `path` cannot become an output file: it is a directory, or
    a file stands where its folder should be."""
    check_output(path, directory=False)
    output_dir(Path(path).parent)
    return path
