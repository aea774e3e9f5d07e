"""Training text for SAEs: the default offline corpus (Python docs, package docstrings) or a
user's files / Hugging Face dataset, deduplicated, tokenized and packed into context windows.

The default corpus needs no network: Python's own documentation (`pydoc_data.topics`), the
docstrings of the standard library and of every installed package (read with `ast`, nothing
is imported), and the long descriptions of installed distributions. Documents come in a
seeded order, so the windows for a small token budget are a prefix of those for a larger one.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import random
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from madlens import cache
from madlens.errors import MadlensError

DEFAULT = "default"
MIN_CHARS = 80  # shorter docstrings ("Return self.") carry little text
_SKIP_DIRS = {"test", "tests", "testing", "idlelib", "__pycache__"}
_TEXT_SUFFIXES = {".txt", ".md", ".rst"}


# --- documents ---------------------------------------------------------------------------------


def _docstrings(path: Path) -> list[str]:
    """Module, class and function docstrings of one source file (parsed, never imported)."""
    try:
        tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError, OSError):
        return []
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= MIN_CHARS:
                found.append(doc)
    return found


def _source_files() -> list[Path]:
    """Python files of the standard library and of installed packages, tests left out."""
    roots = {Path(sysconfig.get_paths()[key]) for key in ("stdlib", "purelib", "platlib")}
    files: set[Path] = set()
    for root in roots:
        if not root.is_dir():
            continue
        for path in root.rglob("*.py"):
            parts = path.relative_to(root).parts
            if not _SKIP_DIRS.intersection(parts) and ".venv" not in parts:
                files.add(path)
    return sorted(files)


def default_documents(seed: int = 0) -> Iterator[str]:
    """The default corpus, document by document, in a seeded order."""
    from pydoc_data.topics import topics

    yield from (topics[name] for name in sorted(topics))
    units: list[Any] = list(_source_files())
    for dist in sorted(importlib.metadata.distributions(), key=lambda d: d.metadata["Name"] or ""):
        description = dist.metadata.get_payload() or dist.metadata.get("Description") or ""
        if len(description) >= MIN_CHARS:
            units.append(description)
    random.Random(seed).shuffle(units)
    for unit in units:
        if isinstance(unit, str):
            yield unit
        else:
            yield from _docstrings(unit)


def _file_documents(path: Path) -> Iterator[str]:
    if path.suffix == ".jsonl":
        from madlens.data import read_jsonl
        from madlens.data.jsonl import record_input

        for record in read_jsonl(path):
            item = record_input(record, f"{path}:{record['_line']}")
            yield item if isinstance(item, str) else "\n\n".join(m["content"] for m in item)
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            where = f"byte {exc.start + 1}"
            raise MadlensError(f"corpus file {path} is not UTF-8 text ({where})") from exc
        # blank-line-separated paragraphs are the documents of a plain text file
        yield from (part for part in text.split("\n\n") if part.strip())


def _hf_documents(name: str) -> Iterator[str]:
    try:
        import datasets

        data = datasets.load_dataset(name, split="train", streaming=True)
    except Exception as exc:  # noqa: BLE001 - the hub and the loaders raise many types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise MadlensError(f"could not load corpus '{name}': {first}") from exc
    for row in data:
        text = row.get("text")
        if not isinstance(text, str):
            raise MadlensError(f"dataset '{name}' has no 'text' column")
        yield text


def read_documents(spec: str, seed: int = 0) -> Iterator[str]:
    """Documents of a corpus spec: `default`, a `.txt` / `.md` / `.jsonl` file, a folder of
    them, or a Hugging Face dataset name (needs network; its `text` column)."""
    if spec == DEFAULT:
        yield from default_documents(seed)
        return
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in _TEXT_SUFFIXES | {".jsonl"})
        if not files:
            raise MadlensError(f"corpus folder {path} holds no .txt, .md, .rst or .jsonl file")
        for file in files:
            yield from _file_documents(file)
    elif path.is_file():
        yield from _file_documents(path)
    elif path.suffix or spec.startswith((".", "/", "~")):
        raise MadlensError(f"corpus file {path} does not exist")
    else:
        yield from _hf_documents(spec)


# --- packing -----------------------------------------------------------------------------------


def pack(
    documents: Iterable[str],
    tokenizer: Any,
    context_size: int,
    n_windows: int,
    progress: bool = True,
) -> tuple[np.ndarray, int]:
    """Deduplicate documents, tokenize them, join them with the end-of-text token and cut
    the stream into `n_windows` windows of `context_size` tokens (fewer if the text runs out).

    Returns the `(windows, context_size)` int32 token ids and the number of documents used.
    """
    if context_size < 2:
        raise MadlensError(f"context size must be at least 2 tokens, got {context_size}")
    separator = tokenizer.eos_token_id
    needed = n_windows * context_size
    seen: set[bytes] = set()
    stream: list[int] = []
    used = 0
    with tqdm(total=needed, desc="corpus", unit="tok", disable=not progress) as bar:
        for document in documents:
            key = hashlib.blake2b(" ".join(document.split()).encode(), digest_size=16).digest()
            if key in seen or not document.strip():
                continue
            seen.add(key)
            ids = tokenizer(document, add_special_tokens=False)["input_ids"]
            if separator is not None:
                ids = [*ids, separator]
            stream.extend(ids)
            used += 1
            bar.update(min(len(ids), needed - bar.n))
            if len(stream) >= needed:
                break
    count = min(n_windows, len(stream) // context_size)
    if count == 0:
        raise MadlensError(f"the corpus holds fewer than {context_size} tokens")
    windows = np.asarray(stream[: count * context_size], dtype=np.int32)
    return windows.reshape(count, context_size), used


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of the vocabulary (windows of token ids are only valid for one tokenizer)."""
    return cache.key(vocab=sorted(tokenizer.get_vocab().items()))


def _corpus_key(spec: str, tokenizer: Any, context_size: int, n_windows: int, seed: int) -> str:
    if spec == DEFAULT:
        dists = sorted(
            f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions()
        )
        source: Any = [sys.version, dists]
    else:
        path = Path(spec).expanduser()
        files = sorted(path.rglob("*")) if path.is_dir() else [path] if path.is_file() else []
        source = [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()]
        source = source or spec
    return cache.key(spec=spec, source=source, tokenizer=tokenizer_fingerprint(tokenizer),
                     context_size=context_size, n_windows=n_windows, seed=seed)  # fmt: skip


def build_corpus(
    spec: str,
    tokenizer: Any,
    context_size: int,
    tokens: int,
    *,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> np.ndarray:
    """`(windows, context_size)` token ids holding about `tokens` tokens of corpus `spec`,
    cached as a `.npy` file (the default corpus takes a minute or two to read)."""
    n_windows = max(1, -(-tokens // context_size))
    root = Path(cache_dir) if cache_dir is not None else cache.folder("corpora")
    path = root / f"{_corpus_key(spec, tokenizer, context_size, n_windows, seed)}.safetensors"

    def compute() -> dict[str, np.ndarray]:
        windows, _ = pack(read_documents(spec, seed), tokenizer, context_size, n_windows, progress)
        return {"windows": windows}

    return cache.load_or_compute(path, compute)["windows"]
