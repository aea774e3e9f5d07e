"""SAE training: `train_sae` (the optimisation loop over batches of activation rows) and
`train_on_model` (corpus -> cached activations -> shuffle buffer -> SAE -> metrics -> files)."""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from madlens.errors import MadlensError
from madlens.sae.base import SparseAutoencoder, default_lr
from madlens.sae.buffer import shuffled_batches
from madlens.sae.metrics import FiringStats, density_histogram, reconstruction_metrics
from madlens.sae.relu import ReLUConfig, ReLUSAE, resample_dead_latents
from madlens.sae.topk import TopKConfig, TopKSAE

ARCHITECTURES = ("topk", "relu")


@dataclass
class TrainConfig:
    """How to train. `lr=None` scales Adam's rate with the dictionary size; the rate warms
    up over `warmup_steps` and decays linearly to 0 over the last `decay_fraction` of steps.
    Inputs are scaled so their mean norm is `sqrt(d_in)` (folded back out when training
    ends). A latent is dead when it has not fired in the last `dead_tokens` rows."""

    architecture: str = "topk"
    expansion: int = 8
    k: int = 32
    l1_coefficient: float = 5.0
    aux_coefficient: float = 1.0
    lr: float | None = None
    batch_size: int = 1024
    buffer_rows: int = 1 << 17
    warmup_steps: int = 50
    decay_fraction: float = 0.2
    dead_tokens: int = 1 << 18
    resample_every: int = 0  # ReLU only: steps between resamplings (0: four times a run)
    b_dec_init: str = "geometric_median"
    seed: int = 0

    def check(self) -> TrainConfig:
        """Validate the values; raises `MadlensError`."""
        if self.architecture not in ARCHITECTURES:
            raise MadlensError(f"unknown architecture '{self.architecture}': topk or relu")
        if self.expansion < 1 or self.k < 1 or self.batch_size < 1:
            raise MadlensError("expansion, k and batch size must be positive")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise MadlensError(f"the learning rate must be a positive number, got {self.lr}")
        if not (math.isfinite(self.l1_coefficient) and self.l1_coefficient >= 0):
            raise MadlensError(
                f"the L1 coefficient must be a number >= 0, got {self.l1_coefficient}"
            )
        if self.buffer_rows < self.batch_size:
            raise MadlensError("the shuffle buffer must hold at least one batch")
        if self.b_dec_init not in ("mean", "geometric_median", "zeros"):
            raise MadlensError(f"unknown b_dec init '{self.b_dec_init}'")
        return self


@dataclass
class TrainResult:
    """A trained SAE (in the units of its input, on the device it was trained on), its
    training log and firing statistics."""

    sae: SparseAutoencoder
    history: list[dict[str, float]] = field(default_factory=list)
    firing: FiringStats | None = None
    rows: int = 0
    seconds: float = 0.0


def build_sae(
    d_in: int, config: TrainConfig, metadata: dict[str, Any] | None = None
) -> SparseAutoencoder:
    """A freshly initialised SAE of the configured architecture."""
    d_sae = d_in * config.expansion
    if config.architecture == "topk":
        if config.k > d_sae:
            raise MadlensError(f"k={config.k} exceeds the {d_sae} latents")
        cfg = TopKConfig(d_in, d_sae, metadata=dict(metadata or {}), k=config.k,
                         aux_coefficient=config.aux_coefficient)  # fmt: skip
        return TopKSAE(cfg, seed=config.seed)
    cfg = ReLUConfig(d_in, d_sae, metadata=dict(metadata or {}),
                     l1_coefficient=config.l1_coefficient)  # fmt: skip
    return ReLUSAE(cfg, seed=config.seed)


def _lr_factor(step: int, total: int, warmup: int, decay_fraction: float) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    decay_start = int(total * (1 - decay_fraction))
    if total and step >= decay_start:
        return max(0.0, (total - step) / max(1, total - decay_start))
    return 1.0


def train_sae(
    batches: Iterable[np.ndarray],
    d_in: int,
    config: TrainConfig | None = None,
    *,
    total_rows: int | None = None,
    metadata: dict[str, Any] | None = None,
    log_every: int = 25,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> TrainResult:
    """Train an SAE on `(batch, d_in)` host arrays (one pass) on `device`: a name
    `resolve_device` takes (`auto`, `cuda`, ...), or None (torch's default device, the host:
    a plain tensor routine whose callers read the weights as numpy; `train_on_model` passes
    its model's device). `total_rows` sizes the learning rate schedule and the progress bar.
    Deterministic for a given seed, batch order and device; the initial weights are the same
    on every device (drawn on the host)."""
    from madlens.models import resolve_device

    config = (config or TrainConfig()).check()
    device = torch.empty(0).device if device is None else resolve_device(device)
    torch.manual_seed(config.seed)
    iterator = iter(batches)
    first = next(iterator, None)
    if first is None:
        raise MadlensError("no activations to train on")
    first = np.asarray(first, dtype=np.float32)
    if first.ndim != 2 or first.shape[1] != d_in:
        raise MadlensError(f"activation batches must be (n, {d_in}), got {first.shape}")
    sae = build_sae(d_in, config, metadata).to(device)
    x0 = torch.from_numpy(first).to(device)
    scale = math.sqrt(d_in) / float(x0.norm(dim=1).mean().clamp_min(1e-8))
    sae.init_b_dec(x0 * scale, config.b_dec_init)
    lr = config.lr if config.lr is not None else default_lr(sae.d_sae)
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999))
    total_steps = math.ceil(total_rows / config.batch_size) if total_rows else 0
    resample_every = config.resample_every or max(1, total_steps // 5)
    firing = FiringStats(sae.d_sae)
    recent = FiringStats(sae.d_sae)  # ReLU resampling: latents silent since the last resample
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    rows = 0
    bar = tqdm(total=total_rows, desc=f"train {config.architecture} SAE", unit="tok",
               disable=not progress)  # fmt: skip
    for step, batch in enumerate(itertools.chain([first], iterator)):
        x = torch.as_tensor(np.asarray(batch, dtype=np.float32)).to(device) * scale
        for group in optimizer.param_groups:
            group["lr"] = lr * _lr_factor(step, total_steps, config.warmup_steps,
                                          config.decay_fraction)  # fmt: skip
        dead = torch.from_numpy(firing.dead(config.dead_tokens)).to(device)
        loss = sae.training_loss(x, dead if config.architecture == "topk" else None)
        optimizer.zero_grad(set_to_none=True)
        loss.total.backward()
        sae.remove_parallel_gradient()
        optimizer.step()
        sae.normalize_decoder()
        firing.update(loss.indices, loss.values)
        recent.update(loss.indices, loss.values)
        rows += len(x)
        bar.update(len(x))
        if config.architecture == "relu" and step and step % resample_every == 0:
            silent = torch.from_numpy(recent.counts == 0).to(device)
            resample_dead_latents(sae, x, silent, optimizer, seed=config.seed + step)
            recent = FiringStats(sae.d_sae)
        if step % log_every == 0:
            with torch.no_grad():
                sst = float((x - x.mean(0)).pow(2).sum())
                sse = float((loss.reconstruction - x).pow(2).sum())
            entry = {"step": step, "tokens": rows, "mse": float(loss.mse.detach()),
                     "aux": float(loss.auxiliary.detach()),
                     "explained_variance": 1 - sse / max(sst, 1e-12),
                     "l0": float((loss.values > 0).sum(-1).float().mean()),
                     "dead_fraction": float(firing.dead(config.dead_tokens).mean())}  # fmt: skip
            history.append(entry)
            bar.set_postfix(ev=f"{entry['explained_variance']:.3f}", l0=f"{entry['l0']:.1f}",
                            dead=f"{entry['dead_fraction']:.3f}")  # fmt: skip
    bar.close()
    sae.fold_input_scale(scale)
    sae.eval()
    return TrainResult(sae, history, firing, rows, time.perf_counter() - start)


def _split(windows: np.ndarray, n_train: int, n_eval: int) -> tuple[np.ndarray, np.ndarray]:
    if len(windows) >= n_train + n_eval:
        return windows[:n_train], windows[n_train : n_train + n_eval]
    held = max(1, min(n_eval, len(windows) // 10))
    if len(windows) <= held:
        raise MadlensError(f"the corpus gave only {len(windows)} window(s): too few to train")
    return windows[:-held], windows[-held:]


def train_on_model(
    model: str,
    hook: str,
    out: str | Path,
    *,
    corpus: str = "default",
    tokens: int = 2_000_000,
    context_size: int = 128,
    config: TrainConfig | None = None,
    dtype: str = "auto",
    eval_windows: int = 64,
    capture_batch_size: int = 16,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    device: str | torch.device = "auto",
) -> dict[str, Any]:
    """Train an SAE on `hook` of `model` over `tokens` tokens of `corpus` and write
    `out/cfg.json`, `out/sae_weights.safetensors`, `out/sparsity.safetensors` and
    `out/metrics.json`. The model and the SAE run on `device` (`auto`: CUDA, else MPS, else
    the CPU). Activations are captured in `dtype` and cached on disk (under MADLENS_HOME, or
    `cache_dir`); `hook` may be a layer number (its `hook_resid_post`)."""
    from safetensors.numpy import save_file

    from madlens.activations.positions import hook_shapes
    from madlens.models import load_model, parse_hooks
    from madlens.sae.capture import stream_activations
    from madlens.sae.corpus import DEFAULT as DEFAULT_CORPUS
    from madlens.sae.corpus import build_corpus, read_documents
    from madlens.sae.io import save_sae
    from madlens.sae.metrics import downstream_loss

    config = (config or TrainConfig()).check()
    if tokens < context_size:
        raise MadlensError(f"--tokens must be at least the context size ({context_size})")
    if corpus != DEFAULT_CORPUS and Path(corpus).expanduser().exists():
        # a corpus file is read whole for its first document: an unreadable one (not UTF-8,
        # malformed JSONL) fails here, before the model loads
        next(read_documents(corpus, config.seed), None)
    start = time.perf_counter()
    lm = load_model(model, dtype=dtype, device=device)
    hooks = lm.check_hooks(parse_hooks(hook, lm.n_layers))
    if len(hooks) != 1:
        raise MadlensError(f"an SAE is trained on one hook, got {len(hooks)}")
    hook = hooks[0]
    if context_size > lm.n_ctx:
        raise MadlensError(
            f"--context-size {context_size} exceeds {lm.name}'s context of {lm.n_ctx} tokens"
        )
    shape = hook_shapes(lm, [hook], "all")[hook]
    d_in = int(np.prod(shape))
    if len(shape) != 1:
        raise MadlensError(f"an SAE reads one vector per token; {hook} gives {shape} per token")
    if config.architecture == "topk" and config.k > d_in * config.expansion:
        raise MadlensError(f"k={config.k} exceeds the {d_in * config.expansion} latents")
    corpus_dir = Path(cache_dir) / "corpora" if cache_dir is not None else None
    acts_dir = Path(cache_dir) / "activations" if cache_dir is not None else None
    n_train = math.ceil(tokens / context_size)
    windows = build_corpus(corpus, lm.tokenizer, context_size, (n_train + eval_windows)
                           * context_size, seed=config.seed, cache_dir=corpus_dir,
                           progress=progress)  # fmt: skip
    train_windows, held_windows = _split(windows, n_train, eval_windows)
    chunks = stream_activations(lm, train_windows, hook, batch_size=capture_batch_size,
                                cache_dir=acts_dir, progress=progress)  # fmt: skip
    batches = shuffled_batches(chunks, config.batch_size, config.buffer_rows, config.seed)
    metadata = {"model_name": lm.name, "hook_name": hook, "context_size": context_size,
                "dataset_path": corpus, "training_tokens": int(train_windows.size),
                "activation_dtype": dtype}  # fmt: skip
    result = train_sae(batches, d_in, config, metadata=metadata,
                       total_rows=len(train_windows) * (context_size - 1),
                       progress=progress, device=lm.device)  # fmt: skip
    held_rows = stream_activations(lm, held_windows, hook, cache_dir=acts_dir, progress=False)
    evaluation = reconstruction_metrics(result.sae, held_rows)
    evaluation |= downstream_loss(lm, result.sae, hook, held_windows, progress=progress)
    density = result.firing.density()
    dead = result.firing.dead(config.dead_tokens)
    out = Path(out)
    save_sae(result.sae, out)
    log_density = np.log10(np.maximum(density, 1e-10)).astype(np.float32)
    save_file({"sparsity": log_density}, str(out / "sparsity.safetensors"))
    metrics = {
        "model": lm.name, "hook": hook, "architecture": config.architecture,
        "d_in": d_in, "d_sae": result.sae.d_sae, "corpus": corpus,
        "training_tokens": int(train_windows.size), "training_rows": result.rows,
        "eval_tokens": int(held_windows.size),
        "dead_fraction": float(dead.mean()), "dead_window_tokens": config.dead_tokens,
        "never_fired_fraction": float((density == 0).mean()),
        "eval": evaluation,
        "final_train": result.history[-1] if result.history else {},
        "density_histogram": density_histogram(density),
        "history": result.history,
        "train_seconds": result.seconds,
        "total_seconds": time.perf_counter() - start,
        "config": asdict(config),
    }  # fmt: skip
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    return metrics
