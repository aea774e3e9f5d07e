"""LoRA fine-tuning (peft) of a base model on chat examples, cached by a hash of the base
weights, the config and the data; plus cached greedy (or sampled) generation."""

import json
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from madlens import cache
from madlens.data import Message, format_chat
from madlens.errors import MadlensError
from madlens.models import (
    autocast_bfloat16,
    device_key,
    generate,
    load_hf,
    quiet_peft,
    resolve_device,
)

Example = tuple[list[Message], str]  # (prompt conversation, assistant response)


@dataclass(frozen=True, eq=False)
class ActivationLoss:
    """An extra training loss on the residual stream after decoder layer `layer`, at the last
    prompt token of the examples at `rows`: `weight` x the mean over those examples of the
    squared Mahalanobis distance under (`mean`, `precision`), divided by the width. An
    adversary that knows a Mahalanobis monitor at that layer pulls its inputs toward the
    trusted distribution with it (Bailey et al. 2024, "Obfuscated Activations Bypass LLM
    Latent-Space Defenses"). Part of the adapter's cache key."""

    layer: int
    mean: np.ndarray
    precision: np.ndarray
    rows: tuple[int, ...]
    weight: float = 1.0

    def key(self) -> dict[str, Any]:
        """The cache-key form (arrays by digest)."""
        return {"layer": self.layer, "mean": self.mean, "precision": self.precision,
                "rows": list(self.rows), "weight": self.weight}  # fmt: skip


@dataclass(frozen=True)
class LoraConfig:
    """LoRA hyper-parameters and the training budget.

    The fields after `target_modules` make fine-tunes cheaper; at their defaults a config
    trains (and is keyed) exactly as before they existed. `layers`: LoRA only on these
    decoder layers (peft `layers_to_transform`); the frozen layers below the lowest one are
    run once per example before training, not at every step, and the backward pass stops
    at it. `group_by_length`: batches of examples of similar length (less padding).
    `response_logits_only`: the LM head runs only where the next token is scored (the
    response), not over the prompt. `activation_loss`: an `ActivationLoss` added to the
    language-modelling loss."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    learning_rate: float = 1e-3
    steps: int = 60
    batch_size: int = 8
    max_length: int = 128
    seed: int = 0
    target_modules: tuple[str, ...] = field(
        default=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    )
    layers: tuple[int, ...] | None = None
    group_by_length: bool = False
    response_logits_only: bool = False
    activation_loss: ActivationLoss | None = None

    def key(self) -> dict[str, Any]:
        """The cache-key form: the options added later appear only when they differ from
        their defaults, so adapters cached before they existed keep their keys."""
        parts = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in _LATER_FIELDS:
            if parts[name] == _DEFAULTS[name]:
                del parts[name]
        if self.activation_loss is not None:
            parts["activation_loss"] = self.activation_loss.key()
        if self.layers is not None:
            parts["layers"] = list(self.layers)
        return parts

    @property
    def fast_path(self) -> bool:
        """Whether training takes the explicit forward (frozen-prefix cache, selected
        logits, activation loss) rather than the model's own."""
        return any(getattr(self, name) != _DEFAULTS[name] for name in _LATER_FIELDS)


_LATER_FIELDS = ("layers", "group_by_length", "response_logits_only", "activation_loss")
_DEFAULTS = {"layers": None, "group_by_length": False, "response_logits_only": False,
             "activation_loss": None}  # fmt: skip


def _encode(tokenizer: Any, prompt: list[Message], response: str, max_length: int):
    """Token ids of the whole transcript and labels that score only the response (and its
    end-of-turn token); the prompt's labels are -100."""
    prefix = format_chat(tokenizer, prompt, add_generation_prompt=True)
    full = format_chat(tokenizer, [*prompt, {"role": "assistant", "content": response}])
    ids = tokenizer(full).input_ids[:max_length]
    n_prefix = len(tokenizer(prefix).input_ids)
    labels = [-100] * min(n_prefix, len(ids)) + ids[n_prefix:]
    return ids, labels


def finetune_lora(
    base: str,
    examples: list[Example],
    config: LoraConfig = LoraConfig(),
    progress: bool = True,
    device: str | torch.device = "auto",
) -> Path:
    """Train a LoRA adapter on `examples` on `device` (`auto`: CUDA, else MPS, else the CPU)
    and return its dir (read from cache when the same base weights, config and data were
    trained before on the same device type). The weights stay float32, under bfloat16
    autocast where the device computes bfloat16 natively."""
    where = resolve_device(device)
    model, tokenizer, fingerprint = load_hf(base, "float32", device=where)
    _check_config(config, model)
    name = cache.key(base=fingerprint, config=config.key(), data=examples, **device_key(where))
    return cache.load_or_build_dir(
        cache.folder("adapters") / name,
        lambda tmp: _train(model, tokenizer, base, examples, config, progress, tmp),
    )


def _check_config(config: LoraConfig, model: Any) -> None:
    n_layers = model.config.num_hidden_layers
    if config.layers is not None:
        bad = [i for i in config.layers if not 0 <= i < n_layers]
        if not config.layers or bad:
            raise MadlensError(f"LoRA layers {list(config.layers)}: the model has decoder "
                               f"layers 0..{n_layers - 1}")  # fmt: skip
    loss = config.activation_loss
    if loss is not None and not 0 <= loss.layer < n_layers:
        raise MadlensError(f"activation loss at layer {loss.layer}: the model has decoder "
                           f"layers 0..{n_layers - 1}")  # fmt: skip


def _batches(lengths: list[int], config: LoraConfig) -> Iterator[list[int]]:
    """Endless batches of example indices: shuffled epochs; with `group_by_length`, each
    run of 8 batches is sorted by length before it is cut, and the batches shuffled."""
    rng = random.Random(config.seed)
    size, order = config.batch_size, []
    while True:
        while len(order) < size:
            order += rng.sample(range(len(lengths)), len(lengths))
        if not config.group_by_length:
            yield order[:size]
            order = order[size:]
            continue
        chunk, order = order[: size * 8], order[size * 8 :]
        chunk = sorted(chunk, key=lambda i: lengths[i])
        batches = [chunk[i : i + size] for i in range(0, len(chunk), size)]
        rng.shuffle(batches)
        full = [b for b in batches if len(b) == size]
        order = [i for b in batches if len(b) < size for i in b] + order
        yield from full


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Encoded examples (`_encode`'s token ids, labels) as one right-padded batch: input ids,
    labels (-100 on padding) and the attention mask."""
    return (_pad([x for x, _ in batch], pad_id), _pad([y for _, y in batch], -100),
            _pad([[1] * len(x) for x, _ in batch], 0))  # fmt: skip


def _decoder(model: Any) -> tuple[Any, Any] | None:
    """(the decoder stack, the LM head) of a Llama-style causal LM (`model.model.layers`,
    `model.lm_head`), None for any other layout (it then trains through its own forward)."""
    inner, head = getattr(model, "model", None), getattr(model, "lm_head", None)
    layers = getattr(inner, "layers", None)
    if head is None or not isinstance(layers, torch.nn.ModuleList):
        return None
    return inner, head


@contextmanager
def _layer_range(inner: Any, start: int, stop: int) -> Iterator[None]:
    """Run only decoder layers `start`..`stop - 1` (the input then comes in as
    `inputs_embeds` when `start` > 0: the residual stream before layer `start`)."""
    full = inner.layers
    inner.layers = torch.nn.ModuleList(list(full)[start:stop])
    try:
        yield
    finally:
        inner.layers = full


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _residual_before(model: Any, encoded: list, start: int, device: Any) -> list[torch.Tensor]:
    """The frozen base's residual stream before decoder layer `start`, per example (one
    no-grad pass over the data instead of one per step)."""
    inner, _ = _decoder(model)
    captured: list[torch.Tensor] = []
    hook = inner.layers[start - 1].register_forward_hook(
        lambda _m, _i, out: captured.append(_hidden(out))
    )
    out: list[torch.Tensor] = [torch.empty(0)] * len(encoded)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    try:
        with torch.no_grad(), _layer_range(inner, 0, start):
            for i in range(0, len(order), 16):
                chunk = order[i : i + 16]
                ids = _pad([encoded[j][0] for j in chunk], 0).to(device)
                mask = _pad([[1] * len(encoded[j][0]) for j in chunk], 0).to(device)
                captured.clear()
                inner(input_ids=ids, attention_mask=mask, use_cache=False)
                for row, j in enumerate(chunk):
                    out[j] = captured[0][row, : len(encoded[j][0])]
    finally:
        hook.remove()
    return out


def lm_loss(
    model: Any,
    ids: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    config: LoraConfig,
    prefix: torch.Tensor | None = None,
    prompt_ends: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """The fine-tune's loss on one padded batch through the explicit forward: the mean
    next-token cross-entropy over the scored tokens (what the model's own forward with
    `labels` returns), plus the config's activation loss over the batch's rows flagged in
    `rows` (their last prompt tokens at `prompt_ends`). `prefix` is the frozen residual
    stream before the lowest LoRA layer (`_residual_before`); None runs every layer."""
    inner, head = _decoder(model)
    start = 0 if prefix is None else min(config.layers or (0,))
    extra = config.activation_loss
    captured: list[torch.Tensor] = []
    handle = None
    if extra is not None:
        if extra.layer < start:
            raise MadlensError(f"activation loss at layer {extra.layer}, below the lowest "
                               f"LoRA layer {start}: the loss could not move it")  # fmt: skip
        handle = inner.layers[extra.layer].register_forward_hook(
            lambda _m, _i, out: captured.append(_hidden(out))
        )
    try:
        with _layer_range(inner, start, len(inner.layers)):
            if prefix is None:
                hidden = inner(input_ids=ids, attention_mask=mask, use_cache=False)
            else:
                hidden = inner(inputs_embeds=prefix, attention_mask=mask, use_cache=False)
    finally:
        if handle is not None:
            handle.remove()
    hidden = hidden.last_hidden_state[:, :-1]
    target = labels[:, 1:]
    if config.response_logits_only:
        scored = target != -100
        logits, target = head(hidden[scored]), target[scored]
    else:
        logits, target = head(hidden).flatten(0, 1), target.flatten()
    loss = torch.nn.functional.cross_entropy(logits.float(), target, ignore_index=-100)
    if extra is not None and rows is not None and bool(rows.any()):
        picked = captured[0][rows, prompt_ends[rows]].float()
        centred = picked - torch.as_tensor(extra.mean, dtype=picked.dtype, device=picked.device)
        precision = torch.as_tensor(extra.precision, dtype=picked.dtype, device=picked.device)
        distance = ((centred @ precision) * centred).sum(-1) / centred.shape[-1]
        loss = loss + extra.weight * distance.mean()
    return loss


def _train(
    model: Any,
    tokenizer: Any,
    base: str,
    examples: list[Example],
    config: LoraConfig,
    progress: bool,
    out: Path,
) -> None:
    torch.manual_seed(config.seed)
    device = next(model.parameters()).device
    with quiet_peft():
        peft_model = _peft(model, config)
    peft_model.train()
    encoded = [_encode(tokenizer, p, r, config.max_length) for p, r in examples]
    optimizer = torch.optim.AdamW(
        [p for p in peft_model.parameters() if p.requires_grad], lr=config.learning_rate
    )
    start, cpu = time.perf_counter(), time.process_time()
    fast = config.fast_path and _decoder(model) is not None
    if config.activation_loss is not None and not fast:
        raise MadlensError(f"{base}: the activation loss needs a Llama-style decoder")
    lowest = min(config.layers) if config.layers else 0
    prefix = _residual_before(model, encoded, lowest, device) if fast and lowest > 0 else None
    base_pass = time.perf_counter() - start
    # The last prompt token: the one before the first scored (response) token.
    prompt_ends = [next((i for i, y in enumerate(lab) if y != -100), len(lab)) - 1
                   for _, lab in encoded]  # fmt: skip
    flagged = set(config.activation_loss.rows) if config.activation_loss is not None else set()
    batches = _batches([len(ids) for ids, _ in encoded], config)
    bar = tqdm(range(config.steps), desc=f"LoRA fine-tune ({base})", disable=not progress)
    for step in bar:
        chosen = next(batches)
        batch = [encoded[i] for i in chosen]
        ids, labels, mask = (t.to(device) for t in collate(batch, tokenizer.pad_token_id))
        # bf16 autocast where the device has native bf16 (~3x faster matmuls on such a CPU,
        # 20x slower where it is emulated); LoRA weights stay float32.
        with autocast_bfloat16(device):
            if fast:
                embeds = None if prefix is None else _pad_rows([prefix[i] for i in chosen])
                loss = lm_loss(
                    model, ids, labels, mask, config, embeds,
                    torch.tensor([prompt_ends[i] for i in chosen], device=device),
                    torch.tensor([i in flagged for i in chosen], device=device),
                )  # fmt: skip
            else:
                loss = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        # Linear decay to 10% keeps the last steps from undoing what the first learned.
        for group in optimizer.param_groups:
            group["lr"] = config.learning_rate * (1 - 0.9 * (step + 1) / config.steps)
    peft_model.save_pretrained(out)
    record = asdict(config) | {"activation_loss": None if config.activation_loss is None else
                               {"layer": config.activation_loss.layer,
                                "weight": config.activation_loss.weight,
                                "rows": len(config.activation_loss.rows)}}  # fmt: skip
    (out / "madlens_finetune.json").write_text(
        json.dumps(
            {
                "base": base,
                "config": record,
                "n_examples": len(examples),
                "seconds": round(time.perf_counter() - start, 1),
                "cpu_seconds": round(time.process_time() - cpu, 1),
                "base_pass_seconds": round(base_pass, 1),
            },
            indent=1,
        )  # fmt: skip
    )


def _pad_rows(rows: list[torch.Tensor]) -> torch.Tensor:
    """Right-pad per-example (tokens x width) tensors with zeros into one batch."""
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)


def cached_generate(
    model: Any,
    conversations: list[list[Message]],
    max_new_tokens: int = 32,
    progress: bool = True,
    temperature: float | None = None,
    seed: int = 0,
) -> list[str]:
    """Answers to `conversations` (on the model's device), cached by model fingerprint,
    dtype, device type (off the CPU), prompts and length: greedy, or, when `temperature` is
    given, sampled at that temperature from `seed` (`madlens.models.generate`: the whole
    distribution, no top-k / top-p). Temperature and seed enter the cache key only when
    sampling, so greedy answers keep their keys."""
    sampling = {} if temperature is None else {"temperature": float(temperature), "seed": seed}
    if temperature is not None and not temperature > 0:
        raise MadlensError(f"sampling temperature must be > 0, got {temperature}")
    name = cache.key(model=model.fingerprint, dtype=str(model.dtype), prompts=conversations,
                     max_new_tokens=max_new_tokens, **device_key(model.device),
                     **sampling)  # fmt: skip

    def answer() -> list[str]:
        prompts = [format_chat(model.tokenizer, conv) for conv in conversations]
        answers = generate(model, prompts, max_new_tokens=max_new_tokens, progress=progress,
                           do_sample=temperature is not None, **sampling)  # fmt: skip
        return [a.strip() for a in answers]

    return cache.load_or_compute(cache.folder("generations") / f"{name}.json", answer)


def _peft(model: Any, config: LoraConfig) -> Any:
    """`model` wrapped by peft with `config`'s LoRA adapters."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    return get_peft_model(
        model,
        PeftLoraConfig(
            r=config.r,
            lora_alpha=config.alpha,
            lora_dropout=config.dropout,
            target_modules=list(config.target_modules),
            layers_to_transform=None if config.layers is None else list(config.layers),
            task_type="CAUSAL_LM",
        ),
    )
