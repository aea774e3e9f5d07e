"""What every madlens SAE shares: the config fields SAELens's `cfg.json` holds, the weights
(`W_enc`, `b_enc`, `W_dec`, `b_dec`), decoding, decoder-norm upkeep and data-based init."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn


@dataclass
class SAEConfig:
    """Size and provenance of an SAE. `apply_b_dec_to_input` follows SAELens: the encoder
    reads `x - b_dec`. `metadata` carries `model_name`, `hook_name`, `context_size`, ..."""

    d_in: int
    d_sae: int
    apply_b_dec_to_input: bool = True
    metadata: dict[str, Any] = field(default_factory=dict)

    architecture: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        """Every field, plus the architecture name."""
        return {**asdict(self), "architecture": self.architecture}


class ForwardOutput(NamedTuple):
    """An SAE's forward pass: the reconstruction and the latent activations (dense)."""

    reconstruction: torch.Tensor
    latents: torch.Tensor


class SparseAutoencoder(nn.Module):
    """Base SAE: `x̂ = z @ W_dec + b_dec` with `z = encode(x)`. Subclasses implement
    `encode` and `training_loss`. Decoder rows (one per latent) are kept at unit norm."""

    def __init__(self, cfg: SAEConfig, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        generator = torch.Generator().manual_seed(seed)
        w_dec = torch.randn(cfg.d_sae, cfg.d_in, generator=generator)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec)
        # the encoder starts as the decoder's transpose (Conerly et al., Gao et al.)
        self.W_enc = nn.Parameter(w_dec.T.clone().contiguous())
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """`(x - b_dec) @ W_enc + b_enc`, in the SAE's dtype."""
        x = x.to(self.W_enc.dtype)
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Reconstruction from dense latent activations."""
        return latents @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> ForwardOutput:
        latents = self.encode(x)
        return ForwardOutput(self.decode(latents), latents)

    # upkeep ----------------------------------------------------------------------------------

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Scale every decoder row back to unit norm (after an optimiser step)."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_parallel_gradient(self) -> None:
        """Drop the part of each decoder row's gradient along the row: with unit-norm rows it
        only changes the norm, which `normalize_decoder` undoes anyway (Bricken et al.)."""
        grad = self.W_dec.grad
        if grad is not None:
            grad -= (grad * self.W_dec).sum(1, keepdim=True) * self.W_dec

    @torch.no_grad()
    def init_b_dec(self, sample: torch.Tensor, method: str = "geometric_median") -> None:
        """Set the decoder bias from data: `mean`, `geometric_median` or `zeros`."""
        sample = sample.to(self.b_dec.dtype)
        if method == "mean":
            self.b_dec.copy_(sample.mean(0))
        elif method == "geometric_median":
            self.b_dec.copy_(geometric_median(sample))
        elif method == "zeros":
            self.b_dec.zero_()
        else:
            raise ValueError(f"unknown b_dec init '{method}': mean, geometric_median or zeros")

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        """Trained on `x * scale`, answer for `x`: latents shrink by `scale` (their order and
        sign, hence TopK and ReLU choices, are unchanged) and the decoder keeps unit rows."""
        self.b_enc.div_(scale)
        self.b_dec.div_(scale)


def geometric_median(points: torch.Tensor, iterations: int = 50, eps: float = 1e-6) -> torch.Tensor:
    """The point minimising the summed Euclidean distance to `points` (Weiszfeld's method),
    the decoder-bias init of Towards Monosemanticity: robust to outlier activations."""
    points = points.double()
    median = points.mean(0)
    for _ in range(iterations):
        weights = 1.0 / (points - median).norm(dim=1).clamp_min(eps)
        new = (weights[:, None] * points).sum(0) / weights.sum()
        if (new - median).norm() <= eps * max(1.0, median.norm().item()):
            median = new
            break
        median = new
    return median.float()


def default_lr(d_sae: int) -> float:
    """Adam learning rate scaled with dictionary size: 2e-4 at 16k latents (Gao et al.)."""
    return 2e-4 * math.sqrt(16384 / d_sae)
