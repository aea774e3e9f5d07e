"""The one on-disk cache: the home folder (`MADLENS_HOME`), cache keys, atomic load-or-compute.

Every cached result lives under `home() / kind`, named by `key(...)`, as safetensors or JSON
(never pickle). Writes go to a temporary sibling that is renamed into place, so an
interrupted run never leaves a partial file that a later run would read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

__all__ = [
    "KEY_LENGTH",
    "Entry",
    "atomic",
    "clear",
    "entries",
    "folder",
    "home",
    "key",
    "load_or_build_dir",
    "load_or_compute",
    "touch",
]

#: Hex characters of every cache key (96 bits: collisions are not a practical concern).
KEY_LENGTH = 24
_PARTIAL = ".partial-"
T = TypeVar("T")


def home() -> Path:
    """Where madlens keeps converted models, caches and fine-tunes: `$MADLENS_HOME`, or
    `~/.cache/madlens`."""
    return Path(os.environ.get("MADLENS_HOME") or Path.home() / ".cache" / "madlens")


def folder(kind: str) -> Path:
    """The cache folder of one kind of result (`activations`, `adapters`, ...): a plain
    name, so that nothing outside the home folder is ever read or cleared as cache."""
    if not kind or kind in (".", "..") or Path(kind).name != kind or "\\" in kind:
        raise ValueError(f"a cache kind is a plain folder name, not {kind!r}")
    return home() / kind


def _encode(value: Any) -> Any:
    """JSON form of a key part: arrays and tensors by a digest of their bytes, dtype and
    shape; dataclasses as dicts; paths and anything else as text."""
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu()
        value = value.float().numpy() if str(value.dtype) == "torch.bfloat16" else value.numpy()
    if isinstance(value, np.ndarray):
        data = np.ascontiguousarray(value)
        digest = hashlib.sha256(data.tobytes()).hexdigest()
        return {"array": digest, "dtype": str(data.dtype), "shape": list(data.shape)}
    if isinstance(value, np.generic):
        return value.item()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return str(value)


def key(**parts: Any) -> str:
    """The cache key of a result: a hash of its named parts (anything JSON can hold, plus
    arrays, tensors, dataclasses and paths), `KEY_LENGTH` hex characters."""
    blob = json.dumps(parts, sort_keys=True, default=_encode)
    return hashlib.sha256(blob.encode()).hexdigest()[:KEY_LENGTH]


@contextmanager
def atomic(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write (a file or a folder); on success it is
    renamed to `path` (replacing what was there), on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}{_PARTIAL}{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        if path.is_dir() and tmp.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def _read(path: Path, as_torch: bool) -> Any:
    if path.suffix == ".json":
        return json.loads(path.read_text(encoding="utf-8"))
    if as_torch:
        from safetensors.torch import load_file as load_torch

        return load_torch(str(path))
    from safetensors.numpy import load_file

    return load_file(str(path))


def _write(path: Path, value: Any, suffix: str) -> None:
    if suffix == ".json":
        path.write_text(json.dumps(value), encoding="utf-8")
        return
    if any(hasattr(v, "detach") for v in value.values()):
        from safetensors.torch import save_file as save_torch

        save_torch({k: v.detach().contiguous() for k, v in value.items()}, str(path))
        return
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in value.items()}, str(path))


def load_or_compute(path: str | Path | None, compute: Callable[[], T], as_torch: bool = False) -> T:
    """The cached value at `path`, or `compute()` stored there atomically first.

    `path` ends in `.json` (any JSON value) or `.safetensors` (a dict of numpy arrays or torch
    tensors; read back as numpy unless `as_torch`). `path=None` computes without caching."""
    if path is None:
        return compute()
    path = Path(path)
    if path.suffix not in (".json", ".safetensors"):
        raise ValueError(f"cache files are .json or .safetensors, not {path.name}")
    if path.is_file():
        touch(path)
        return _read(path, as_torch)
    value = compute()
    with atomic(path) as tmp:
        _write(tmp, value, path.suffix)
    return value


def load_or_build_dir(path: str | Path, build: Callable[[Path], None]) -> Path:
    """`path`, a cached folder; when missing, `build(tmp)` fills a temporary folder that is
    then renamed to `path` (so a folder that exists is always complete)."""
    path = Path(path)
    if path.is_dir():
        touch(path)
        return path
    with atomic(path) as tmp:
        tmp.mkdir(parents=True)
        build(tmp)
    return path


def touch(path: Path) -> None:
    """Mark a cache hit (`clear --older-than` frees what was not used, not what is old)."""
    try:
        os.utime(path)
    except OSError:  # a read-only cache still serves reads
        pass


# --- listing and clearing ----------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One cached item: a file or folder directly inside a kind's folder."""

    kind: str
    path: Path
    size: int
    modified: float  # seconds since the epoch, newest file inside


def _measure(path: Path) -> tuple[int, float]:
    if path.is_file():
        stat = path.stat()
        return stat.st_size, stat.st_mtime
    size, modified = 0, path.stat().st_mtime
    for sub in path.rglob("*"):
        if sub.is_file():
            stat = sub.stat()
            size += stat.st_size
            modified = max(modified, stat.st_mtime)
    return size, modified


def entries(kind: str | None = None) -> list[Entry]:
    """Every cached item (of one kind, or of all), largest first. Leftovers of interrupted
    writes are listed too (under their own names), so that `clear` can free them."""
    root = home()
    if not root.is_dir():
        return []
    kinds = [folder(kind)] if kind is not None else sorted(p for p in root.iterdir() if p.is_dir())
    found = []
    for kind_dir in kinds:
        if not kind_dir.is_dir():
            continue
        for item in kind_dir.iterdir():
            size, modified = _measure(item)
            found.append(Entry(kind_dir.name, item, size, modified))
    return sorted(found, key=lambda e: -e.size)


def clear(older_than_days: float | None = None, kind: str | None = None) -> list[Entry]:
    """Delete cached items (not used for `older_than_days`, when given); returns them."""
    cutoff = None if older_than_days is None else time.time() - older_than_days * 86400
    removed = []
    for entry in entries(kind):
        if cutoff is not None and entry.modified >= cutoff:
            continue
        if entry.path.is_dir():
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            entry.path.unlink(missing_ok=True)
        removed.append(entry)
    return removed
