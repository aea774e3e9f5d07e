"""Batch scoring through Ray: a saved monitor's verdicts on many inputs, from a pool of actors
that each load the monitor (and its model) once.

Ray Data: `from_items` (one row per input, carrying its index) → `map_batches` over an actor
pool, each actor running `Monitor.score(batch, cache=False).rows()` (what the local engine
runs) → rows back to the driver, which yields them in input order whatever order they
arrive in. The monitor's folder travels to the actors with the job (it is small), so the
workers need the model, not the driver's files.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from madlens.errors import MadlensError
from madlens.models.devices import host
from madlens.monitor import Monitor
from madlens.scale.cluster import (
    actor_resources,
    data_context,
    map_batches,
    pool_size,
    session,
    worker_error,
)

BATCH = 64  # inputs per actor call


def pack(folder: Path) -> dict[str, bytes]:
    """A saved monitor's files by relative path (what its actors rebuild it from)."""
    folder = Path(folder)
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


class ScoreWorker:
    """A Ray Data actor: rebuilds the monitor from its files, loads its model once, and
    scores batches of inputs (JSON texts or conversations) into JSON verdict rows."""

    def __init__(self, files: dict[str, bytes], model: str | None, device: str) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="madlens-monitor-"))
        for name, data in files.items():
            path = self.folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        self.monitor = Monitor.load(self.folder, model=model, device=device, progress=False)
        _ = self.monitor.model  # load it (and check its fingerprint) before the first batch

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        inputs = [json.loads(str(text)) for text in batch["input"]]
        rows = self.monitor.score(inputs, cache=False).rows()
        return {
            "index": np.asarray(batch["index"], dtype=np.int64),
            "row": np.asarray([json.dumps(row) for row in rows]),
        }

    def __del__(self) -> None:
        shutil.rmtree(getattr(self, "folder", ""), ignore_errors=True)


def _device_type(ray: Any, device: str) -> str:
    """The actors' device: `auto` is CUDA where the cluster has GPUs, else the CPU (the
    driver's own hardware does not decide: it may be a CPU-only head node)."""
    if device == "auto":
        return "cuda" if ray.cluster_resources().get("GPU", 0) >= 1 else host().type
    kind = device.split(":")[0]
    if kind not in (host().type, "cuda", "mps"):
        raise MadlensError(f"unknown device '{device}'; choose one of auto, cpu, cuda, mps")
    return kind


def score_rows(
    monitor: str | Path,
    inputs: Sequence[Any],
    *,
    model: str | None = None,
    device: str = "auto",
    batch_size: int = BATCH,
    address: str | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> Iterator[dict[str, Any]]:
    """Score `inputs` with the monitor saved at `monitor` on a Ray cluster; yield one verdict
    row per input (`Scores.rows()`: scores, p-values, combined p-value, flag, top hook), in
    input order, as they arrive.

    The monitor is read on the driver first (a bad folder fails before Ray starts); `model`
    overrides its saved model spec, as in `Monitor.load`. `address`, `workers`: as in
    `fill_cache` (default: one actor per GPU, else per CPU). `device`: the actors' device
    (`auto`: CUDA when the cluster has GPUs, one per actor)."""
    folder = Path(monitor)
    Monitor.load(folder, model=model, device=host(), progress=False)  # checked, not loaded
    inputs = list(inputs)
    if not inputs:
        raise MadlensError("no inputs to score")
    if batch_size < 1:
        raise MadlensError(f"batch_size must be at least 1, got {batch_size}")
    items = [{"index": i, "input": json.dumps(x)} for i, x in enumerate(inputs)]
    n_blocks = math.ceil(len(items) / batch_size)
    with session(address) as ray:
        import ray.data

        kind = _device_type(ray, device)
        size = pool_size(ray, kind, n_blocks, workers)
        desc = f"score (ray x{size})"
        with (
            data_context(preserve_order=True),
            tqdm(total=len(items), desc=desc, unit="input", disable=not progress) as bar,
        ):
            dataset = map_batches(
                ray.data.from_items(items, override_num_blocks=n_blocks),
                ScoreWorker,
                batch_size=batch_size,
                compute=ray.data.ActorPoolStrategy(size=size),
                fn_constructor_kwargs={"files": pack(folder), "model": model, "device": kind},
                **actor_resources(kind),
            )
            pending: dict[int, dict[str, Any]] = {}
            following = 0
            try:
                for item in dataset.iter_rows():
                    pending[int(item["index"])] = json.loads(str(item["row"]))
                    bar.update(1)
                    while following in pending:
                        yield pending.pop(following)
                        following += 1
            except Exception as exc:
                found = worker_error(exc)
                if found is not None:
                    raise found from None
                raise
    if following != len(items):
        raise MadlensError(f"the Ray job returned {following} of {len(items)} verdicts")
