"""The Ray engine (`--engine ray`, `pip install 'madlens[ray]'`): the long data-parallel
jobs, activation extraction and batch scoring, spread over a pool of Ray actors that each
hold the model, calling the same functions as the local engine.

`fill_cache` fills the activation cache (the same keys and shards as a local run, so the
two engines share it); `score_rows` scores a saved monitor's inputs in input order;
`session` connects to a cluster or starts a local one. Ray is imported only inside these
functions: madlens works without it.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

from madlens.scale.cluster import ENGINES, INSTALL, check_address, check_engine, session

if TYPE_CHECKING:
    from madlens.scale.extract import FillReport, Request, fill_cache
    from madlens.scale.score import score_rows

# Exported lazily: these import torch and the model stack, `check_engine` does not.
_EXPORTS = {
    "FillReport": "extract",
    "Request": "extract",
    "fill_cache": "extract",
    "score_rows": "score",
}

__all__ = [
    "ENGINES",
    "INSTALL",
    "FillReport",
    "Request",
    "check_address",
    "check_engine",
    "fill_cache",
    "score_rows",
    "session",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f"madlens.scale.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'madlens.scale' has no attribute {name!r}")
