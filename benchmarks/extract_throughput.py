"""Extraction throughput: madlens (all residual-stream hooks, every position) against a plain
Hugging Face forward with output_hidden_states=True, on the same 16 x 128 batch, in float32
and bfloat16, measured side by side in one run.

    .venv/bin/python benchmarks/extract_throughput.py [--repeats 3]
"""

import argparse
import time

import torch
from transformers import AutoModelForCausalLM

from madlens.activations import extract
from madlens.models import load_model, residual_hooks, smollm2

BATCH, SEQ = 16, 128


def best_seconds(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 49000, (BATCH, SEQ), generator=generator)
    inputs = [row.tolist() for row in ids]
    tokens = BATCH * SEQ
    print(f"batch {BATCH} x {SEQ} tokens, threads {torch.get_num_threads()}")
    print(f"{'dtype':<10}{'madlens tok/s':>15}{'HF tok/s':>12}{'ratio':>8}")
    for dtype in ("float32", "bfloat16"):
        model = load_model("smollm2-135m-instruct", dtype=dtype)
        hooks = residual_hooks(model.n_layers)
        plain = AutoModelForCausalLM.from_pretrained(
            smollm2.converted_dir(), dtype=getattr(torch, dtype)
        ).eval()

        def run_madlens(model=model, hooks=hooks):
            extract(model, inputs, hooks, "all", batch_size=BATCH, cache=False, progress=False)

        def run_hf(plain=plain):
            with torch.inference_mode():
                plain(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)

        # Interleave the two so that machine noise hits both alike.
        ours, theirs = [], []
        for _ in range(args.repeats):
            ours.append(best_seconds(run_madlens, 1))
            theirs.append(best_seconds(run_hf, 1))
        a, b = tokens / min(ours), tokens / min(theirs)
        print(f"{dtype:<10}{a:>15.0f}{b:>12.0f}{a / b:>8.2f}")


if __name__ == "__main__":
    main()
