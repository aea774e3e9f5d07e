"""madlens: catch a language model acting on the wrong mechanism.

Reads a model's activations at TransformerLens hook points, learns what "normal" looks
like from trusted inputs, and flags anomalous ones.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("madlens")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0"

__all__ = ["__version__"]
