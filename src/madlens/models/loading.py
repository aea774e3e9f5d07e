"""`load_model(spec)`: a Hugging Face causal LM wrapped in TransformerLens's bridge.

A spec is a registered name (`smollm2-135m-instruct`, `tiny-test`), a local model dir or a
Hugging Face id; the result carries the tokenizer, hook names and a weights fingerprint.
"""

import copy
import hashlib
import json
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from madlens.errors import MadlensError
from madlens.models import smollm2, tiny
from madlens.models.devices import native_bfloat16, resolve_device
from madlens.models.hooks import check_hooks
from madlens.models.registry import DEFAULT_MODEL, DTYPE_CHOICES, DTYPE_NAMES, known_model_names

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


@dataclass
class Model:
    """A loaded model: the plain HF module (use it to generate), its tokenizer, and the
    TransformerLens bridge over the same weights that exposes the hook points.
    `fingerprint` identifies the weights (for caches); `spec` and `adapter` are what
    `load_model` was given, so that a saved monitor can load the same model again.
    `device` is where the weights live: every tensor madlens feeds the model is created
    there (default: the device of the first parameter)."""

    name: str
    hf_model: Any
    tokenizer: Any
    bridge: Any
    dtype: torch.dtype
    fingerprint: str
    _hook_names: list[str] = field(default_factory=list, repr=False)
    spec: str = ""
    adapter: str | None = None
    device: torch.device | None = None

    def __post_init__(self) -> None:
        if self.device is None:
            self.device = next(self.hf_model.parameters()).device

    @property
    def n_layers(self) -> int:
        """Number of transformer blocks."""
        return int(self.hf_model.config.num_hidden_layers)

    @property
    def d_model(self) -> int:
        """Width of the residual stream."""
        return int(self.hf_model.config.hidden_size)

    @property
    def n_ctx(self) -> int:
        """The longest sequence (in tokens) the model accepts."""
        return int(self.hf_model.config.max_position_embeddings)

    @property
    def hook_names(self) -> list[str]:
        """Every hook point the bridge exposes, in TransformerLens's naming."""
        return list(self._hook_names)

    def check_hooks(self, hooks: list[str]) -> list[str]:
        """Validate hook names against this model (clear error with suggestions)."""
        return check_hooks(hooks, self._hook_names)


def resolve_dtype(
    dtype: str | torch.dtype, device: str | torch.device | None = None
) -> torch.dtype:
    """Accept `auto` / `float32` / `bfloat16` / `float16` or a torch dtype. `auto` is
    bfloat16 where `device` (default: the CPU) computes it natively (`native_bfloat16`: a
    CUDA GPU with bfloat16, a CPU with `fast_bfloat16`), float32 elsewhere (MPS included)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if native_bfloat16(device) else torch.float32
    if dtype not in DTYPES:
        raise MadlensError(f"unknown dtype '{dtype}'; choose one of {', '.join(DTYPE_CHOICES)}")
    return DTYPES[dtype]


def _dir_fingerprint(path: Path, full: bool = True) -> str:
    """Hash the config and every byte of each weight file (`full`), or only each weight
    file's size and first/last MiB. The cheap form cannot tell apart two dirs that differ
    only in middle tensors (two merges of LoRAs on the upper layers did), so it is kept
    only for the converted default model, which its converter writes from the pinned
    package (and by whose cheap fingerprint the caches made so far are keyed). Full hashes
    are remembered per process by the files' sizes and modification times."""
    files = sorted(p for p in path.iterdir() if p.name == "config.json"
                   or p.suffix in {".safetensors", ".bin"})  # fmt: skip
    stats = [p.stat() for p in files]
    stamp = (str(path), full, tuple((p.name, st.st_size, st.st_mtime_ns)
                                    for p, st in zip(files, stats)))  # fmt: skip
    if stamp not in _FINGERPRINTS:
        digest = hashlib.sha256()
        for file, st in zip(files, stats):
            if file.name == "config.json":
                digest.update(file.read_bytes())
                continue
            size = st.st_size
            digest.update(f"{file.name}:{size}".encode())
            with file.open("rb") as handle:
                if full:
                    digest.update(b"full")
                    while chunk := handle.read(1 << 24):
                        digest.update(chunk)
                else:
                    digest.update(handle.read(1 << 20))
                    handle.seek(max(0, size - (1 << 20)))
                    digest.update(handle.read(1 << 20))
        _FINGERPRINTS[stamp] = digest.hexdigest()[:16]
    return _FINGERPRINTS[stamp]


_FINGERPRINTS: dict[tuple, str] = {}


def _module_fingerprint(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _load_hf(path_or_id: str, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path_or_id)
        model = AutoModelForCausalLM.from_pretrained(
            path_or_id, dtype=dtype, attn_implementation="eager"
        )
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MadlensError(f"could not load model '{path_or_id}': {first}") from exc
    return model, tokenizer


def _wrap(
    name: str,
    hf_model: Any,
    tokenizer: Any,
    dtype: torch.dtype,
    fingerprint: str,
    device: torch.device,
) -> Model:
    from transformer_lens.model_bridge import TransformerBridge

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.model_max_length or tokenizer.model_max_length > 10**9:
        tokenizer.model_max_length = hf_model.config.max_position_embeddings
    # Moved before the bridge's copy below: a move replaces buffers (rotary tables) with new
    # tensors, which a copy made earlier would not share.
    hf_model.to(device).eval()
    # The bridge wraps the modules of the model it boots, in place, and generation through
    # those wrappers runs ~15x slower. So it boots a structural copy that shares every
    # parameter and buffer (no extra memory), and `Model.hf_model` stays a plain HF model.
    shared = {id(t): t for t in [*hf_model.parameters(), *hf_model.buffers()]}
    hooked = copy.deepcopy(hf_model, memo=shared)
    quiet = logging.getLogger("transformer_lens")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bridge = TransformerBridge.boot_transformers(
                name, hf_model=hooked, tokenizer=tokenizer, device=device, dtype=dtype
            )
    except Exception as exc:  # noqa: BLE001 - the bridge raises many types for unsupported archs
        raise MadlensError(f"TransformerLens cannot wrap model '{name}': {exc}") from exc
    finally:
        quiet.setLevel(level)
    bridge.eval()
    hook_names = sorted(bridge.hook_dict.keys())
    return Model(name, hf_model, tokenizer, bridge, dtype, fingerprint, hook_names,
                 device=device)  # fmt: skip


def load_hf(
    spec: str = DEFAULT_MODEL,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
) -> tuple[Any, Any, str]:
    """The plain Hugging Face model (not wrapped by the bridge) on `device` (`resolve_device`;
    `auto`: CUDA, else MPS, else the CPU), its tokenizer and a weights fingerprint: what
    fine-tuning needs. Raises `MadlensError` for anything unknown."""
    torch_device = resolve_device(device)
    model, tokenizer, fingerprint = _load_hf_on_cpu(spec, resolve_dtype(dtype, torch_device))
    return model.to(torch_device), tokenizer, fingerprint


def _load_hf_on_cpu(spec: str, torch_dtype: torch.dtype) -> tuple[Any, Any, str]:
    if spec == "tiny-test":
        model = tiny.tiny_model(torch_dtype)
        return model, tiny.tiny_tokenizer(), _module_fingerprint(model)
    if spec == DEFAULT_MODEL:
        path = smollm2.convert()
        model, tokenizer = _load_hf(str(path), torch_dtype)
        return model, tokenizer, _dir_fingerprint(path, full=False)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise MadlensError(f"'{spec}' is a directory but holds no config.json")
        model, tokenizer = _load_hf(str(path), torch_dtype)
        return model, tokenizer, _dir_fingerprint(path)
    if "/" in spec and not spec.startswith((".", "/")):
        model, tokenizer = _load_hf(spec, torch_dtype)
        blob = json.dumps(model.config.to_dict(), sort_keys=True, default=str) + spec
        return model, tokenizer, hashlib.sha256(blob.encode()).hexdigest()[:16]
    raise MadlensError(
        f"unknown model '{spec}'; known models: {', '.join(known_model_names())} "
        "(or a Hugging Face id like org/name, or a local model dir)"
    )


def _merge_adapter(model: Any, adapter: str | Path) -> tuple[Any, str]:
    """Merge a LoRA adapter (a peft adapter dir) into the weights; returns the merged model
    and the adapter's fingerprint."""
    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise MadlensError(f"'{adapter}' is not a LoRA adapter dir (no adapter_config.json)")
    from peft import PeftModel

    with quiet_peft():
        merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return merged.eval(), _dir_fingerprint(adapter)


@contextmanager
def quiet_peft() -> Iterator[None]:
    """Silence peft's read of `model.is_gradient_checkpointing`, which transformers 5
    deprecates: a FutureWarning on every adapter made or loaded that is peft's to fix, not
    the user's (`tests/test_finetune.py` checks that peft itself still warns)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
        yield


def load_model(
    spec: str = DEFAULT_MODEL,
    dtype: str | torch.dtype = "auto",
    adapter: str | Path | None = None,
    device: str | torch.device = "auto",
) -> Model:
    """Load a model by registered name, local dir or Hugging Face id, optionally with a
    LoRA adapter merged in, and wrap it in TransformerLens's bridge, on `device`.

    `device`: `auto` (CUDA, else MPS, else the CPU), `cpu`, `cuda`, `cuda:N` or `mps`
    (`resolve_device`); `dtype`: `auto` (bfloat16 where that device computes it natively,
    float32 elsewhere: `resolve_dtype`), `float32`, `bfloat16` or `float16`. The weights
    load (and an adapter merges) on the CPU and then move to the device, recorded as
    `Model.device`. The embedded default is converted from its GGUF on first use and read
    from the cached safetensors dir afterwards. Raises `MadlensError` (one line) for
    anything unknown.
    """
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    model, tokenizer, fingerprint = _load_hf_on_cpu(spec, torch_dtype)
    name = str(Path(spec).expanduser()) if Path(spec).expanduser().is_dir() else spec
    if adapter is not None:
        model, adapter_print = _merge_adapter(model, adapter)
        fingerprint = hashlib.sha256(f"{fingerprint}+{adapter_print}".encode()).hexdigest()[:16]
        name = f"{name}+{Path(adapter).name}"
    wrapped = _wrap(name, model, tokenizer, torch_dtype, fingerprint, torch_device)
    wrapped.spec = spec
    wrapped.adapter = None if adapter is None else str(Path(adapter).resolve())
    return wrapped
