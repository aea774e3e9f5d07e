"""Models: the name registry, loading (embedded default, HF ids, local dirs, `tiny-test`),
GGUF → safetensors conversion, and TransformerLens hook-name helpers."""

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
from madlens.models.loading import Model, load_hf, load_model, resolve_dtype
from madlens.models.registry import DEFAULT_MODEL, KNOWN_MODELS, ModelInfo, known_model_names

__all__ = [
    "DEFAULT_MODEL",
    "KNOWN_MODELS",
    "Model",
    "ModelInfo",
    "attn_z",
    "check_hooks",
    "generate",
    "known_model_names",
    "load_hf",
    "load_model",
    "mlp_out",
    "parse_hooks",
    "resid_post",
    "resid_pre",
    "residual_hooks",
    "resolve_dtype",
]
