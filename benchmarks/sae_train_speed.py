"""SAE training speed: madlens's TopK SAE against SAELens's `TopKTrainingSAE`, side by side in
one run, on the same in-memory activations, same size (576 x 4608), k, batch and Adam.

Each step is what each library's trainer does per batch: forward, MSE + AuxK loss (a fixed
10% of latents marked dead, so both compute it), backward, Adam step; madlens also keeps its
decoder rows at unit norm (SAELens's default TopK instead rescales by the decoder norm).
Then activations/s end to end from text: corpus -> bf16 capture -> training, no cache.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/sae_train_speed.py [--steps 30]
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "sae"))
from saelens_compat import saelens  # noqa: E402

from madlens.sae.topk import TopKConfig, TopKSAE  # noqa: E402


def time_steps(step, steps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - start)


def madlens_step(d_in, d_sae, k, x, dead):
    sae = TopKSAE(TopKConfig(d_in, d_sae, k=k))
    opt = torch.optim.Adam(sae.parameters(), lr=2e-4)

    def step():
        loss = sae.training_loss(x, dead)
        opt.zero_grad(set_to_none=True)
        loss.total.backward()
        sae.remove_parallel_gradient()
        opt.step()
        sae.normalize_decoder()

    return step


def saelens_step(d_in, d_sae, k, x, dead):
    saes = saelens()
    cfg = saes.TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k)
    sae = saes.TopKTrainingSAE(cfg)
    opt = torch.optim.Adam(sae.parameters(), lr=2e-4)
    from sae_lens.saes.sae import TrainStepInput

    def step():
        out = sae.training_forward_pass(
            TrainStepInput(
                sae_in=x,
                coefficients={},
                dead_neuron_mask=dead,
                n_training_steps=0,
                is_logging_step=False,
            )  # fmt: skip
        )
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    return step


def end_to_end(tokens: int) -> tuple[float, float]:
    from madlens.sae.train import TrainConfig, train_on_model

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        metrics = train_on_model(
            "smollm2-135m-instruct", "blocks.15.hook_resid_post", Path(tmp) / "sae",
            tokens=tokens, config=TrainConfig(), dtype="bfloat16", eval_windows=4,
            progress=False, cache_dir=Path(tmp) / "cache",
        )  # fmt: skip
        seconds = time.perf_counter() - start
    return metrics["training_rows"] / seconds, seconds


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=16384, help="end-to-end run; 0 skips it")
    args = parser.parse_args()
    d_in, d_sae = 576, 4608
    torch.manual_seed(0)
    x = torch.randn(args.batch, d_in) * 3 + 1
    dead = torch.rand(d_sae, generator=torch.Generator().manual_seed(1)) < 0.1
    print(f"TopK SAE {d_in} x {d_sae}, k={args.k}, batch {args.batch}, Adam, "
          f"AuxK on {int(dead.sum())} dead latents, {torch.get_num_threads()} threads")  # fmt: skip
    rates = {}
    # interleaved rounds, best of each: the machine is shared, so noise is one-sided
    for _ in range(2):
        for name, make in (("madlens", madlens_step), ("SAELens", saelens_step)):
            rate = time_steps(make(d_in, d_sae, args.k, x, dead), args.steps)
            rates[name] = max(rates.get(name, 0.0), rate)
    for name, rate in rates.items():
        print(f"  {name:<8} {rate:8.2f} steps/s  {rate * args.batch:10.0f} activations/s")
    print(f"  ratio madlens / SAELens: {rates['madlens'] / rates['SAELens']:.2f}x")
    if args.tokens:
        rate, seconds = end_to_end(args.tokens)
        print(f"end to end from text (corpus, bf16 capture, train, eval), {args.tokens} tokens: "
              f"{rate:.0f} activations/s ({seconds:.0f} s)")  # fmt: skip


if __name__ == "__main__":
    np.random.seed(0)
    main()
