"""SAE metrics under the field's names: L0, MSE, explained variance / FVU, dead-latent
fraction, feature density histogram, and downstream CE / KL with the SAE spliced in.

Formulas (SAELens `evals.py` names):
  explained_variance = 1 - sum ||x - x̂||² / sum ||x - mean(x)||²,  fvu = 1 - explained_variance
  mse                = mean over rows and features of (x - x̂)²
  l0                 = mean number of firing latents per token
  ce_loss_score      = (CE_ablation - CE_sae) / (CE_ablation - CE_clean)
  kl_div_score       = (KL_ablation - KL_sae) / KL_ablation,  KL(p_clean || p_run) per token
where the ablation run replaces the hook's activations by zeros.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from madlens.sae.base import SparseAutoencoder
from madlens.sae.capture import sink_rows


class FiringStats:
    """Per-latent firing counts and the token index of each latent's last firing, updated
    batch by batch: feature density and "dead" (no firing in the last N tokens) come from it."""

    def __init__(self, d_sae: int) -> None:
        self.counts = np.zeros(d_sae, dtype=np.int64)
        self.last_fired = np.zeros(d_sae, dtype=np.int64)
        self.tokens = 0

    def update(self, indices: torch.Tensor, values: torch.Tensor) -> None:
        """Add one batch, given each row's candidate latents and their activations."""
        fired = indices[values > 0]
        counts = torch.bincount(fired.flatten(), minlength=len(self.counts)).cpu().numpy()
        self.tokens += int(indices.shape[0])
        self.counts += counts
        self.last_fired[counts > 0] = self.tokens

    def dead(self, window: int) -> np.ndarray:
        """Latents that have not fired in the last `window` tokens (none before `window`)."""
        if self.tokens < window:
            return np.zeros(len(self.counts), dtype=bool)
        return self.tokens - self.last_fired >= window

    def density(self) -> np.ndarray:
        """Fraction of tokens on which each latent fired."""
        return self.counts / max(1, self.tokens)


def density_histogram(density: np.ndarray, bins: int = 40, low: float = -8.0) -> dict[str, Any]:
    """Histogram of log10 feature density (`low` .. 0) plus the count of latents that never
    fired (log10 of 0 has no bin)."""
    alive = density[density > 0]
    counts, edges = np.histogram(np.log10(alive), bins=bins, range=(low, 0.0))
    return {"log10_edges": edges.round(4).tolist(), "counts": counts.tolist(),
            "never_fired": int((density == 0).sum())}  # fmt: skip


@torch.no_grad()
def reconstruction_metrics(sae: SparseAutoencoder, batches: Iterable[Any]) -> dict[str, float]:
    """MSE, explained variance, FVU, L0 and mean L1 of latents over rows of `batches`
    (computed on the SAE's device), accumulated in float64 so any batch split gives the same
    answer."""
    sse = l0 = l1 = 0.0
    total = total_sq = None
    n = 0
    device = sae.W_enc.device
    for batch in batches:
        x = torch.as_tensor(np.asarray(batch, dtype=np.float32)).to(device)
        out = sae(x)
        sse += float((out.reconstruction - x).double().pow(2).sum())
        l0 += float((out.latents > 0).sum())
        l1 += float(out.latents.double().abs().sum())
        xd = x.double()
        total = xd.sum(0) if total is None else total + xd.sum(0)
        total_sq = xd.pow(2).sum(0) if total_sq is None else total_sq + xd.pow(2).sum(0)
        n += len(x)
    if n == 0:
        raise ValueError("no rows to measure")
    sst = float((total_sq - total.pow(2) / n).sum())
    explained = 1.0 - sse / sst if sst > 0 else float("nan")
    return {"mse": sse / (n * sae.d_in), "explained_variance": explained,
            "fvu": 1.0 - explained, "l0": l0 / n, "l1": l1 / n, "rows": n}  # fmt: skip


def _logprobs(logits: torch.Tensor) -> torch.Tensor:
    return logits.float().log_softmax(-1)


@torch.no_grad()
def downstream_loss(
    model: Any,
    sae: SparseAutoencoder,
    hook: str,
    windows: np.ndarray,
    *,
    batch_size: int = 8,
    skip_first: bool = True,
    progress: bool = True,
) -> dict[str, float]:
    """Next-token CE and KL on `windows` (token ids) with the SAE's reconstruction spliced in
    at `hook`, versus the clean model and versus zero-ablating the hook.

    With `skip_first` the first position of each window keeps its clean activation and is
    not scored, and attention-sink rows keep theirs (SAEs are not trained on them, see
    `madlens.sae.capture.sink_rows`). The model runs on its device (`model.device`), the SAE
    on its own.
    """
    start = 1 if skip_first else 0
    sums = {"ce_clean": 0.0, "ce_sae": 0.0, "ce_ablation": 0.0, "kl_sae": 0.0, "kl_ablation": 0.0}
    count = 0
    windows = np.asarray(windows)
    bar = tqdm(range(0, len(windows), batch_size), desc="downstream loss", disable=not progress,
               leave=False)  # fmt: skip
    for first in bar:
        ids = torch.as_tensor(windows[first : first + batch_size], dtype=torch.long)
        ids = ids.to(model.device)

        def replaced(act: torch.Tensor) -> torch.Tensor:
            """Positions the SAE (or the ablation) replaces: all from `start` on, but
            attention sinks, which keep their clean activations as in training."""
            mask = torch.zeros(act.shape[:2], dtype=torch.bool, device=act.device)
            mask[:, start:] = True
            if skip_first:
                norms = act[:, start:].float().norm(dim=-1)
                sinks = sink_rows(norms.flatten().cpu().numpy())
                mask[:, start:] &= ~torch.from_numpy(sinks).to(act.device).view(norms.shape)
            return mask

        def splice(act: torch.Tensor, hook: Any) -> torch.Tensor:
            new, mask = act.clone(), replaced(act)
            rows = act[mask].float().to(sae.W_enc.device)
            new[mask] = sae(rows).reconstruction.to(act.device, act.dtype)
            return new

        def ablate(act: torch.Tensor, hook: Any) -> torch.Tensor:
            new = act.clone()
            new[replaced(act)] = 0
            return new

        runs = {}
        for name, fn in (("clean", None), ("sae", splice), ("ablation", ablate)):
            hooks = [] if fn is None else [(hook, fn)]
            logits = model.bridge.run_with_hooks(ids, fwd_hooks=hooks, return_type="logits")
            runs[name] = _logprobs(logits[:, start:-1])
        targets = ids[:, start + 1 :]
        for name, logprobs in runs.items():
            ce = -logprobs.gather(-1, targets[..., None])[..., 0]
            sums[f"ce_{name}"] += float(ce.double().sum())
            if name != "clean":
                p = runs["clean"].exp()
                kl = (p * (runs["clean"] - logprobs)).sum(-1)
                sums[f"kl_{name}"] += float(kl.double().sum())
        count += targets.numel()
    out = {key: value / count for key, value in sums.items()}
    gap = out["ce_ablation"] - out["ce_clean"]
    out["ce_loss_score"] = (out["ce_ablation"] - out["ce_sae"]) / gap if gap else float("nan")
    kl_gap = out["kl_ablation"]
    out["kl_div_score"] = (kl_gap - out["kl_sae"]) / kl_gap if kl_gap else float("nan")
    out["tokens"] = count
    return out
