"""SAE detectors: `sae-recon` (reconstruction error) and `sae-rare` (how unlikely the set of
firing latents is given each latent's firing frequency on trusted data).

Without a pretrained SAE, `fit` trains a small seeded TopK SAE on the trusted activations
(cached on disk by the trusted data and the SAE's parameters, so that the two detectors, and
a rerun, pay once);
`sae=DIR` loads a madlens / SAELens SAE for the one hook it was trained on instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from madlens import cache
from madlens.detectors.backend import f64, is_tensor, like, to_numpy
from madlens.detectors.base import SEED, ActivationDetector, Activations, integer, path
from madlens.errors import MadlensError


def _fit_small_sae(trusted: np.ndarray, latents: int, k: int, steps: int, seed: int) -> Any:
    from madlens.sae.train import TrainConfig, train_sae

    n, d = trusted.shape
    batch = min(256, n)
    rng = np.random.default_rng(seed)

    def batches():
        for _ in range(steps):
            yield trusted[rng.choice(n, batch, replace=False)]

    config = TrainConfig(architecture="topk", expansion=max(1, -(-latents // d)), k=k, lr=3e-3,
                         batch_size=batch, buffer_rows=batch, warmup_steps=10,
                         dead_tokens=max(4 * n, 1024), b_dec_init="mean", seed=seed)  # fmt: skip
    with torch.random.fork_rng():
        return train_sae(batches(), d, config, total_rows=steps * batch, progress=False).sae


def _weights(model: Any) -> dict[str, np.ndarray]:
    """An SAE's weights as numpy arrays, by their SAELens names."""
    from madlens.sae.io import WEIGHTS

    return {name: getattr(model, name).detach().float().numpy().copy() for name in WEIGHTS}


class _SAEDetector(ActivationDetector):
    param_rules = {"sae": path(), "latents": integer(1), "k": integer(1), "steps": integer(1),
                   "seed": SEED}  # fmt: skip
    """Shared fitting: SAE weights as learned arrays, plus each latent's trusted firing
    frequency (Laplace-smoothed, so a latent never seen firing is rare, not impossible).
    Given torch tensors, encoding and reconstruction run on their device; the small SAE is
    trained on the host."""

    tensor_inputs = True

    def __init__(
        self,
        sae: str | None = None,
        latents: int = 256,
        k: int = 16,
        steps: int = 60,
        seed: int = 0,
        aggregation: str = "mean",
    ) -> None:
        super().__init__(aggregation)
        self.sae = sae
        self.latents = latents
        self.k = k
        self.steps = steps
        self.seed = seed

    def fit(
        self, trusted: Activations, untrusted: Activations | None = None, **fit_inputs: Any
    ) -> _SAEDetector:
        if self.sae is not None and isinstance(trusted, Mapping) and len(trusted) > 1:
            raise MadlensError(
                f"a pretrained SAE belongs to one hook; fit {self.name} on that hook alone"
            )
        return super().fit(trusted, untrusted, **fit_inputs)  # type: ignore[return-value]

    def _fit(self, trusted: Any, untrusted: Any, **fit_inputs: Any) -> None:
        if self.sae is not None:
            from madlens.sae.io import load_sae
            from madlens.sae.topk import TopKSAE

            model = load_sae(self.sae)
            if model.d_in != trusted.shape[1]:
                raise MadlensError(f"the SAE at {self.sae} reads {model.d_in} features, "
                                   f"the activations have {trusted.shape[1]}")  # fmt: skip
            state = _weights(model)
            state["k"] = np.array(model.cfg.k if isinstance(model, TopKSAE) else 0)
            state["apply_b_dec"] = np.array(int(model.cfg.apply_b_dec_to_input))
        else:
            k = max(1, min(self.k, self.latents))
            rows = to_numpy(trusted)
            name = cache.key(trusted=rows, latents=self.latents, k=k, steps=self.steps,
                             seed=self.seed)  # fmt: skip

            def train() -> dict[str, np.ndarray]:
                model = _fit_small_sae(rows, self.latents, k, self.steps, self.seed)
                return _weights(model) | {"k": np.array(k), "apply_b_dec": np.array(1)}

            state = cache.load_or_compute(cache.folder("sae_detectors") / f"{name}.safetensors",
                                          train)  # fmt: skip
        self.W_enc_ = state["W_enc"].astype(np.float32)
        self.b_enc_ = state["b_enc"].astype(np.float32)
        self.W_dec_ = state["W_dec"].astype(np.float32)
        self.b_dec_ = state["b_dec"].astype(np.float32)
        # 0-d arrays come back from safetensors as 1-element arrays
        self.topk_ = int(state["k"].reshape(-1)[0])
        self.apply_b_dec_ = int(state["apply_b_dec"].reshape(-1)[0])
        latents = self._latents(trusted)
        fired = to_numpy((latents > 0).sum(0))
        self.frequency_ = ((fired + 1.0) / (len(trusted) + 2.0)).astype(np.float64)

    def _latents(self, x: Any) -> Any:
        """The SAE's latents of each row (float32), as numpy or as a tensor on x's device."""
        x_in = x - self._learned("b_dec_", x) if self.apply_b_dec_ else x
        if is_tensor(x):
            x_in = x_in.to(torch.float32)
        else:
            x_in = torch.from_numpy(np.ascontiguousarray(x_in, dtype=np.float32))
        w_enc, b_enc = (torch.as_tensor(self._learned(name, x)) for name in ("W_enc_", "b_enc_"))
        pre = x_in @ w_enc + b_enc
        if self.topk_:
            values, index = pre.topk(min(self.topk_, pre.shape[1]), dim=-1)
            latents = torch.zeros_like(pre).scatter_(-1, index, values.relu())
        else:
            latents = pre.relu()
        return latents if is_tensor(x) else latents.numpy()

    def _reconstruct(self, latents: Any) -> Any:
        return latents @ self._learned("W_dec_", latents) + self._learned("b_dec_", latents)


class SAERecon(_SAEDetector):
    """Squared reconstruction error `||x - x̂||²` of an SAE fit on (or trained for) trusted
    activations: inputs built from directions the dictionary lacks reconstruct badly."""

    name = "sae-recon"
    reference = "SAE reconstruction error (Bricken et al. 2023, Towards Monosemanticity)"

    def _score(self, x: Any) -> Any:
        recon = self._reconstruct(self._latents(x))
        return ((x - recon) ** 2).sum(1)


class SAERare(_SAEDetector):
    """Negative log-likelihood of the firing pattern under independent Bernoulli latents with
    their trusted frequencies p_j: `sum_firing -log p_j + sum_silent -log(1 - p_j)`. High when
    rarely-firing latents fire (or common ones stay silent)."""

    name = "sae-rare"
    reference = "rare SAE latents firing (Bricken et al. 2023, Towards Monosemanticity)"

    def _score(self, x: Any) -> Any:
        active = self._latents(x) > 0
        p = self.frequency_
        silent_cost = -np.log1p(-p)
        weights = -np.log(p) - silent_cost
        if is_tensor(active):
            return f64(active) @ like(weights, active) + silent_cost.sum()
        return active @ weights + silent_cost.sum()

    def surprise(self, x: Any) -> np.ndarray:
        """Per-latent contribution `-log p_j` of the firing latents of each row (0 if silent):
        the latents that made an input anomalous, largest first when sorted."""
        self._check_fitted()
        x = x.detach().to(torch.float32) if is_tensor(x) else np.asarray(x, dtype=np.float32)
        return to_numpy(self._latents(x) > 0) * -np.log(self.frequency_)
