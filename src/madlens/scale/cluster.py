"""The Ray side of the engine: importing Ray (an optional extra), checking a cluster address,
connecting to a cluster or starting a local one, sizing the actor pool, keeping Ray's own
logs off the terminal, and turning a worker's error back into one line.

Nothing here imports torch: `check_engine` answers at once on the command line.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from madlens.errors import MadlensError

ENGINES = ("local", "ray")
INSTALL = "pip install 'madlens[ray]'"
CONNECT_TIMEOUT_S = 5.0


def import_ray() -> Any:
    """The `ray` module, or one line saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401 - the engine runs on Ray Data
    except ImportError as exc:
        raise MadlensError(f"--engine ray needs Ray, which is not installed: {INSTALL}") from exc
    return ray


def check_engine(engine: str, address: str | None = None) -> str:
    """Fail with one line, before any work, on an unknown engine, a `--ray-address` without
    `--engine ray`, Ray missing, or an address where no cluster answers."""
    if engine not in ENGINES:
        raise MadlensError(f"unknown engine '{engine}'; choose one of {', '.join(ENGINES)}")
    if engine == "local":
        if address is not None:
            raise MadlensError("--ray-address needs --engine ray")
        return engine
    import_ray()
    if address is not None:
        check_address(address)
    return engine


def check_address(address: str) -> str:
    """Check that something listens at a Ray cluster address (`host:port`, `ray://host:port`
    or `auto`) within a few seconds: Ray itself retries an address where nothing answers
    for minutes."""
    if address == "auto":
        return address
    match = re.fullmatch(r"(?:ray://)?\[?([^\s\[\]/]+?)\]?:(\d{1,5})/?", address.strip())
    if match is None or not 0 < int(match.group(2)) < 65536:
        raise MadlensError(f"--ray-address '{address}' is not host:port, ray://host:port or auto")
    host, port = match.group(1), int(match.group(2))
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise MadlensError(
            f"no Ray cluster answers at {address} ({reason}): start one with 'ray start "
            "--head', or leave out --ray-address to run a local one"
        ) from exc
    return address


def _quiet_init_args() -> dict[str, Any]:
    return {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR}


@contextmanager
def session(address: str | None = None, num_cpus: int | None = None) -> Iterator[Any]:
    """Yield `ray`, connected: to the cluster at `address` (default: `$RAY_ADDRESS`), else to
    a new local cluster of `num_cpus` CPUs (default: this machine's). A process already
    connected (`ray.init` called before) keeps its connection. Whatever this call started,
    it shuts down."""
    ray = import_ray()
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is not None:
        check_address(address)
    if ray.is_initialized():
        yield ray
        return
    try:
        with quiet():
            if address is not None:
                ray.init(address=address, **_quiet_init_args())
            else:
                ray.init(num_cpus=num_cpus or os.cpu_count() or 1, **_quiet_init_args())
    except MadlensError:
        raise
    except Exception as exc:  # noqa: BLE001 - Ray raises many types for a failed start
        where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
        raise MadlensError(f"cannot connect to {where}: {first_line(exc)}") from exc
    try:
        yield ray
    finally:
        ray.shutdown()


class _Hide(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


@contextmanager
def quiet() -> Iterator[None]:
    """Keep Ray's and Ray Data's console logs (execution plans, deprecation notes, worker
    errors already raised to the caller) off the terminal; their log files keep them."""
    hide = _Hide()
    handlers = []
    for name in ("ray", "ray.data"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(
                handler, logging.FileHandler
            ):
                handler.addFilter(hide)
                handlers.append(handler)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(hide)


@contextmanager
def data_context(preserve_order: bool = False) -> Iterator[Any]:
    """Ray Data's context for one run of the engine: no progress bars (madlens shows its
    own), and outputs in input order when asked; restored afterwards."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.execution_options.preserve_order)
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = preserve_order
    try:
        with quiet():
            yield ctx
    finally:
        ctx.enable_progress_bars, ctx.execution_options.preserve_order = saved


def actor_resources(device_type: str) -> dict[str, Any]:
    """What one actor reserves: a whole GPU on CUDA (Ray then shows it that GPU only), one
    CPU elsewhere (Ray then sets its thread count to one)."""
    return {"num_gpus": 1} if device_type == "cuda" else {"num_cpus": 1}


def map_batches(dataset: Any, fn: type, **kwargs: Any) -> Any:
    """`dataset.map_batches(fn, ...)` over an actor pool whose actors are not restarted: one
    that dies fails the run with its error (run again, it starts over). Restartable actors
    would also make Ray's core print a line about their constructor arguments on every
    run. A Ray that no longer takes `max_restarts` here keeps its own default."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        try:
            return dataset.map_batches(fn, max_restarts=0, **kwargs)
        except TypeError:
            return dataset.map_batches(fn, **kwargs)


def pool_size(ray: Any, device_type: str, n_items: int, workers: int | None = None) -> int:
    """Actors in the pool: `workers`, or one per GPU (CUDA) or per CPU of the cluster, at
    most one per item of work and at most what the cluster can hold at once."""
    kind = "GPU" if device_type == "cuda" else "CPU"
    capacity = int(ray.cluster_resources().get(kind, 0))
    if capacity < 1:
        raise MadlensError(f"the Ray cluster has no {kind} for a {device_type} worker")
    if workers is not None and workers < 1:
        raise MadlensError(f"workers must be at least 1, got {workers}")
    return max(1, min(workers or capacity, capacity, n_items))


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


_MADLENS_ERROR = re.compile(r"MadlensError:\s*(.+)")


def worker_error(exc: BaseException) -> MadlensError | None:
    """The `MadlensError` a Ray worker raised (bad input seen only where the model loads: a
    fingerprint that does not match, an unknown model), found through Ray's wrappers; None
    for anything else, which the caller re-raises as it is."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        item = stack.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        # Ray's error wrappers can be instances of the cause's class too: read the cause
        if isinstance(item, MadlensError) and getattr(item, "cause", None) is None:
            return MadlensError(first_line(item))
        stack += [getattr(item, "cause", None), item.__cause__, item.__context__]
    match = _MADLENS_ERROR.search(str(exc))
    return MadlensError(match.group(1).strip()) if match else None
