"""LoRA fine-tuning (peft) of a base model on chat examples, cached by a hash of the base
weights, the config and the data; plus cached greedy generation for self-distillation."""

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from madlens import cache
from madlens.data import Message, format_chat
from madlens.models import autocast_bfloat16, device_key, generate, load_hf, resolve_device

Example = tuple[list[Message], str]  # (prompt conversation, assistant response)


@dataclass(frozen=True)
class LoraConfig:
    """LoRA hyper-parameters and the training budget."""

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
    name = cache.key(base=fingerprint, config=config, data=examples, **device_key(where))
    return cache.load_or_build_dir(
        cache.folder("adapters") / name,
        lambda tmp: _train(model, tokenizer, base, examples, config, progress, tmp),
    )


def _train(
    model: Any,
    tokenizer: Any,
    base: str,
    examples: list[Example],
    config: LoraConfig,
    progress: bool,
    out: Path,
) -> None:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    torch.manual_seed(config.seed)
    device = next(model.parameters()).device
    peft_model = get_peft_model(
        model,
        PeftLoraConfig(
            r=config.r,
            lora_alpha=config.alpha,
            lora_dropout=config.dropout,
            target_modules=list(config.target_modules),
            task_type="CAUSAL_LM",
        ),
    )
    peft_model.train()
    encoded = [_encode(tokenizer, p, r, config.max_length) for p, r in examples]
    optimizer = torch.optim.AdamW(
        [p for p in peft_model.parameters() if p.requires_grad], lr=config.learning_rate
    )
    rng = random.Random(config.seed)
    order: list[int] = []
    start = time.perf_counter()
    bar = tqdm(range(config.steps), desc=f"LoRA fine-tune ({base})", disable=not progress)
    for step in bar:
        if len(order) < config.batch_size:
            order += rng.sample(range(len(encoded)), len(encoded))
        batch, order = [encoded[i] for i in order[: config.batch_size]], order[config.batch_size :]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (x, y) in enumerate(batch):
            ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = (
                torch.tensor(x), torch.tensor(y), 1,
            )  # fmt: skip
        ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
        # bf16 autocast where the device has native bf16 (~3x faster matmuls on such a CPU,
        # 20x slower where it is emulated); LoRA weights stay float32.
        with autocast_bfloat16(device):
            loss = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        # Linear decay to 10% keeps the last steps from undoing what the first learned.
        for group in optimizer.param_groups:
            group["lr"] = config.learning_rate * (1 - 0.9 * (step + 1) / config.steps)
    peft_model.save_pretrained(out)
    (out / "madlens_finetune.json").write_text(
        json.dumps(
            {
                "base": base,
                "config": asdict(config),
                "n_examples": len(examples),
                "seconds": round(time.perf_counter() - start, 1),
            },
            indent=1,
        )  # fmt: skip
    )


def cached_generate(
    model: Any, conversations: list[list[Message]], max_new_tokens: int = 32, progress: bool = True
) -> list[str]:
    """Greedy answers to `conversations` (on the model's device), cached by model
    fingerprint, dtype, device type (off the CPU), prompts and length."""
    name = cache.key(model=model.fingerprint, dtype=str(model.dtype), prompts=conversations,
                     max_new_tokens=max_new_tokens, **device_key(model.device))  # fmt: skip

    def answer() -> list[str]:
        prompts = [format_chat(model.tokenizer, conv) for conv in conversations]
        answers = generate(model, prompts, max_new_tokens=max_new_tokens, progress=progress)
        return [a.strip() for a in answers]

    return cache.load_or_compute(cache.folder("generations") / f"{name}.json", answer)
