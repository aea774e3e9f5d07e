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


def feature_density(sae_dir: str | Path, d_sae: int | None = None) -> np.ndarray:
    """Per-feature firing density from `sparsity.safetensors` (log10 density, as SAELens
    and `madlens sae train` write it); `d_sae` checks there is one per feature."""
    path = Path(sae_dir) / "sparsity.safetensors"
    if not path.is_file():
        raise MadlensError(f"{path} is missing: explanations need the feature densities "
                           "that `madlens sae train` writes")  # fmt: skip
    try:
        log_density = load_file(str(path))["sparsity"]
    except KeyError as exc:
        raise MadlensError(f"{path}: holds no 'sparsity' tensor") from exc
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise MadlensError(f"{path}: unreadable safetensors file ({exc})") from exc
    if log_density.ndim != 1 or (d_sae is not None and len(log_density) != d_sae):
        wanted = f"({d_sae},)" if d_sae is not None else "one value per feature"
        raise MadlensError(f"{path}: 'sparsity' has shape {log_density.shape}, not {wanted}")
    if not np.issubdtype(log_density.dtype, np.floating):
        raise MadlensError(f"{path}: 'sparsity' holds {log_density.dtype}, not floats")
    return 10.0 ** log_density.astype(np.float64)


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
    acts = acts.reshape(len(acts), -1)  # per-head hooks (`attn.hook_z`) as SAELens reads them
    if acts.shape[1] != sae.d_in:
        raise MadlensError(
            f"the SAE reads {sae.d_in}-wide activations, but {hook} of {model.name} is "
            f"{acts.shape[1]} wide: pass the SAE's model"
        )
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


def explain_sae(
    sae_dir: str | Path, text: str, model: str | None = None, top: int = 10,
    dtype: str = "auto", device: str = "auto",
) -> tuple[str, list[FeatureHit]]:  # fmt: skip
    """Load the SAE at `sae_dir` (and its densities) and the model it was trained on (or
    `model`) on `device`, and rank the features that fired on `text`: `(hook, hits)`."""
    from madlens.activations.positions import hook_shapes
    from madlens.models import load_model
    from madlens.sae.io import load_sae

    sae = load_sae(sae_dir)
    density = feature_density(sae_dir, sae.d_sae)
    name = model or sae.cfg.metadata.get("model_name")
    hook = sae.cfg.metadata.get("hook_name")
    if not name or not hook:
        raise MadlensError(f"{sae_dir}: cfg.json names no model_name / hook_name; pass --model")
    lm = load_model(str(name), dtype=dtype, device=device)
    sae = sae.to(lm.device)
    hook = lm.check_hooks([str(hook)])[0]
    width = int(np.prod(hook_shapes(lm, [hook], "all")[hook]))
    if width != sae.d_in:
        raise MadlensError(f"the SAE reads {sae.d_in}-wide activations, but {hook} of "
                           f"{lm.name} is {width} wide: pass the SAE's model")  # fmt: skip
    return hook, explain_text(lm, sae, density, text, hook, top)
