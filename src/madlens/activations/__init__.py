"""Activations: capture at hook points with position specs (last, all, response, mean),
batched and padding-aware, with an on-disk safetensors cache read back as a stream."""

from madlens.activations.capture import TruncationWarning, extract, stream
from madlens.activations.positions import POSITIONS
from madlens.activations.store import Activations

__all__ = ["POSITIONS", "Activations", "TruncationWarning", "extract", "stream"]
