"""Greedy (or sampled) generation from already-formatted prompt texts, batched with left
padding; chat prompts come from `madlens.data.format_chat`."""

from typing import Any

import torch
from tqdm.auto import tqdm


def generate(
    model: Any,
    prompts: list[str],
    max_new_tokens: int = 32,
    batch_size: int = 16,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
    progress: bool = False,
) -> list[str]:
    """Continue each prompt on the model's device (`model.device`); returns only the new
    text, special tokens removed."""
    tokenizer = model.tokenizer
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outputs: list[str] = []
    try:
        torch.manual_seed(seed)
        for start in tqdm(
            range(0, len(prompts), batch_size), desc="generate", disable=not progress
        ):
            batch = tokenizer(
                prompts[start : start + batch_size], return_tensors="pt", padding=True
            ).to(model.device)
            with torch.inference_mode():
                tokens = model.hf_model.generate(
                    **batch,
                    max_new_tokens=max_new_tokens,
                    do_sample=do_sample,
                    temperature=temperature if do_sample else None,
                    top_p=None,
                    top_k=None,
                    pad_token_id=tokenizer.pad_token_id,
                )
            new = tokens[:, batch["input_ids"].shape[1] :].cpu()
            outputs.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
    return outputs
