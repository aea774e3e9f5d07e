"""ReLU + L1 SAE, the Towards Monosemanticity recipe: its config, the ReLU encoder, the L1
sparsity penalty, and the resampling of dead latents towards badly reconstructed inputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from madlens.sae.base import SAEConfig, SparseAutoencoder
from madlens.sae.topk import Loss


@dataclass
class ReLUConfig(SAEConfig):
    """`l1_coefficient` weighs `sum |z|` against the summed squared error. With unit-norm
    decoder rows this is Bricken et al.'s penalty `sum |z_j| * ||W_dec_j||`."""

    l1_coefficient: float = 5.0

    architecture = "standard"  # SAELens's name for ReLU SAEs


class ReLUSAE(SparseAutoencoder):
    """`z = ReLU((x - b_dec) @ W_enc + b_enc)`; encodes exactly as SAELens's `StandardSAE`."""

    cfg: ReLUConfig

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense latent activations `(..., d_sae)`."""
        return self.pre_activations(x).relu()

    def training_loss(self, x: torch.Tensor, dead: torch.Tensor | None = None) -> Loss:
        """MSE (summed over features, averaged over the batch) + L1 on the latents. `dead`
        is unused: dead latents are resampled between steps instead."""
        x = x.to(self.W_enc.dtype)
        latents = self.encode(x)
        recon = self.decode(latents)
        mse = (recon - x).pow(2).sum(-1).mean()
        l1 = self.cfg.l1_coefficient * latents.abs().sum(-1).mean()
        values, indices = latents.detach().topk(min(self.d_sae, 64), dim=-1, sorted=False)
        # `indices`/`values` feed the firing statistics: a row's firing latents all sit in its
        # 64 largest unless more than 64 fire, which the L1 penalty makes rare
        return Loss(mse + l1, mse, l1, recon, indices, values)


@torch.no_grad()
def resample_dead_latents(
    sae: SparseAutoencoder,
    sample: torch.Tensor,
    dead: torch.Tensor,
    optimizer: torch.optim.Optimizer | None = None,
    seed: int = 0,
) -> int:
    """Re-initialise each dead latent on an input the SAE reconstructs badly (Bricken et al.):
    inputs drawn with probability proportional to their squared error; the decoder row
    becomes the input's unit direction, the encoder column the same direction scaled to
    0.2x the mean live encoder norm, the encoder bias 0, and Adam forgets both.

    Returns the number of latents resampled."""
    index = torch.nonzero(dead).flatten()
    if len(index) == 0:
        return 0
    sample = sample.to(sae.W_enc.dtype)
    error = (sae(sample).reconstruction - sample).pow(2).sum(-1)
    if float(error.sum()) <= 0:
        return 0
    generator = torch.Generator().manual_seed(seed)  # drawn on the host: same on any device
    rows = torch.multinomial(error.float().cpu(), len(index), replacement=True,
                             generator=generator).to(sample.device)  # fmt: skip
    inputs = sample[rows] - sae.b_dec
    directions = inputs / inputs.norm(dim=1, keepdim=True).clamp_min(1e-8)
    alive = ~dead
    enc_norm = sae.W_enc[:, alive].norm(dim=0).mean() if alive.any() else sample.new_tensor(1.0)
    sae.W_dec[index] = directions
    sae.W_enc[:, index] = directions.T * (0.2 * enc_norm)
    sae.b_enc[index] = 0.0
    if optimizer is not None:
        for param, cols in ((sae.W_dec, (index, slice(None))), (sae.W_enc, (slice(None), index)),
                            (sae.b_enc, (index,))):  # fmt: skip
            state = optimizer.state.get(param, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key][cols] = 0.0
    return len(index)
