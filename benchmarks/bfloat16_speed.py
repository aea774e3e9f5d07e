"""bfloat16 against float32 on this CPU, side by side in one run: a SmolLM2 forward of
16 x 128 tokens, and one LoRA step (8 x 50 tokens, all linear layers, r = 8) with and without
bfloat16 autocast. Prints seconds and the ratio, and what `dtype="auto"` picks here.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bfloat16_speed.py
"""

import time

import torch
from peft import LoraConfig, get_peft_model

from madlens.models import fast_bfloat16, load_hf, resolve_dtype

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def forward_seconds(dtype: str) -> float:
    model, _, _ = load_hf("smollm2-135m-instruct", dtype)
    ids = torch.randint(100, 1000, (16, 128), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model(input_ids=ids)  # warm-up
        start = time.perf_counter()
        model(input_ids=ids)
    return time.perf_counter() - start


def lora_step_seconds(autocast: bool) -> float:
    model, _, _ = load_hf("smollm2-135m-instruct", "float32")
    config = LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(model, config).train()
    ids = torch.randint(100, 1000, (8, 50), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    times = []
    for _ in range(2):  # the second step is timed
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return times[-1]


def main() -> None:
    print(f"native bfloat16: {fast_bfloat16()}; dtype auto -> {resolve_dtype('auto')}")
    f32, bf16 = forward_seconds("float32"), forward_seconds("bfloat16")
    print(f"forward 16x128: float32 {f32:.1f} s, bfloat16 {bf16:.1f} s, bf16/f32 {bf16 / f32:.1f}x")
    plain, autocast = lora_step_seconds(False), lora_step_seconds(True)
    print(f"LoRA step: float32 {plain:.1f} s, bf16 autocast {autocast:.1f} s, "
          f"ratio {autocast / plain:.1f}x")  # fmt: skip


if __name__ == "__main__":
    main()
