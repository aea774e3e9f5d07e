"""Sparse autoencoders: TopK and ReLU+L1 architectures, training on streamed activations,
the field's metrics, SAELens-format files, feature dashboards and explanations."""

from madlens.sae.base import ForwardOutput, SAEConfig, SparseAutoencoder, geometric_median
from madlens.sae.io import load_sae, save_sae
from madlens.sae.relu import ReLUConfig, ReLUSAE, resample_dead_latents
from madlens.sae.topk import TopKConfig, TopKSAE
from madlens.sae.train import TrainConfig, TrainResult, train_on_model, train_sae

__all__ = [
    "ForwardOutput",
    "ReLUConfig",
    "ReLUSAE",
    "SAEConfig",
    "SparseAutoencoder",
    "TopKConfig",
    "TopKSAE",
    "TrainConfig",
    "TrainResult",
    "geometric_median",
    "load_sae",
    "resample_dead_latents",
    "save_sae",
    "train_on_model",
    "train_sae",
]
