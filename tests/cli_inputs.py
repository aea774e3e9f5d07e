"""Inputs the CLI tests share: a saved SAE of a chosen width and a model dir whose
tokenizer has no chat template (a base model)."""

from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

HOOK = "blocks.1.hook_resid_post"


def write_sae(folder: Path, d_in: int = 64, model: str = "tiny-test") -> Path:
    """An untrained TopK SAE on tiny-test's last residual stream, with its densities."""
    from madlens.sae.io import save_sae
    from madlens.sae.topk import TopKConfig, TopKSAE

    meta = {"model_name": model, "hook_name": HOOK, "context_size": 16}
    folder = save_sae(TopKSAE(TopKConfig(d_in, 2 * d_in, metadata=meta, k=4)), folder)
    save_file({"sparsity": np.full(2 * d_in, -2.0, np.float32)},
              str(folder / "sparsity.safetensors"))  # fmt: skip
    return folder


def no_template_model(folder: Path) -> Path:
    """tiny-test saved as a local model dir, its tokenizer without a chat template."""
    from madlens.models.tiny import tiny_model, tiny_tokenizer

    tiny_model().save_pretrained(folder)
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = None
    tokenizer.save_pretrained(folder)
    return folder


def silence_progress(monkeypatch: Any) -> None:
    """Switch every tqdm progress bar off (madlens's and transformers'): they are not
    messages, and the CLI tests count the lines on stderr."""
    import tqdm.std

    original = tqdm.std.tqdm.__init__

    def silent(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs["disable"] = True
        original(self, *args, **kwargs)

    monkeypatch.setattr(tqdm.std.tqdm, "__init__", silent)
