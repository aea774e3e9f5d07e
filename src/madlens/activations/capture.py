"""Capture activations at hook points: batched, padding-aware, deterministic, cached.

`extract` returns everything in memory; `stream` yields chunks read from the disk cache,
so data larger than memory works. Both compute only what the cache lacks.
"""

import warnings
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from madlens.activations.positions import Encoded, check_position, encode, hook_shapes
from madlens.activations.store import (
    LOGITS,
    LOGPROBS,
    ActivationCache,
    Activations,
    cache_key,
    chunk_to_tensors,
    iter_cached,
)
from madlens.cache import folder as cache_folder
from madlens.cache import touch
from madlens.errors import MadlensError
from madlens.models.devices import device_key

Input = str | list[dict[str, str]] | list[int]  # text, conversation or token ids
CHUNK = 512  # inputs per cache shard


class TruncationWarning(UserWarning):
    """An input was longer than the model's context and lost its first tokens."""


def _last_index(
    batch: list[Encoded], offsets: list[int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (row, column) index of each input's last span token, on `device`."""
    cols = [off + enc.span[1] - 1 for enc, off in zip(batch, offsets)]
    return torch.arange(len(batch), device=device), torch.tensor(cols, device=device)


def _select(
    tensor: torch.Tensor,
    batch: list[Encoded],
    offsets: list[int],
    position: str,
    last: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Rows of one hook's `(batch, pos, ...)` output that `position` keeps: a new tensor on
    the model's device (brought to the host after the forward pass, see `_to_host`); `last`
    is `_last_index` of the batch, made once for every hook."""
    if position == "last":
        rows, cols = last if last is not None else _last_index(batch, offsets, tensor.device)
        return tensor[rows, cols]
    rows = []
    for i, (enc, off) in enumerate(zip(batch, offsets)):
        part = tensor[i, off + enc.span[0] : off + enc.span[1]].float()
        rows.append(part.mean(0, keepdim=True) if position == "mean" else part)
    return torch.cat(rows)


def _to_host(tensor: torch.Tensor) -> np.ndarray:
    """A float32 numpy copy of a device tensor (the same tensor's memory on the CPU)."""
    return tensor.float().cpu().numpy()


def _run_batch(
    model: Any,
    batch: list[Encoded],
    hooks: list[str],
    position: str,
    padding_side: str,
    want_logits: bool,
    want_logprobs: bool,
    keep_cache: bool = False,
) -> tuple[dict[str, np.ndarray], np.ndarray | None, list[np.ndarray] | None, Any]:
    width = max(len(enc.input_ids) for enc in batch)
    pad_id = model.tokenizer.pad_token_id
    # Built on the host and moved in one copy each: row by row on a GPU is a launch per row.
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    offsets = []
    for i, enc in enumerate(batch):
        n = len(enc.input_ids)
        off = width - n if padding_side == "left" else 0
        ids[i, off : off + n] = torch.tensor(enc.input_ids)
        mask[i, off : off + n] = 1
        offsets.append(off)
    ids, mask = ids.to(model.device), mask.to(model.device)
    last = _last_index(batch, offsets, model.device) if position == "last" else None
    selected: dict[str, torch.Tensor] = {}

    def make_hook(name: str):
        def hook(tensor: torch.Tensor, hook: Any) -> None:
            # kept on the device: a copy to the host here would stall the forward pass
            selected[name] = _select(tensor.detach(), batch, offsets, position, last)

        return hook

    need_output = want_logits or want_logprobs or keep_cache
    kv_cache = None
    if keep_cache:
        _bridge_fills_kv_cache()
    token = _FILL_KV_CACHE.set(keep_cache)
    with torch.inference_mode():
        logits = model.bridge.run_with_hooks(
            ids,
            attention_mask=mask,
            fwd_hooks=[(name, make_hook(name)) for name in hooks],
            return_type=("logits_and_cache" if keep_cache else "logits") if need_output else None,
            **({"use_cache": True} if keep_cache else {}),
        )
    _FILL_KV_CACHE.reset(token)
    if keep_cache:
        logits, kv_cache = logits
    captured = {name: _to_host(tensor) for name, tensor in selected.items()}
    final_logits = token_logprobs = None
    if want_logits:
        cols = [off + len(enc.input_ids) - 1 for enc, off in zip(batch, offsets)]
        rows = torch.arange(len(batch), device=logits.device)
        final_logits = _to_host(logits[rows, torch.tensor(cols, device=logits.device)])
    if want_logprobs:
        token_logprobs = []
        for i, (enc, off) in enumerate(zip(batch, offsets)):
            start, end = enc.scored
            # Logits at column t predict the token at column t + 1.
            scores = logits[i, off + start - 1 : off + end - 1].float().log_softmax(-1)
            targets = ids[i, off + start : off + end]
            token_logprobs.append(_to_host(scores.gather(-1, targets[:, None])[:, 0]))
    if keep_cache:
        return captured, final_logits, token_logprobs, Prefill(ids, mask, logits, kv_cache)
    return captured, final_logits, token_logprobs, None


def _compute_chunk(
    model: Any,
    encoded: list[Encoded],
    hooks: list[str],
    position: str,
    batch_size: int,
    padding_side: str,
    want_logits: bool,
    want_logprobs: bool,
    bar: Any,
) -> Activations:
    """Run one chunk of inputs, longest first (less padding), and restore input order."""
    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i].input_ids), i))
    per_input: dict[int, tuple] = {}
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        batch = [encoded[i] for i in index]
        acts, logits, logprobs, _ = _run_batch(
            model, batch, hooks, position, padding_side, want_logits, want_logprobs
        )
        rows = [
            enc.span[1] - enc.span[0] if position in ("all", "response") else 1 for enc in batch
        ]
        bounds = np.cumsum([0, *rows])
        for j, i in enumerate(index):
            per_input[i] = (
                {h: a[bounds[j] : bounds[j + 1]] for h, a in acts.items()},
                None if logits is None else logits[j],
                None if logprobs is None else logprobs[j],
            )
        bar.update(len(batch))
    ordered = [per_input[i] for i in range(len(encoded))]
    return Activations(
        acts={h: np.concatenate([o[0][h] for o in ordered]) for h in hooks},
        lengths=np.array([len(o[0][hooks[0]]) if hooks else 1 for o in ordered], dtype=np.int64),
        position=position,
        logits=np.stack([o[1] for o in ordered]) if want_logits else None,
        token_logprobs=[o[2] for o in ordered] if want_logprobs else None,
        truncated=np.array([enc.truncated for enc in encoded], dtype=bool),
    )


# Set while `prefill` runs its forward pass: only then do the bridge's attention layers fill
# the Hugging Face KV cache they are handed (see `_bridge_fills_kv_cache`).
_FILL_KV_CACHE: ContextVar[bool] = ContextVar("madlens_fill_kv_cache", default=False)


def _bridge_fills_kv_cache() -> None:
    """Make TransformerLens's attention bridges fill the KV cache during `prefill`.

    transformers 5.x hands the cache to each attention module as `cache=` (`past_key_values`
    is deprecated), while TransformerLens 4.3's `AttentionBridge._update_kv_cache` reads only
    `past_key_values` / `layer_past`: the bridge's forward then returns an empty cache, and
    generation continued from it ignores the prompt. This passes `cache` on under the name
    the bridge reads, only while `_FILL_KV_CACHE` is set (every other forward is untouched).
    Installed once; `tests/test_activations.py` checks that generation continued from a
    prefill equals Hugging Face's own `generate` on a model whose answers depend on the prompt.
    """
    try:
        from transformer_lens.model_bridge.generalized_components.attention import (
            AttentionBridge,
        )
    except ImportError:  # pragma: no cover - another TransformerLens layout
        return
    original = AttentionBridge._update_kv_cache
    if getattr(original, "_madlens_fills_cache", False):
        return

    def _update_kv_cache(self: Any, k: torch.Tensor, v: torch.Tensor, **kwargs: Any) -> Any:
        if (
            _FILL_KV_CACHE.get()
            and kwargs.get("past_key_values") is None
            and kwargs.get("layer_past") is None
            and kwargs.get("cache") is not None
        ):
            kwargs["past_key_values"] = kwargs["cache"]
        return original(self, k, v, **kwargs)

    _update_kv_cache._madlens_fills_cache = True  # type: ignore[attr-defined]
    AttentionBridge._update_kv_cache = _update_kv_cache


@dataclass
class Prefill:
    """A left-padded batch's forward pass, kept for generation to continue from:
    `input_ids` and `attention_mask` `(batch, width)`, every position's `logits`, and the
    Hugging Face KV cache (`kv_cache`) the model's own forward accepts as `past_key_values`;
    all on the model's device."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    logits: torch.Tensor
    kv_cache: Any


def prefill(
    model: Any,
    inputs: Sequence[Input],
    hooks: Sequence[str],
    position: str = "last",
    *,
    logits: bool = False,
    logprobs: bool = False,
    max_length: int | None = None,
    strict: bool = True,
) -> tuple[Activations, Prefill]:
    """One left-padded forward pass over `inputs` (one batch) that returns both the
    activations `extract` would (same hooks, position and output statistics, equal up to
    float rounding) and the KV cache, so that generation continues from this pass instead
    of running the prompt again. Nothing is cached on disk."""
    inputs, hooks = _prepare(model, inputs, hooks, position)
    encoded = _encode_all(model, inputs, position, max_length, strict)
    acts, final_logits, token_logprobs, state = _run_batch(
        model, encoded, hooks, position, "left", logits, logprobs, keep_cache=True
    )
    rows = [enc.span[1] - enc.span[0] if position in ("all", "response") else 1 for enc in encoded]
    out = Activations(
        acts=acts,
        lengths=np.array(rows, dtype=np.int64),
        position=position,
        logits=final_logits,
        token_logprobs=token_logprobs,
        truncated=np.array([enc.truncated for enc in encoded], dtype=bool),
    )
    return out, state


def _prepare(model: Any, inputs: Sequence[Input], hooks: Sequence[str], position: str):
    if not inputs:
        raise MadlensError("no inputs to extract activations from")
    check_position(position)
    hooks = model.check_hooks(list(hooks)) if hooks else []
    hook_shapes(model, hooks, position)  # a hook the position cannot read fails here
    return list(inputs), hooks


def _encode_all(
    model: Any, inputs: list[Input], position: str, max_length: int | None, strict: bool
) -> list[Encoded]:
    limit = min(max_length or model.n_ctx, model.n_ctx)
    encoded = [encode(model.tokenizer, item, position, limit) for item in inputs]
    cut = [i for i, enc in enumerate(encoded) if enc.truncated]
    if cut and strict:
        raise MadlensError(
            f"input {cut[0]} is longer than the context ({limit} tokens); drop --strict to truncate"
        )
    if cut:
        warnings.warn(
            f"{len(cut)} input(s) longer than {limit} tokens kept only their last {limit} tokens "
            f"(first: input {cut[0]})",
            TruncationWarning,
            stacklevel=3,
        )
    return encoded


# --- what both engines share: the local one (`stream`) and Ray's (`madlens.scale`) -------------


def prepare(
    model: Any, inputs: Sequence[Input], hooks: Sequence[str], position: str
) -> tuple[list[Input], list[str]]:
    """The inputs as a list and the hooks checked against the model (one line for a bad
    hook, position or empty input list): the first step of `extract` and `stream`."""
    return _prepare(model, inputs, hooks, position)


def encode_inputs(
    model: Any, inputs: list[Input], position: str, limit: int, strict: bool = False
) -> list[Encoded]:
    """Tokenise `inputs` for `position` within `limit` tokens; a longer input keeps its last
    tokens with one `TruncationWarning` for all, or fails when `strict`."""
    return _encode_all(model, inputs, position, limit, strict)


def context_limit(model: Any, max_length: int | None = None) -> int:
    """The context limit in tokens: `max_length`, at most the model's."""
    return min(max_length or model.n_ctx, model.n_ctx)


def entry_names(hooks: Sequence[str], logits: bool = False, logprobs: bool = False) -> list[str]:
    """The names a cache entry keeps for a request: its hooks, then the output statistics."""
    return list(hooks) + ([LOGITS] if logits else []) + ([LOGPROBS] if logprobs else [])


def cache_entry(
    model: Any,
    inputs: list[Input],
    position: str,
    max_length: int | None = None,
    cache_dir: str | Path | None = None,
) -> ActivationCache:
    """The activation-cache entry of `inputs` at `position` (under `cache_dir`, default the
    cache's `activations` folder): its key names the weights, dtype, device type, position,
    data and context limit, not the engine that fills it, so a Ray run and a local run
    share it."""
    root = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    limit = context_limit(model, max_length)
    dtype = str(model.dtype).removeprefix("torch.")
    # the device type joins the key off the CPU only: CPU entries keep the keys they had
    where = device_key(model.device)
    key = cache_key(model.fingerprint, dtype, position, inputs, limit, where.get("device"))
    meta = {"model": model.name, "fingerprint": model.fingerprint, "dtype": dtype, **where}
    meta |= {"position": position, "n_inputs": len(inputs), "max_length": limit}
    return ActivationCache(root / key, meta)


def compute_shard(
    model: Any,
    encoded: list[Encoded],
    names: Sequence[str],
    position: str,
    batch_size: int = 16,
    padding_side: str = "right",
    bar: Any = None,
) -> dict[str, dict[str, np.ndarray]]:
    """The arrays of one cache shard (a chunk of at most `CHUNK` encoded inputs) for each
    entry name (hooks, `LOGITS`, `LOGPROBS`): the computation both engines run, in `stream`
    and in each Ray worker. `bar` (a tqdm bar) advances by input."""
    hooks = [name for name in names if name not in (LOGITS, LOGPROBS)]
    chunk = _compute_chunk(
        model, encoded, hooks, position, batch_size, padding_side, LOGITS in names,
        LOGPROBS in names, bar if bar is not None else tqdm(disable=True),
    )  # fmt: skip
    return {name: chunk_to_tensors(chunk, name) for name in names}


def stream(
    model: Any,
    inputs: Sequence[Input],
    hooks: Sequence[str],
    position: str = "last",
    *,
    batch_size: int = 16,
    padding_side: str = "right",
    logits: bool = False,
    logprobs: bool = False,
    max_length: int | None = None,
    strict: bool = False,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> Iterator[Activations]:
    """Yield activations chunk by chunk (in input order) from the disk cache, computing and
    caching first whatever is missing. Memory holds one chunk at a time."""
    inputs, hooks = _prepare(model, inputs, hooks, position)
    if padding_side not in ("left", "right"):
        raise MadlensError(f"padding_side must be 'left' or 'right', not '{padding_side}'")
    limit = context_limit(model, max_length)
    cache = cache_entry(model, inputs, position, max_length, cache_dir)
    missing = [name for name in entry_names(hooks, logits, logprobs) if not cache.has(name)]
    if not missing:
        touch(cache.root)
    else:
        _fill(model, inputs, cache, missing, position, batch_size, padding_side, limit, strict,
              progress)  # fmt: skip
    yield from iter_cached(cache, list(hooks), position, logits, logprobs)


def _fill(
    model: Any,
    inputs: list[Input],
    cache: ActivationCache,
    missing: list[str],
    position: str,
    batch_size: int,
    padding_side: str,
    limit: int,
    strict: bool,
    progress: bool,
) -> None:
    encoded = _encode_all(model, inputs, position, limit, strict)
    writers = {name: cache.writer(name) for name in missing}
    desc = f"activations ({model.name}, {position})"
    try:
        with tqdm(total=len(inputs), desc=desc, unit="input", disable=not progress) as bar:
            for start in range(0, len(encoded), CHUNK):
                shard = compute_shard(model, encoded[start : start + CHUNK], missing, position,
                                      batch_size, padding_side, bar)  # fmt: skip
                for name, writer in writers.items():
                    writer.write(shard[name])
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    for writer in writers.values():
        writer.close()


def extract(
    model: Any,
    inputs: Sequence[Input],
    hooks: Sequence[str],
    position: str = "last",
    *,
    batch_size: int = 16,
    padding_side: str = "right",
    logits: bool = False,
    logprobs: bool = False,
    max_length: int | None = None,
    strict: bool = False,
    cache: bool = True,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> Activations:
    """Activations of `inputs` (texts or chat conversations) at `hooks`.

    Args:
        model: a `madlens.models.Model`.
        inputs: plain texts, conversations (lists of {"role", "content"}) that go
            through the model's chat template, or lists of token ids (packed windows).
        hooks: TransformerLens hook names, e.g. `blocks.12.hook_resid_post`.
        position: `last`, `all`, `response` or `mean` (over the response).
        batch_size: inputs per forward pass; results do not depend on it.
        padding_side: `right` or `left`; results do not depend on it either.
        logits: also return the final token's next-token logits.
        logprobs: also return per-token log-probs: over a conversation's last message
            (the prompt, or the response), or over every token of a plain text.
        max_length: context limit (default: the model's); longer inputs keep their last
            tokens with a `TruncationWarning`, or fail when `strict`.
        cache: read/write the on-disk cache (under MADLENS_HOME, or `cache_dir`).
    """
    if cache:
        parts = list(
            stream(
                model, inputs, hooks, position, batch_size=batch_size,
                padding_side=padding_side, logits=logits, logprobs=logprobs,
                max_length=max_length, strict=strict, cache_dir=cache_dir, progress=progress,
            )
        )  # fmt: skip
        return Activations.concat(parts)
    inputs, hooks = _prepare(model, inputs, hooks, position)
    if padding_side not in ("left", "right"):
        raise MadlensError(f"padding_side must be 'left' or 'right', not '{padding_side}'")
    encoded = _encode_all(model, inputs, position, max_length, strict)
    with tqdm(total=len(inputs), desc="activations", unit="input", disable=not progress) as bar:
        return _compute_chunk(
            model, encoded, hooks, position, batch_size, padding_side, logits, logprobs, bar
        )


def _default_cache_dir() -> Path:
    return cache_folder("activations")
