"""Models: the name registry, loading (embedded default, HF ids, local dirs, `tiny-test`)
on a device, GGUF → safetensors conversion, and TransformerLens hook-name helpers."""

from importlib import import_module
from typing import TYPE_CHECKING, Any

from madlens.models.registry import DEFAULT_MODEL, KNOWN_MODELS, ModelInfo, known_model_names

if TYPE_CHECKING:
    from madlens.models.devices import (
        autocast_bfloat16,
        device_key,
        fast_bfloat16,
        native_bfloat16,
        resolve_device,
    )
    from madlens.models.generate import generate
    from madlens.models.hooks import (
        attn_z,
        check_hooks,
        mlp_out,
        parse_hooks,
        resid_post,
        resid_pre,
        residual_hooks,
    )
    from madlens.models.loading import Model, load_hf, load_model, quiet_peft, resolve_dtype

# Exported lazily: the registry is read without importing torch and transformers (seconds),
# so `madlens --help`, `madlens models list` and a mistyped option answer at once.
_EXPORTS = {
    "autocast_bfloat16": "devices",
    "device_key": "devices",
    "fast_bfloat16": "devices",
    "native_bfloat16": "devices",
    "resolve_device": "devices",
    "generate": "generate",
    "attn_z": "hooks",
    "check_hooks": "hooks",
    "mlp_out": "hooks",
    "parse_hooks": "hooks",
    "resid_post": "hooks",
    "resid_pre": "hooks",
    "residual_hooks": "hooks",
    "Model": "loading",
    "load_hf": "loading",
    "load_model": "loading",
    "quiet_peft": "loading",
    "resolve_dtype": "loading",
}

__all__ = [
    "DEFAULT_MODEL",
    "KNOWN_MODELS",
    "Model",
    "ModelInfo",
    "attn_z",
    "autocast_bfloat16",
    "check_hooks",
    "device_key",
    "fast_bfloat16",
    "generate",
    "known_model_names",
    "load_hf",
    "load_model",
    "mlp_out",
    "native_bfloat16",
    "parse_hooks",
    "quiet_peft",
    "resid_post",
    "resid_pre",
    "residual_hooks",
    "resolve_device",
    "resolve_dtype",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'madlens.models' has no attribute '{name}'")
    value = getattr(import_module(f"madlens.models.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value
