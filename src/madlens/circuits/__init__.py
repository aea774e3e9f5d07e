"""Circuits: activation and path patching on TransformerLens hook names, attention probes, IOI
prompts, and automatic discovery of the indirect-object-identification circuit."""

from importlib import import_module
from typing import Any

# Exported lazily, so that `madlens.cli.circuits` (imported by the CLI at start-up) does not
# pull in torch and TransformerLens before a command runs.
_EXPORTS = {
    "CLASSES": "discovery",
    "IOICircuit": "discovery",
    "discover_ioi": "discovery",
    "IOIDataset": "ioi",
    "make_ioi": "ioi",
    "PatchingSession": "patching",
    "ablate_heads": "patching",
    "attention_between": "patching",
    "head_means": "patching",
    "head_outputs": "patching",
    "patch_head_out": "patching",
    "patch_layer_pos": "patching",
    "path_patch": "patching",
    "attention_probes": "probes",
    "render_report": "report",
    "write_outputs": "report",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'madlens.circuits' has no attribute '{name}'")
    return getattr(import_module(f"madlens.circuits.{_EXPORTS[name]}"), name)
