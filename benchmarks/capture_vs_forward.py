"""Activation capture against a plain forward, on one device: SmolLM2-135M-Instruct, every
block's `hook_resid_post` (30 hooks), madlens `extract(..., cache=False)` against a plain
Hugging Face forward of the same token-id batches, measured side by side in one run.

madlens runs the batch through TransformerLens's bridge with a hook per layer, keeps the
`position` rows of each hook on the device and copies them to the host as float32 numpy (what
a detector or an SAE reads). The reference is the forward a user would run without madlens:
`AutoModelForCausalLM` (default SDPA attention) with `output_hidden_states=True` (the same 30
residual-stream tensors, left on the device), synchronised before the clock stops. Inputs
are token ids, so neither side tokenises. Best of `--repeats`, the two interleaved.

    .venv/bin/python benchmarks/capture_vs_forward.py --device cpu
    .venv/bin/python benchmarks/capture_vs_forward.py --device cuda --batches 20

The last line starts with `SUMMARY` (what benchmarks/gpu_check.sh collects).
"""

import argparse
import time

import torch
from transformers import AutoModelForCausalLM

from madlens.activations import extract
from madlens.models import load_model, resid_post, resolve_device, smollm2


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", default="auto", help="auto (the device's), float32, bfloat16")
    parser.add_argument("--batch", type=int, default=16, help="sequences per forward")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    parser.add_argument(
        "--batches", type=int, default=None, help="per timed run (default: 1 on a CPU, else 20)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--positions", default="last,all", help="comma-separated: last, all")
    args = parser.parse_args()
    device = resolve_device(args.device)
    n_batches = args.batches or (1 if device.type == "cpu" else 20)
    model = load_model("smollm2-135m-instruct", dtype=args.dtype, device=device)
    hooks = [resid_post(layer) for layer in range(model.n_layers)]
    plain = AutoModelForCausalLM.from_pretrained(smollm2.converted_dir(), dtype=model.dtype)
    plain = plain.to(device).eval()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 49000, (n_batches * args.batch, args.seq), generator=generator)
    inputs = [row.tolist() for row in ids]
    on_device = ids.to(device)
    mask = torch.ones_like(on_device)
    tokens = ids.numel()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    dtype = str(model.dtype).removeprefix("torch.")
    print(f"{name}, {dtype}, {len(hooks)} hooks, {n_batches} batch(es) of {args.batch} x "
          f"{args.seq} tokens, {torch.get_num_threads()} CPU threads")  # fmt: skip

    def run_plain() -> None:
        with torch.inference_mode():
            for start in range(0, len(on_device), args.batch):
                plain(input_ids=on_device[start : start + args.batch],
                      attention_mask=mask[start : start + args.batch],
                      output_hidden_states=True)  # fmt: skip

    print(f"{'position':<10}{'madlens tok/s':>15}{'HF tok/s':>12}{'ratio':>8}")
    ratios = {}
    for position in args.positions.split(","):

        def run_madlens(position: str = position) -> None:
            extract(model, inputs, hooks, position, batch_size=args.batch, cache=False,
                    progress=False)  # fmt: skip

        run_madlens(), run_plain()  # warm-up (kernels, allocator)
        ours, theirs = [], []
        for _ in range(args.repeats):  # interleaved: machine noise hits both alike
            ours.append(best_seconds(run_madlens, 1, device))
            theirs.append(best_seconds(run_plain, 1, device))
        a, b = tokens / min(ours), tokens / min(theirs)
        ratios[position] = a / b
        print(f"{position:<10}{a:>15.0f}{b:>12.0f}{a / b:>8.2f}")
    figures = ", ".join(f"{p} {r:.2f}x" for p, r in ratios.items())
    print(f"SUMMARY capture/forward on {name} ({dtype}): {figures} (target >= 0.9x on an H200)")


if __name__ == "__main__":
    main()
