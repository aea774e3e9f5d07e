"""Activations for SAE training: packed corpus windows run through the model block by block,
each block cached on disk by `madlens.activations.stream`, yielded as rows of one hook."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

BLOCK_WINDOWS = 256  # windows per cache entry: an interrupted capture keeps finished blocks
SINK_FACTOR = 10.0  # a row this many times the median norm is an attention sink


def sink_rows(norms: np.ndarray) -> np.ndarray:
    """Rows whose norm exceeds `SINK_FACTOR` times the median: attention sinks, residual
    vectors ~100x the typical norm that the model parks attention on (the first token of a
    window, sometimes the token after a leading newline). One such row in 8,000 holds more
    squared norm than all the others together, so SAEs leave them out of training, metrics
    and splicing, as SAELens leaves out BOS tokens."""
    return norms > SINK_FACTOR * np.median(norms)


def window_rows(acts: np.ndarray, context_size: int, skip_first: bool = True) -> np.ndarray:
    """Rows of `(windows * context_size, d)` activations, without each window's first
    position and without attention-sink rows when `skip_first` (see `sink_rows`)."""
    rows = acts.reshape(-1, context_size, acts.shape[-1])
    rows = (rows[:, 1:] if skip_first else rows).reshape(-1, acts.shape[-1])
    if skip_first:
        rows = rows[~sink_rows(np.linalg.norm(rows, axis=1))]
    return rows


def stream_activations(
    model: Any,
    windows: np.ndarray,
    hook: str,
    *,
    batch_size: int = 16,
    skip_first: bool = True,
    cache_dir: Any = None,
    progress: bool = True,
) -> Iterator[np.ndarray]:
    """Yield `hook`'s activations of every token of `windows` (`(n, context_size)` token ids),
    block by block, in order; each block is computed once and then read from the disk cache."""
    from madlens.activations import stream

    context_size = windows.shape[1]
    for start in range(0, len(windows), BLOCK_WINDOWS):
        block = [row.tolist() for row in windows[start : start + BLOCK_WINDOWS]]
        for chunk in stream(model, block, [hook], "all", batch_size=batch_size,
                            cache_dir=cache_dir, progress=progress):  # fmt: skip
            yield window_rows(chunk[hook], context_size, skip_first)
