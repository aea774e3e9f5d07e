"""Activations: capture at hook points with position specs (last, all, response, mean),
batched and padding-aware, with an on-disk safetensors cache read back as a stream."""

from madlens.activations.capture import Prefill, TruncationWarning, extract, prefill, stream
from madlens.activations.positions import POSITIONS
from madlens.activations.store import Activations

__all__ = [
    "POSITIONS",
    "Activations",
    "Prefill",
    "TruncationWarning",
    "extract",
    "prefill",
    "stream",
]
