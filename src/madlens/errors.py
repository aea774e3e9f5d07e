"""The one exception type for bad input: the CLI prints its message as a single line.

A leaf module that every part of madlens may import (it imports nothing of madlens).
"""

from pathlib import Path


class MadlensError(Exception):
    """A user-facing error: wrong argument, missing or malformed file, unknown model/hook."""


def check_output(path: Path, directory: bool) -> None:
    """Fail before any work when an output `path` already exists as the wrong kind (a file
    where a directory is wanted, or the reverse), instead of after a long run."""
    path = Path(path)
    if directory and path.exists() and not path.is_dir():
        raise MadlensError(f"output directory {path} exists and is a file")
    if not directory and path.is_dir():
        raise MadlensError(f"output file {path} is a directory")
