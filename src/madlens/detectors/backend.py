"""The few array operations the heavy detectors need, on numpy arrays or on torch tensors.

Given torch tensors, Mahalanobis, PCA residual, kNN, QUE, spectral signatures and the SAE
detectors compute on the tensors' own device (`x.device`; nothing global picks it) with the
same precision as for numpy input: float64 stays float64, float16 / bfloat16 / ints become
float32. Learned state stays numpy either way (saved as before); a detector copies what it
needs onto a device when it first scores there (see `ActivationDetector._learned`).

Each function takes what it is given (numpy or torch) and answers in kind, unless its name
says otherwise (`to_numpy`, `scores`, `eigh`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from madlens.errors import MadlensError

__all__ = [
    "check_tensor",
    "device_of",
    "eigh",
    "f64",
    "is_tensor",
    "like",
    "rowdot",
    "scores",
    "sqrt",
    "take_rows",
    "to_device",
    "to_float",
    "to_numpy",
]


def is_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor)


def device_of(x: Any) -> torch.device | None:
    """The device of a tensor; None for a numpy array (the numpy path)."""
    return x.device if is_tensor(x) else None


def to_numpy(x: Any) -> np.ndarray:
    """A numpy array (on the host); numpy has no bfloat16, so that goes through float32."""
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


def scores(x: Any) -> np.ndarray:
    """One float64 per example, on the host: what `score` returns."""
    return np.asarray(to_numpy(x), dtype=np.float64)


def to_device(x: Any, device: torch.device | None) -> Any:
    """`x` as a tensor on `device`, or as numpy when `device` is None."""
    if device is None:
        return to_numpy(x)
    return torch.as_tensor(x if is_tensor(x) else np.asarray(x), device=device)


def like(array: Any, ref: Any) -> Any:
    """A learned (numpy) array in the kind of `ref`: unchanged for numpy, else a tensor on
    `ref`'s device."""
    return to_device(array, device_of(ref)) if is_tensor(ref) else array


def to_float(x: Any) -> Any:
    """float64 stays float64; every other dtype (float16, bfloat16, ints) becomes float32."""
    if is_tensor(x):
        return x if x.dtype == torch.float64 else x.to(torch.float32)
    return x if x.dtype == np.float64 else x.astype(np.float32, copy=False)


def f64(x: Any) -> Any:
    """`x` in float64 (no copy when it already is)."""
    return x.to(torch.float64) if is_tensor(x) else x.astype(np.float64, copy=False)


def rowdot(x: Any) -> Any:
    """Sum of squares of each row, products and sum in float64."""
    if is_tensor(x):  # the norm upcasts as it reads: no float64 copy of x
        return torch.linalg.vector_norm(x, dim=1, dtype=torch.float64).square()
    return np.einsum("ij,ij->i", x, x, dtype=np.float64)


def sqrt(x: Any) -> Any:
    return torch.sqrt(x) if is_tensor(x) else np.sqrt(x)


def take_rows(x: Any, rows: np.ndarray) -> Any:
    """Rows `rows` (an integer array) of an array, memmap or tensor."""
    if is_tensor(x):
        return x[torch.as_tensor(rows, device=x.device)]
    return x[rows]


def check_tensor(x: torch.Tensor, what: str, convert: bool = True) -> torch.Tensor:
    """`as_matrix` for a tensor, which stays on its device: a non-empty `n x d` numeric
    tensor, converted by `to_float` (unless `convert=False`) and checked finite."""
    x = x.detach()
    if x.ndim != 2:
        raise MadlensError(f"{what} must be an n x d array, got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise MadlensError(f"{what} is empty (shape {tuple(x.shape)})")
    if x.dtype == torch.bool or x.is_complex():
        raise MadlensError(f"{what} must be numeric, got dtype {x.dtype}")
    if not convert:
        return x
    x = to_float(x)
    # on the host numpy's check is ~10x faster than torch's, and reads the same memory
    finite = np.isfinite(x.numpy()).all() if x.device.type == "cpu" else torch.isfinite(x).all()
    if not bool(finite):
        raise MadlensError(f"{what} contains NaN or infinite values")
    return x


def eigh(matrix: Any) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (ascending) and eigenvectors of a symmetric matrix, as numpy float64.

    A tensor on an accelerator is decomposed there (float64); a numpy array or a CPU tensor by
    LAPACK on one BLAS thread: at activation widths (d ~ 1e3) the symmetric eigensolver gains
    nothing from threads, and on a busy machine BLAS threads spinning on a descheduled sibling
    made it 10-50x slower. Each eigenvector's sign is fixed (its largest-magnitude entry is
    positive), so that every backend gives the same learned arrays.
    """
    if is_tensor(matrix) and matrix.device.type != "cpu":
        values, vectors = torch.linalg.eigh(matrix.to(torch.float64))
        values, vectors = to_numpy(values), to_numpy(vectors)
    else:
        with threadpool_limits(limits=1, user_api="blas"):
            values, vectors = np.linalg.eigh(to_numpy(matrix))
    top = np.argmax(np.abs(vectors), axis=0)
    signs = np.where(vectors[top, np.arange(vectors.shape[1])] < 0, -1.0, 1.0)
    return values, vectors * signs
