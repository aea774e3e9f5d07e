"""SAE files in SAELens's on-disk format: `cfg.json` + `sae_weights.safetensors` (`W_enc`
`(d_in, d_sae)`, `b_enc`, `W_dec` `(d_sae, d_in)`, `b_dec`), written and read by madlens."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from madlens.data.jsonl import read_object
from madlens.errors import MadlensError
from madlens.sae.base import SparseAutoencoder
from madlens.sae.relu import ReLUConfig, ReLUSAE
from madlens.sae.topk import TopKConfig, TopKSAE

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
# The SAELens config format these files follow (6.x: the architecture-specific configs with a
# `metadata` block); without a version SAELens reads a file as its pre-6.0 format.
SAELENS_FORMAT = "6.0.0"
ARCHITECTURES: dict[str, type[SparseAutoencoder]] = {"topk": TopKSAE, "standard": ReLUSAE}
WEIGHTS = ("W_enc", "b_enc", "W_dec", "b_dec")


def save_sae(sae: SparseAutoencoder, folder: str | Path) -> Path:
    """Write `folder/cfg.json` and `folder/sae_weights.safetensors`; returns the folder."""
    from madlens import __version__

    cfg = sae.cfg
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    metadata = {"sae_lens_version": SAELENS_FORMAT, "sae_lens_training_version": None,
                "madlens_version": __version__, "hook_head_index": None,
                "prepend_bos": False, **cfg.metadata}  # fmt: skip
    doc: dict[str, Any] = {
        "architecture": cfg.architecture,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": metadata,
    }
    if isinstance(cfg, TopKConfig):
        doc |= {"k": cfg.k, "rescale_acts_by_decoder_norm": False}
    # the training-only fields, for `madlens` to resume from; SAELens ignores unknown keys
    doc["madlens"] = {k: v for k, v in cfg.to_dict().items() if k not in doc and k != "metadata"}
    weights = {name: getattr(sae, name).detach().float().cpu().contiguous() for name in WEIGHTS}
    save_file(weights, str(folder / WEIGHTS_FILE))
    (folder / CFG_FILE).write_text(json.dumps(doc, indent=2) + "\n")
    return folder


def _read_cfg(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise MadlensError(f"no SAE at {folder}: not a directory")
    path = folder / CFG_FILE
    if not path.is_file():
        raise MadlensError(f"no SAE at {folder}: {CFG_FILE} is missing")
    return read_object(path)


def load_sae(folder: str | Path) -> SparseAutoencoder:
    """Read an SAE saved by madlens or by SAELens (`topk` or `standard` architecture).

    A SAELens TopK SAE trained with `rescale_acts_by_decoder_norm` gets its decoder norms
    folded into the encoder, which leaves its latents' choice and its reconstruction as they
    were. Raises `MadlensError` for anything madlens cannot run faithfully.
    """
    folder = Path(folder).expanduser()
    doc = _read_cfg(folder)
    where = folder / CFG_FILE
    architecture = doc.get("architecture", "standard")
    if not isinstance(architecture, str) or architecture not in ARCHITECTURES:
        raise MadlensError(
            f"{where}: architecture '{architecture}' is not supported "
            f"(madlens reads {', '.join(ARCHITECTURES)})"
        )
    for key, allowed in (("normalize_activations", ("none", None, False)),
                         ("reshape_activations", ("none", None))):  # fmt: skip
        if doc.get(key) not in allowed:
            raise MadlensError(f"{where}: {key}='{doc.get(key)}' is not supported")
    d_in, d_sae = doc.get("d_in"), doc.get("d_sae")
    if not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in (d_in, d_sae)):
        raise MadlensError(f"{where}: needs positive integers 'd_in' and 'd_sae'")
    metadata = doc.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise MadlensError(f"{where}: 'metadata' must be a JSON object")
    metadata = dict(metadata)
    for old, new in (("hook_point", "hook_name"), ("hook_name", "hook_name"),
                     ("model_name", "model_name"), ("context_size", "context_size")):  # fmt: skip
        if old in doc and new not in metadata:
            metadata[new] = doc[old]
    common = {"d_in": d_in, "d_sae": d_sae, "metadata": metadata,
              "apply_b_dec_to_input": bool(doc.get("apply_b_dec_to_input", True))}  # fmt: skip
    extra = doc.get("madlens") if isinstance(doc.get("madlens"), dict) else {}
    if architecture == "topk":
        k = doc.get("k")
        if not (isinstance(k, int) and not isinstance(k, bool) and 0 < k <= d_sae):
            raise MadlensError(f"{where}: a topk SAE needs an integer 'k' from 1 to d_sae")
        keep = {key: extra[key] for key in ("aux_k", "aux_coefficient") if key in extra}
        cfg: Any = TopKConfig(**common, k=k, **keep)
    else:
        keep = {k: extra[k] for k in ("l1_coefficient",) if k in extra}
        cfg = ReLUConfig(**common, **keep)
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        raise MadlensError(f"no SAE weights at {weights_path}")
    try:
        state = load_file(str(weights_path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise MadlensError(f"{weights_path}: unreadable safetensors file ({exc})") from exc
    shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    for name, shape in shapes.items():
        if name not in state:
            raise MadlensError(f"{weights_path}: tensor '{name}' is missing")
        if tuple(state[name].shape) != shape:
            raise MadlensError(
                f"{weights_path}: '{name}' has shape {tuple(state[name].shape)}, cfg says {shape}"
            )
    sae = ARCHITECTURES[architecture](cfg)
    with torch.no_grad():
        for name in WEIGHTS:
            getattr(sae, name).copy_(state[name].float())
        if architecture == "topk" and doc.get("rescale_acts_by_decoder_norm"):
            norms = sae.W_dec.norm(dim=1).clamp_min(1e-8)
            sae.W_enc.mul_(norms)
            sae.b_enc.mul_(norms)
            sae.W_dec.div_(norms[:, None])
    return sae.eval()
