"""TopK SAE (Gao et al., "Scaling and evaluating sparse autoencoders"): its config, the
encoder that keeps the k largest pre-activations, and the AuxK loss that revives dead latents.

Training takes one dense product per step (the encoder's forward): only the k chosen
pre-activations carry gradient (a sparse product), and decoding sums k decoder rows
(`embedding_bag`), so backward costs O(batch * k * d_in) instead of O(batch * d_sae * d_in).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from madlens.sae.base import SAEConfig, SparseAutoencoder


@dataclass
class TopKConfig(SAEConfig):
    """`k` latents fire per token. AuxK: the `aux_k` (default `d_in // 2`) largest dead
    latents reconstruct the residual the live ones leave, weighted by `aux_coefficient`
    and by `min(1, n_dead / aux_k)` (SAELens's convention)."""

    k: int = 32
    aux_k: int | None = None
    aux_coefficient: float = 1.0

    architecture = "topk"


class Loss(NamedTuple):
    """One training step's losses (scalars) and what the metrics read."""

    total: torch.Tensor
    mse: torch.Tensor
    auxiliary: torch.Tensor
    reconstruction: torch.Tensor
    indices: torch.Tensor  # (batch, k) firing latents
    values: torch.Tensor  # (batch, k) their activations


class _Selected(torch.autograd.Function):
    """The entries `index` of the pre-activations `pre = x @ W_enc + bias` (computed without
    gradient by the caller), differentiable in `W_enc` and `bias` through those entries only:
    `dW_enc = x^T @ G` with G holding `index.shape[1]` non-zeros per row, a sparse product."""

    @staticmethod
    def forward(ctx, x, w_enc, bias, index, pre):  # noqa: ANN001, ANN205
        ctx.save_for_backward(x, index)
        ctx.d_sae = w_enc.shape[1]
        return pre.gather(-1, index)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        x, index = ctx.saved_tensors
        batch, chosen = index.shape
        rows = torch.arange(batch, device=index.device).repeat_interleave(chosen)
        flat_index, flat_grad = index.flatten(), grad.flatten()
        sparse = torch.sparse_coo_tensor(torch.stack([flat_index, rows]), flat_grad,
                                         (ctx.d_sae, batch), check_invariants=False)  # fmt: skip
        grad_w = torch.sparse.mm(sparse, x).T
        grad_bias = grad.new_zeros(ctx.d_sae).index_add_(0, flat_index, flat_grad)
        return None, grad_w, grad_bias, None, None


def decode_sparse(
    sae: SparseAutoencoder, index: torch.Tensor, values: torch.Tensor
) -> torch.Tensor:
    """`sum_j values_j * W_dec[index_j]`: the decoder applied to k-sparse latents."""
    return F.embedding_bag(index, sae.W_dec, per_sample_weights=values, mode="sum")


class TopKSAE(SparseAutoencoder):
    """A TopK sparse autoencoder; encodes exactly as SAELens's `TopKSAE` with
    `rescale_acts_by_decoder_norm=False` (our decoder rows have unit norm)."""

    cfg: TopKConfig

    def topk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The k firing latents of each row: `(indices, values)`, values ReLU'd."""
        pre = self.pre_activations(x)
        values, indices = pre.topk(self.cfg.k, dim=-1, sorted=False)
        return indices, values.relu()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense latent activations `(..., d_sae)` with at most k non-zeros per row."""
        indices, values = self.topk(x)
        zeros = torch.zeros(
            *values.shape[:-1], self.d_sae, dtype=values.dtype, device=values.device
        )
        return zeros.scatter_(-1, indices, values)

    def training_loss(self, x: torch.Tensor, dead: torch.Tensor | None = None) -> Loss:
        """MSE (summed over features, averaged over the batch) plus the AuxK loss on the
        latents flagged in `dead`. Gradients reach only the selected latents."""
        x = x.to(self.W_enc.dtype).detach()
        # (x - b_dec) @ W_enc + b_enc, written so that no gradient is taken through x: b_dec
        # reaches the encoder through one vector-matrix product
        if self.cfg.apply_b_dec_to_input:
            bias = self.b_enc - self.b_dec @ self.W_enc
        else:
            bias = self.b_enc
        with torch.no_grad():
            pre = torch.addmm(bias, x, self.W_enc)
            indices = pre.topk(self.cfg.k, dim=-1, sorted=False).indices
        values = _Selected.apply(x, self.W_enc, bias, indices, pre).relu()
        recon = decode_sparse(self, indices, values) + self.b_dec
        mse = (recon - x).pow(2).sum(-1).mean()
        aux = self._aux_loss(x, bias, recon, pre, dead)
        return Loss(mse + aux, mse, aux, recon, indices, values.detach())

    def _aux_loss(
        self,
        x: torch.Tensor,
        bias: torch.Tensor,
        recon: torch.Tensor,
        pre: torch.Tensor,
        dead: torch.Tensor | None,
    ) -> torch.Tensor:
        n_dead = 0 if dead is None else int(dead.sum())
        if n_dead == 0:
            return recon.new_zeros(())
        aux_k = self.cfg.aux_k or self.d_in // 2
        scale = min(1.0, n_dead / aux_k)
        aux_k = min(aux_k, n_dead)
        with torch.no_grad():
            masked = pre.masked_fill(~dead, float("-inf"))
            aux_index = masked.topk(aux_k, dim=-1, sorted=False).indices
        aux_values = _Selected.apply(x, self.W_enc, bias, aux_index, pre).relu()
        residual = (x - recon).detach()  # b_dec is already inside the live reconstruction
        aux_recon = decode_sparse(self, aux_index, aux_values)
        return self.cfg.aux_coefficient * scale * (aux_recon - residual).pow(2).sum(-1).mean()
