"""Explanations: the SAE features behind an input's anomaly score, ranked by how rare they
are on the SAE's training data, each linked to its page in the feature dashboard."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file

from madlens.errors import MadlensError
from madlens.sae.base import SparseAutoencoder
from madlens.sae.dashboard import firing_triplets


@dataclass
class FeatureHit:
    """One feature that fired on the input: its density on the training data, its largest
    activation and the token where it was reached, and its surprise `-log10 density`."""

    feature: int
    density: float
    activation: float
    position: int
    token: str
    surprise: float


def feature_density(sae_dir: str | Path) -> np.ndarray:
    """Per-feature firing density from `sparsity.safetensors` (log10 density, as SAELens
    and `madlens sae train` write it)."""
    path = Path(sae_dir) / "sparsity.safetensors"
    if not path.is_file():
        raise MadlensError(f"{path} is missing: explanations need the feature densities "
                           "that `madlens sae train` writes")  # fmt: skip
    return 10.0 ** load_file(str(path))["sparsity"].astype(np.float64)


def rank_features(
    sae: SparseAutoencoder, rows: np.ndarray, density: np.ndarray, tokens: list[str],
    top: int = 10, floor: float = 1e-7,
) -> list[FeatureHit]:  # fmt: skip
    """The `top` firing features of `rows` (one per token), rarest first."""
    if len(density) != sae.d_sae:
        raise MadlensError(f"{len(density)} densities for {sae.d_sae} features")
    r, f, v = firing_triplets(sae, rows)
    hits = []
    for feature in np.unique(f):
        mask = f == feature
        best = int(np.argmax(v[mask]))
        position = int(r[mask][best])
        d = float(density[feature])
        hits.append(FeatureHit(int(feature), d, float(v[mask][best]), position,
                               tokens[position], float(-np.log10(max(d, floor)))))  # fmt: skip
    hits.sort(key=lambda h: (-h.surprise, -h.activation))
    return hits[:top]


def explain_text(model: Any, sae: SparseAutoencoder, density: np.ndarray, text: str,
                 hook: str, top: int = 10) -> list[FeatureHit]:  # fmt: skip
    """Run `text` through `model`, encode `hook`'s activations with the SAE and rank the
    features that fired (the first token and attention sinks are left out, as in training)."""
    from madlens.activations import extract

    acts = extract(model, [text], [hook], "all", cache=False, progress=False)[hook]
    ids = model.tokenizer(text)["input_ids"][-len(acts) :]
    if len(acts) < 2:
        raise MadlensError("the input needs at least two tokens")
    from madlens.sae.capture import sink_rows

    keep = np.flatnonzero(~sink_rows(np.linalg.norm(acts[1:], axis=1))) + 1
    tokens = [model.tokenizer.decode([ids[i]]) for i in keep]
    hits = rank_features(sae, acts[keep], density, tokens, top)
    for hit in hits:
        hit.position = int(keep[hit.position])
    return hits
