"""SAE training steps/s on a device against the same machine's CPU, measured side by side in
one run: madlens's `train_sae` (the training loop `madlens sae train` runs), TopK SAE 576 x
4608 (SmolLM2's residual width, expansion 8), k = 32, batches of 1024 activation rows, Adam.

Each step is what `train_sae` does per batch: the host batch copied to the device, forward,
MSE + AuxK loss, backward, Adam step, decoder renormalisation and the firing statistics.
The rows are synthetic (activation-like: a large offset, a decaying spectrum); the dead-latent
window is shortened so that AuxK runs from the first steps on both sides. Each side runs a
short warm-up first (CUDA context, kernels), then the timed run.

    .venv/bin/python benchmarks/sae_device_speed.py --device cuda [--reference-cpu-rate R]
    .venv/bin/python benchmarks/sae_device_speed.py --device cpu --cpu-steps 10

`--reference-cpu-rate` adds the ratio against a CPU figure measured on another machine (the
development machine's, from docs/benchmarks.md). The last line starts with `SUMMARY`.
"""

import argparse
import time

import numpy as np
import torch

from madlens.models import resolve_device
from madlens.sae.train import TrainConfig, train_sae

D_IN, EXPANSION, K, BATCH = 576, 8, 32, 1024


def steps_per_second(device: torch.device, steps: int, rows: np.ndarray) -> float:
    config = TrainConfig(expansion=EXPANSION, k=K, batch_size=BATCH, warmup_steps=5,
                         dead_tokens=4 * BATCH)  # fmt: skip
    train_sae([rows] * 3, D_IN, config, progress=False, device=device)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = train_sae([rows] * steps, D_IN, config, progress=False, device=device)
    float(result.sae.W_dec.detach().sum())  # waits for the last step
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--steps", type=int, default=300, help="timed steps on the device")
    parser.add_argument("--cpu-steps", type=int, default=10, help="timed steps on the CPU")
    parser.add_argument("--reference-cpu-rate", type=float, default=None,
                        help="steps/s of another machine's CPU, for a second ratio")  # fmt: skip
    args = parser.parse_args()
    device = resolve_device(args.device)
    rng = np.random.default_rng(0)
    scales = np.linspace(3.0, 0.1, D_IN)
    rows = (rng.normal(size=(BATCH, D_IN)) * scales + 1.0).astype(np.float32)
    print(f"TopK SAE {D_IN} x {D_IN * EXPANSION}, k={K}, batch {BATCH}, Adam, AuxK; "
          f"{torch.get_num_threads()} CPU threads")  # fmt: skip
    cpu = torch.device("cpu")
    cpu_rate = steps_per_second(cpu, args.cpu_steps, rows)
    print(f"  CPU of this machine (same run): {cpu_rate:8.2f} steps/s")
    if device.type == "cpu":
        print(f"SUMMARY SAE training on the CPU: {cpu_rate:.2f} steps/s")
        return
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    rate = steps_per_second(device, args.steps, rows)
    print(f"  {name}: {rate:8.2f} steps/s ({rate * BATCH:,.0f} activations/s)")
    line = f"SUMMARY SAE training {name} {rate:.1f} steps/s = {rate / cpu_rate:.1f}x this " \
           f"machine's CPU ({cpu_rate:.2f} steps/s, same run)"  # fmt: skip
    if args.reference_cpu_rate:
        line += f", {rate / args.reference_cpu_rate:.0f}x the reference CPU " \
                f"({args.reference_cpu_rate:.2f} steps/s)"  # fmt: skip
    print(line + " (target >= 20x)")


if __name__ == "__main__":
    main()
