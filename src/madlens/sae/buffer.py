"""A shuffle buffer over streamed activation rows: training batches drawn from a window of
`capacity` rows, so consecutive batches mix many documents while memory stays bounded."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np


def shuffled_batches(
    chunks: Iterable[np.ndarray], batch_size: int, capacity: int, seed: int = 0
) -> Iterator[np.ndarray]:
    """Yield `(batch_size, d)` batches holding every row of `chunks` exactly once (the last
    batch may be smaller). The buffer fills to `capacity` rows, shuffles, hands out half
    and refills, as SAELens's mixing buffer does; memory holds about `capacity` rows plus
    one chunk."""
    if batch_size < 1 or capacity < batch_size:
        raise ValueError(f"need 1 <= batch_size <= capacity, got {batch_size}, {capacity}")
    rng = np.random.default_rng(seed)
    buffer: np.ndarray | None = None
    for chunk in chunks:
        chunk = np.asarray(chunk)
        buffer = chunk if buffer is None or len(buffer) == 0 else np.concatenate([buffer, chunk])
        while len(buffer) >= capacity:
            buffer = buffer[rng.permutation(len(buffer))]
            cut = (max(len(buffer) - capacity // 2, batch_size) // batch_size) * batch_size
            for start in range(0, cut, batch_size):
                yield buffer[start : start + batch_size]
            buffer = buffer[cut:]
    if buffer is not None and len(buffer):
        buffer = buffer[rng.permutation(len(buffer))]
        for start in range(0, len(buffer), batch_size):
            yield buffer[start : start + batch_size]
