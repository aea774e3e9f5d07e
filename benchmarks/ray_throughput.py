"""Activation extraction, inputs per second: one local process against the Ray engine with
`--workers` actors on a local cluster, side by side in one run, on the same inputs into two
fresh caches (so both compute everything and write the same shards). Also prints each Ray
actor's own rate (its shards' compute time, model load excluded) and the projection for N
workers that this rate gives (docs/scale.md states the assumptions).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/ray_throughput.py
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/ray_throughput.py \\
        --model smollm2-135m-instruct --n 1024 --hooks 15
    # on a GPU node, one GPU worker's rate (what docs/scale.md projects from):
    .venv/bin/python benchmarks/ray_throughput.py --model smollm2-135m-instruct \\
        --n 8192 --hooks 15 --device cuda --workers 1
"""

import argparse
import os
import tempfile
import time

import torch

from madlens.activations import extract
from madlens.data.generators import english_questions
from madlens.models import load_model, parse_hooks
from madlens.scale import Request, fill_cache, session


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-test")
    parser.add_argument("--n", type=int, default=2048, help="inputs (512 per cache shard)")
    parser.add_argument("--hooks", default="-1")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu", help="cuda: one GPU per Ray worker")
    args = parser.parse_args()

    model = load_model(args.model, dtype="float32", device=args.device)
    hooks = model.check_hooks(parse_hooks(args.hooks, model.n_layers))
    questions = english_questions(args.n, seed=0)
    inputs = [[{"role": "user", "content": q}] for q in questions]
    each = "1 GPU" if model.device.type == "cuda" else "1 CPU (1 thread)"
    print(f"{args.model}, {len(inputs)} conversations, hooks {hooks}, float32 on "
          f"{model.device}, {os.cpu_count()} CPU(s); local: 1 process, "
          f"{torch.get_num_threads()} torch thread(s); ray: {args.workers} actor(s), {each} "
          "each")  # fmt: skip

    def local_seconds() -> float:
        with tempfile.TemporaryDirectory() as local_dir:
            start = time.perf_counter()
            extract(model, inputs, hooks, batch_size=args.batch_size, cache_dir=local_dir,
                    progress=False)  # fmt: skip
            return time.perf_counter() - start

    before = local_seconds()  # the local engine before and after Ray: a shared machine's
    with tempfile.TemporaryDirectory() as ray_dir:  # load drifts, the mean is compared
        start = time.perf_counter()
        with session(num_cpus=args.workers):
            cluster_s = time.perf_counter() - start
            report = fill_cache(model, [Request(inputs, hooks)], batch_size=args.batch_size,
                                cache_dir=ray_dir, workers=args.workers,
                                progress=False)  # fmt: skip
    after = local_seconds()
    local_s = (before + after) / 2
    print(f"local runs: {before:.1f} s before Ray, {after:.1f} s after")
    n = report.inputs
    busiest = max(report.busy.values())
    local_rate = n / local_s
    ray_rate = n / report.seconds
    steady = n / busiest
    per_worker = report.worker_rate
    print(f"{'engine':<34}{'seconds':>9}{'inputs/s':>10}{'vs local':>10}")
    print(f"{'local, 1 process':<34}{local_s:>9.1f}{local_rate:>10.1f}{1.0:>9.2f}x")
    print(f"{f'ray x{report.workers}, end to end':<34}{report.seconds:>9.1f}{ray_rate:>10.1f}"
          f"{ray_rate / local_rate:>9.2f}x")  # fmt: skip
    print(f"{f'ray x{report.workers}, once the actors are up':<34}{busiest:>9.1f}{steady:>10.1f}"
          f"{steady / local_rate:>9.2f}x")  # fmt: skip
    print(
        f"cluster start {cluster_s:.1f} s (not in the Ray figures); the pool's start and "
        f"model loads: {report.seconds - busiest:.1f} s of the end-to-end time"
    )
    print(
        f"per Ray worker: {per_worker:.1f} inputs/s ({report.shards} shards over "
        f"{len(report.busy)} actors)"
    )
    print("projection: N workers, each with cores (or a GPU) of its own, at this rate, on a job "
          "of at least N shards (N x 512 inputs), model loads not counted:")  # fmt: skip
    print("  " + ", ".join(f"N={w}: {w * per_worker:.0f}/s" for w in (1, 2, 4, 8, 16, 32)))


if __name__ == "__main__":
    main()
