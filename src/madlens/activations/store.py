"""`Activations` (the rows captured per hook) and their on-disk cache: safetensors shards
keyed by model fingerprint + hook + position spec + data hash, read back as a stream."""

import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from madlens import cache

LOGITS = "output.logits"
LOGPROBS = "output.token_logprobs"
# 2: a conversation's log-probs cover its last message only; 3: madlens.cache keys, and a
# hook's folder appears whole (renamed into place) or not at all
FORMAT_VERSION = 3


@dataclass
class Activations:
    """Activations of `n` inputs at one or more hooks.

    `acts[hook]` has one row per kept position: `lengths[i]` rows for input `i`, in input
    order (so `last` and `mean` give exactly one row per input). `logits` are the final
    token's next-token logits `(n, vocab)`; `token_logprobs[i]` is the log-prob of each
    actual token in input `i`'s span given the tokens before it.
    """

    acts: dict[str, np.ndarray]
    lengths: np.ndarray
    position: str
    logits: np.ndarray | None = None
    token_logprobs: list[np.ndarray] | None = None
    truncated: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, hook: str) -> np.ndarray:
        return self.acts[hook]

    @property
    def hooks(self) -> list[str]:
        """The hooks captured, in request order."""
        return list(self.acts)

    def per_input(self, hook: str) -> list[np.ndarray]:
        """`acts[hook]` split into one `(rows, ...)` array per input."""
        return np.split(self.acts[hook], np.cumsum(self.lengths)[:-1])

    @staticmethod
    def concat(parts: list["Activations"]) -> "Activations":
        """Join activations of consecutive chunks of inputs."""
        first = parts[0]
        return Activations(
            acts={h: np.concatenate([p.acts[h] for p in parts]) for h in first.acts},
            lengths=np.concatenate([p.lengths for p in parts]),
            position=first.position,
            logits=None if first.logits is None else np.concatenate([p.logits for p in parts]),
            token_logprobs=None
            if first.token_logprobs is None
            else [lp for p in parts for lp in p.token_logprobs],
            truncated=np.concatenate([p.truncated for p in parts]),
        )


def cache_key(
    fingerprint: str,
    dtype: str,
    position: str,
    inputs: list,
    max_length: int,
    device: str | None = None,
) -> str:
    """The cache folder name for one (model, dtype, position, data, context) combination,
    and the device type (`cuda`, `mps`) when it is not the CPU: `None` (the CPU) adds
    nothing to the key, so entries computed on the CPU keep their keys."""
    where = {} if device is None else {"device": device}
    return cache.key(format=FORMAT_VERSION, model=fingerprint, dtype=dtype, position=position,
                     inputs=inputs, max_length=max_length, **where)  # fmt: skip


def _slot(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


class ActivationCache:
    """One cache entry: a folder per hook (and per output statistic) of shard files, each
    shard holding a consecutive chunk of inputs. A hook's shards are written into a
    temporary folder renamed into place when complete, so an interrupted run never leaves
    a half cache that looks whole."""

    def __init__(self, root: Path, meta: dict) -> None:
        self.root = Path(root)
        self.meta = meta

    def has(self, name: str) -> bool:
        """Whether hook (or output statistic) `name` is fully cached."""
        return (self.root / _slot(name)).is_dir()

    def writer(self, name: str) -> "ShardWriter":
        """A writer for `name`'s shards; they appear under the hook's name on `close`."""
        self.root.mkdir(parents=True, exist_ok=True)
        if not (self.root / "meta.json").is_file():
            with cache.atomic(self.root / "meta.json") as tmp:
                tmp.write_text(json.dumps(self.meta, indent=1))
        return ShardWriter(self.root / _slot(name))

    def shards(self, name: str) -> list[Path]:
        """The shard files of `name`, in input order."""
        return sorted((self.root / _slot(name)).glob("shard-*.safetensors"))


class ShardWriter:
    """Appends shards to a temporary folder and renames it to the hook's folder on `close`
    (an interrupted writer leaves only a `.partial-*` folder, which no reader opens)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._writing = cache.atomic(folder)
        self.tmp = self._writing.__enter__()
        self.tmp.mkdir()
        self.count = 0

    def write(self, tensors: dict[str, np.ndarray]) -> None:
        """Write one shard (a dict of contiguous arrays)."""
        write_shard(self.tmp, self.count, tensors)
        self.count += 1

    def close(self) -> None:
        """Put the complete folder in place."""
        self._writing.__exit__(None, None, None)

    def abort(self) -> None:
        """Drop what was written."""
        shutil.rmtree(self.tmp, ignore_errors=True)


def shard_file(folder: Path, index: int) -> Path:
    """The file of shard `index` (the inputs `index * CHUNK` onwards) in a hook's folder."""
    return Path(folder) / f"shard-{index:05d}.safetensors"


def write_shard(folder: Path, index: int, tensors: dict[str, np.ndarray]) -> Path:
    """Write shard `index` into `folder` (a writer's temporary folder), whole or not at all:
    workers of the Ray engine write shards of one folder side by side, in any order."""
    path = shard_file(folder, index)
    with cache.atomic(path) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp))
    return path


def chunk_to_tensors(chunk: Activations, name: str) -> dict[str, np.ndarray]:
    """The arrays of one chunk that go into `name`'s shard."""
    if name == LOGITS:
        return {"logits": chunk.logits}
    if name == LOGPROBS:
        lps = chunk.token_logprobs
        return {
            "values": np.concatenate(lps) if lps else np.zeros(0, np.float32),
            "lengths": np.array([len(x) for x in lps], dtype=np.int64),
        }
    return {
        "acts": chunk.acts[name],
        "lengths": chunk.lengths.astype(np.int64),
        "truncated": chunk.truncated.astype(np.uint8),
    }


def iter_cached(
    cache: ActivationCache, hooks: list[str], position: str, logits: bool, logprobs: bool
) -> Iterator[Activations]:
    """Stream the cached chunks back, one shard per hook at a time (memory stays at one
    shard whatever the size of the data)."""
    names = list(hooks) + ([LOGITS] if logits else []) + ([LOGPROBS] if logprobs else [])
    shard_lists = {name: cache.shards(name) for name in names}
    counts = {len(s) for s in shard_lists.values()}
    if len(counts) != 1:
        raise RuntimeError(f"corrupt activation cache at {cache.root}: shard counts differ")
    for index in range(counts.pop()):
        acts, lengths, truncated = {}, None, None
        for hook in hooks:
            data = load_file(str(shard_lists[hook][index]))
            acts[hook] = data["acts"]
            lengths, truncated = data["lengths"], data["truncated"].astype(bool)
        chunk_logits = chunk_logprobs = None
        if logits:
            chunk_logits = load_file(str(shard_lists[LOGITS][index]))["logits"]
        if logprobs:
            data = load_file(str(shard_lists[LOGPROBS][index]))
            chunk_logprobs = np.split(data["values"], np.cumsum(data["lengths"])[:-1])
            if lengths is None:
                lengths = np.ones(len(data["lengths"]), dtype=np.int64)
        if lengths is None:
            lengths = np.ones(len(chunk_logits), dtype=np.int64)
        if truncated is None:
            truncated = np.zeros(len(lengths), dtype=bool)
        yield Activations(acts, lengths, position, chunk_logits, chunk_logprobs, truncated)
