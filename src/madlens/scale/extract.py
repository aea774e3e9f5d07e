"""Fill the activation cache through Ray: the same entries, keys and shards as the local
engine, computed by a pool of actors that each hold the model.

The driver plans exactly what `madlens.activations.stream` would (the entry's key, the hooks
and output statistics it lacks), cuts the inputs into the cache's `CHUNK`-input shards, and
runs them through Ray Data: `from_items` (one row per shard) → `map_batches` over an actor
pool, each actor loading the model once and computing its shards with
`activations.compute_shard` (the local engine's function) straight into the writer's
temporary folders. The driver then checks that every shard is there and renames each
folder into place, as the local writer does; a later `extract` / `stream` finds the entry
complete and computes nothing.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from madlens.activations.capture import (
    CHUNK,
    cache_entry,
    compute_shard,
    context_limit,
    encode_inputs,
    entry_names,
    prepare,
)
from madlens.activations.positions import encode
from madlens.activations.store import ActivationCache, ShardWriter, shard_file, write_shard
from madlens.cache import touch
from madlens.errors import MadlensError
from madlens.scale.cluster import (
    actor_resources,
    data_context,
    map_batches,
    pool_size,
    session,
    worker_error,
)


@dataclass
class Request:
    """One `extract` call's worth of activations: what `fill_cache` puts in the cache so that
    `extract(model, inputs, hooks, position, logits=..., logprobs=..., max_length=...)`
    afterwards reads it all from there."""

    inputs: Sequence[Any]
    hooks: Sequence[str]
    position: str = "last"
    logits: bool = False
    logprobs: bool = False
    max_length: int | None = None
    strict: bool = False


@dataclass
class FillReport:
    """What a `fill_cache` run did: the cache entries of the requests (in request order),
    the shards and inputs it computed, its wall time (the pool's start and each actor's
    model load included), the pool size, and each actor's busy time by process id (the
    forward passes and shard writes of its shards, model load excluded)."""

    entries: list[Path]
    shards: int = 0
    inputs: int = 0
    seconds: float = 0.0
    workers: int = 0
    busy: dict[int, float] = field(default_factory=dict)

    @property
    def worker_rate(self) -> float:
        """Inputs per second of one actor while it computes (model load excluded)."""
        total = sum(self.busy.values())
        return self.inputs / total if total else 0.0


@dataclass
class _Job:
    cache: ActivationCache
    inputs: list[Any]
    position: str
    limit: int
    names: list[str]
    writers: dict[str, ShardWriter] = field(default_factory=dict)

    @property
    def n_shards(self) -> int:
        return math.ceil(len(self.inputs) / CHUNK)


def model_load_args(model: Any) -> dict[str, Any]:
    """How a worker loads the same model as the driver: the spec `load_model` was given, the
    adapter, the resolved dtype (never `auto`: every worker computes in the driver's) and
    the device type (each CUDA actor sees the one GPU Ray gives it as `cuda`)."""
    if not getattr(model, "spec", ""):
        raise MadlensError(
            "the Ray engine loads the model by name in each worker: load it with load_model"
        )
    return {
        "spec": model.spec,
        "dtype": str(model.dtype).removeprefix("torch."),
        "adapter": model.adapter,
        "device": model.device.type,
    }


class ShardWorker:
    """A Ray Data actor: loads the model once (checking its weights fingerprint against the
    driver's), then computes whole shards with `compute_shard` and writes them into the
    writers' temporary folders. Returns one small row per shard (job, shard, inputs,
    seconds, process id)."""

    def __init__(
        self,
        load: dict[str, Any],
        fingerprint: str,
        jobs: list[dict[str, Any]],
        batch_size: int,
        padding_side: str,
    ) -> None:
        from madlens.models import load_model

        self.model = load_model(**load)
        if self.model.fingerprint != fingerprint:
            raise MadlensError(
                f"a Ray worker loaded {load['spec']} with weights fingerprint "
                f"{self.model.fingerprint}, not the driver's {fingerprint}: the workers must "
                "see the same model files"
            )
        self.jobs = jobs
        self.batch_size = batch_size
        self.padding_side = padding_side

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list] = {"job": [], "shard": [], "n": [], "seconds": [], "pid": []}
        for job_index, shard, text in zip(batch["job"], batch["shard"], batch["inputs"]):
            start = time.perf_counter()
            job = self.jobs[int(job_index)]
            position = job["position"]
            inputs = json.loads(str(text))
            encoded = [encode(self.model.tokenizer, x, position, job["limit"]) for x in inputs]
            arrays = compute_shard(self.model, encoded, job["names"], position, self.batch_size,
                                   self.padding_side)  # fmt: skip
            for name, folder in job["folders"].items():
                write_shard(Path(folder), int(shard), arrays[name])
            out["job"].append(int(job_index))
            out["shard"].append(int(shard))
            out["n"].append(len(inputs))
            out["seconds"].append(time.perf_counter() - start)
            out["pid"].append(os.getpid())
        return {key: np.asarray(values) for key, values in out.items()}


def _plan(
    model: Any, requests: Sequence[Request], cache_dir: str | Path | None
) -> tuple[list[Path], list[_Job]]:
    """The cache entries of the requests and the jobs that fill what they lack; two requests
    of one entry (same inputs and position) share one job."""
    entries: list[Path] = []
    jobs: dict[Path, _Job] = {}
    for request in requests:
        inputs, hooks = prepare(model, request.inputs, request.hooks, request.position)
        cache = cache_entry(model, inputs, request.position, request.max_length, cache_dir)
        entries.append(cache.root)
        wanted = entry_names(hooks, request.logits, request.logprobs)
        missing = [name for name in wanted if not cache.has(name)]
        if not missing:
            touch(cache.root)
            continue
        limit = context_limit(model, request.max_length)
        # the local engine's check (--strict) and truncation warning, on the driver
        encode_inputs(model, inputs, request.position, limit, request.strict)
        job = jobs.setdefault(cache.root, _Job(cache, inputs, request.position, limit, []))
        job.names += [name for name in missing if name not in job.names]
    return entries, list(jobs.values())


def fill_cache(
    model: Any,
    requests: Sequence[Request],
    *,
    batch_size: int = 16,
    padding_side: str = "right",
    cache_dir: str | Path | None = None,
    address: str | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> FillReport:
    """Compute through Ray whatever the activation cache lacks for `requests` (each what one
    `extract` call would read), so that those `extract` calls then read it all from the
    cache. Results equal the local engine's (the same `compute_shard` on the same shards).

    Args:
        model: the driver's loaded `Model`; each worker loads the same spec, adapter, dtype
            and device type, and must find the same weights fingerprint.
        address: a running cluster (`host:port`, `ray://host:port`, `auto`; default
            `$RAY_ADDRESS`), else a local cluster with this machine's CPUs; a process
            already connected to Ray keeps its connection.
        workers: actors in the pool (default: one per GPU on CUDA, else one per CPU of the
            cluster, at most one per shard).
        cache_dir: the cache's `activations` folder by default; on a cluster of several
            machines it must be a folder every node sees at the same path (shared storage).
    """
    if padding_side not in ("left", "right"):
        raise MadlensError(f"padding_side must be 'left' or 'right', not '{padding_side}'")
    if batch_size < 1:
        raise MadlensError(f"batch_size must be at least 1, got {batch_size}")
    start = time.perf_counter()
    entries, jobs = _plan(model, requests, cache_dir)
    report = FillReport(entries)
    if not jobs:
        return report
    load = model_load_args(model)
    items = [
        {"job": j, "shard": s, "inputs": json.dumps(job.inputs[s * CHUNK : (s + 1) * CHUNK])}
        for j, job in enumerate(jobs)
        for s in range(job.n_shards)
    ]
    try:
        with session(address) as ray:
            report.workers = pool_size(ray, load["device"], len(items), workers)
            for job in jobs:
                job.writers = {name: job.cache.writer(name) for name in job.names}
            _run(ray, model, load, jobs, items, report, batch_size, padding_side, progress)
        _check_complete(jobs)
    except BaseException:
        for job in jobs:
            for writer in job.writers.values():
                writer.abort()
        raise
    for job in jobs:
        for writer in job.writers.values():
            writer.count = job.n_shards
            writer.close()
    report.seconds = time.perf_counter() - start
    return report


def _run(
    ray: Any,
    model: Any,
    load: dict[str, Any],
    jobs: list[_Job],
    items: list[dict[str, Any]],
    report: FillReport,
    batch_size: int,
    padding_side: str,
    progress: bool,
) -> None:
    specs = [
        {"position": job.position, "limit": job.limit, "names": job.names,
         "folders": {name: str(w.tmp) for name, w in job.writers.items()}}
        for job in jobs
    ]  # fmt: skip
    total = sum(len(job.inputs) for job in jobs)
    desc = f"activations ({model.name}, ray x{report.workers})"
    with data_context(), tqdm(total=total, desc=desc, unit="input", disable=not progress) as bar:
        dataset = map_batches(
            ray.data.from_items(items, override_num_blocks=len(items)),
            ShardWorker,
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(
                size=report.workers, max_tasks_in_flight_per_actor=1
            ),
            fn_constructor_kwargs={
                "load": load,
                "fingerprint": model.fingerprint,
                "jobs": specs,
                "batch_size": batch_size,
                "padding_side": padding_side,
            },  # fmt: skip
            **actor_resources(load["device"]),
        )
        try:
            for row in dataset.iter_rows():
                report.shards += 1
                report.inputs += int(row["n"])
                pid = int(row["pid"])
                report.busy[pid] = report.busy.get(pid, 0.0) + float(row["seconds"])
                bar.update(int(row["n"]))
        except Exception as exc:
            found = worker_error(exc)
            if found is not None:
                raise found from None
            raise


def _check_complete(jobs: list[_Job]) -> None:
    """Every shard of every folder is on the driver's disk (workers on other machines write
    to their own disks unless the cache is on storage every node shares)."""
    for job in jobs:
        for name, writer in job.writers.items():
            absent = [i for i in range(job.n_shards) if not shard_file(writer.tmp, i).is_file()]
            if absent:
                raise MadlensError(
                    f"{len(absent)} of {job.n_shards} shard(s) of {name} that the Ray workers "
                    f"wrote are not in {writer.tmp}: on a cluster of several machines the "
                    "activation cache (MADLENS_HOME) must be on storage every node shares"
                )
