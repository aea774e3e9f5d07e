"""madlens: catch a language model acting on the wrong mechanism.

Reads a model's activations at TransformerLens hook points, learns what "normal" looks
like from trusted inputs, and flags anomalous ones. `madlens.Monitor` is the entry point.
"""

from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("madlens")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0"

__all__ = ["Monitor", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `import madlens` (and `madlens --help`) does not import torch.
    if name == "Monitor":
        from madlens.monitor import Monitor

        return Monitor
    raise AttributeError(f"module 'madlens' has no attribute '{name}'")
