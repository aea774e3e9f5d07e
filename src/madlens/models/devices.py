"""Where models run: `resolve_device` (`auto`, `cpu`, `cuda`, `cuda:N`, `mps`), whether a
device computes bfloat16 natively, bfloat16 autocast on it, and the cache-key part that
keeps results computed on different devices apart.

The one place in madlens that names the CPU device: everything downstream takes the device
from the loaded model (`Model.device`) and creates its tensors there.
"""

import functools
from typing import Any

import torch

from madlens.errors import MadlensError

#: What a `device` argument accepts (`--device` on the command line).
DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
_CPU = "cpu"


def host() -> torch.device:
    """The host's own device (the CPU): where results are brought back, and where work that
    must not claim an accelerator (checking a saved monitor on a driver) runs."""
    return torch.device(_CPU)


@functools.cache
def fast_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 natively (oneDNN's AVX512-BF16 / AMX kernels).

    Without them bfloat16 is emulated and slow: measured on a 2-core AVX2 EPYC, a SmolLM2
    forward of 16 x 128 tokens took 40 s in bfloat16 against 5.6 s in float32, and a LoRA
    step under bfloat16 autocast 85 s against 3.8 s; where it is native, bfloat16 is the
    faster one (about 2x for the same forward)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        return False


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def _no_cuda(text: str) -> MadlensError:
    why = "this torch build has no CUDA" if torch.version.cuda is None else "no GPU is visible"
    return MadlensError(f"device '{text}': CUDA is not available ({why}); use --device cpu or auto")


def resolve_device(device: "str | torch.device" = "auto") -> torch.device:
    """The torch device `device` names, checked: `auto` (CUDA, else MPS, else the CPU),
    `cpu`, `cuda` (the current CUDA device), `cuda:N` or `mps`. Raises `MadlensError` (one
    line) for an unknown name or a device this machine does not have."""
    text = str(device).strip()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("mps") if _mps_available() else torch.device(_CPU)
    if text == _CPU:
        return torch.device(_CPU)
    if text == "mps":
        if not _mps_available():
            raise MadlensError("device 'mps': Apple's MPS backend is not available on this "
                               "machine; use --device cpu or auto")  # fmt: skip
        return torch.device("mps")
    if text == "cuda" or text.startswith("cuda:"):
        index_text = text.removeprefix("cuda").removeprefix(":")
        if text != "cuda" and not (index_text.isascii() and index_text.isdigit()):
            raise MadlensError(f"unknown device '{text}'; cuda:N takes a GPU number, e.g. cuda:0")
        if not torch.cuda.is_available():
            raise _no_cuda(text)
        count = torch.cuda.device_count()
        index = torch.cuda.current_device() if text == "cuda" else int(index_text)
        if index >= count:
            raise MadlensError(f"device '{text}': this machine has {count} CUDA device(s) "
                               f"(cuda:0 to cuda:{count - 1})")  # fmt: skip
        return torch.device("cuda", index)
    raise MadlensError(f"unknown device '{text}'; choose one of {', '.join(DEVICE_CHOICES)}")


def native_bfloat16(device: "str | torch.device | None" = None) -> bool:
    """Whether `device` (default: the CPU) computes bfloat16 at full speed: a CUDA GPU that
    supports it (Ampere and later), a CPU with native bfloat16 kernels (`fast_bfloat16`).
    MPS counts as no: its bfloat16 support depends on the macOS version."""
    kind = torch.device(device).type if device is not None else _CPU
    if kind == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return kind == _CPU and fast_bfloat16()


def autocast_bfloat16(device: "str | torch.device") -> Any:
    """bfloat16 autocast on `device` where it computes bfloat16 natively, a no-op elsewhere
    (float32 weights stay float32: what LoRA fine-tunes and GCG run under)."""
    device = torch.device(device)
    enabled = native_bfloat16(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def device_key(device: "str | torch.device") -> dict[str, str]:
    """The cache-key part for results computed on `device`: nothing on the CPU (so every
    entry cached before devices existed keeps its key), `{"device": type}` elsewhere
    (`cuda`, `mps`): the same weights give results that differ in the last bits across
    device types, but not across two GPUs of one type."""
    kind = torch.device(device).type
    return {} if kind == _CPU else {"device": kind}
