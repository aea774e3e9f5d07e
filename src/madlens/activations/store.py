"""`Activations` (the rows captured per hook) and their on-disk cache: safetensors shards
keyed by model fingerprint + hook + position spec + data hash, read back as a stream."""

import hashlib
import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

LOGITS = "output.logits"
LOGPROBS = "output.token_logprobs"
FORMAT_VERSION = 2  # 2: a conversation's log-probs cover its last message only


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


def data_hash(inputs: list) -> str:
    """A stable hash of the inputs (texts or conversations)."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def cache_key(
    fingerprint: str, dtype: str, position: str, inputs_hash: str, max_length: int
) -> str:
    """The cache folder name for one (model, dtype, position, data, context) combination."""
    blob = json.dumps([FORMAT_VERSION, fingerprint, dtype, position, inputs_hash, max_length])
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _slot(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


class ActivationCache:
    """One cache entry: a folder per hook (and per output statistic) of shard files, each
    shard holding a consecutive chunk of inputs. A hook is complete once its `done` file is
    written, so an interrupted run never leaves a half cache that looks whole."""

    def __init__(self, root: Path, meta: dict) -> None:
        self.root = Path(root)
        self.meta = meta

    def has(self, name: str) -> bool:
        """Whether hook (or output statistic) `name` is fully cached."""
        return (self.root / _slot(name) / "done").is_file()

    def writer(self, name: str) -> "ShardWriter":
        """A writer for `name`'s shards (replacing any partial ones)."""
        folder = self.root / _slot(name)
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        (self.root / "meta.json").write_text(json.dumps(self.meta, indent=1))
        return ShardWriter(folder)

    def shards(self, name: str) -> list[Path]:
        """The shard files of `name`, in input order."""
        return sorted((self.root / _slot(name)).glob("shard-*.safetensors"))


class ShardWriter:
    """Appends shards to one hook's folder and marks it complete."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.count = 0

    def write(self, tensors: dict[str, np.ndarray]) -> None:
        """Write one shard (a dict of contiguous arrays)."""
        path = self.folder / f"shard-{self.count:05d}.safetensors"
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path))
        self.count += 1

    def close(self) -> None:
        """Mark the hook complete."""
        (self.folder / "done").write_text(str(self.count))


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
