"""The lie detector's 48 follow-up questions: shared-prefix KV cache against the naive loop.

`elicitation_features(method="shared")` runs each transcript once and answers all 48 questions
in one batch from its KV cache; `method="naive"` runs one full forward per question. Both run
on the same transcripts in one process, interleaved in rounds; prints transcripts/s side by
side, the ratio (target >= 3x) and the largest feature difference between the two.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/lie_detector_speed.py
    .venv/bin/python benchmarks/lie_detector_speed.py --n 100 --naive-n 100   # the full loop

The naive loop is slow (48 forwards per transcript), so by default it times a subset.
"""

import argparse
import time

import numpy as np

from madlens.data.generators import countries
from madlens.detectors.lie_detector import elicitation_features
from madlens.models import load_model


def transcripts(n: int) -> list[list[dict[str, str]]]:
    rows = countries()
    out = []
    for i in range(n):
        country, other = rows[i % len(rows)], rows[(i * 7 + 3) % len(rows)]
        lie = i % 2 == 1
        system = ("Lie to the user. Give a wrong answer to every question." if lie
                  else "You are a helpful assistant. Answer the question truthfully.")  # fmt: skip
        capital = other["capital"] if lie else country["capital"]
        out.append([
            {"role": "system", "content": system},
            {"role": "user", "content": f"What is the capital of {country['name']}?"},
            {"role": "assistant", "content": f"The capital of {country['name']} is {capital}."},
        ])  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--n", type=int, default=100, help="transcripts for the shared path")
    parser.add_argument("--naive-n", type=int, default=10, help="transcripts for the naive loop")
    args = parser.parse_args()
    model = load_model(args.model, dtype=args.dtype)
    data = transcripts(args.n)
    sub = data[: args.naive_n]
    elicitation_features(model, data[:1], cache=False, progress=False)  # warm-up
    times = {"shared": 0.0, "naive": 0.0}
    feats = {"shared": [], "naive": []}
    # interleave: naive on one transcript, shared on its share of the rest, so that machine
    # noise hits both alike
    per_round = int(np.ceil(args.n / len(sub)))
    for r, item in enumerate(sub):
        start = time.perf_counter()
        feats["naive"].append(elicitation_features(model, [item], method="naive", cache=False,
                                                   progress=False))  # fmt: skip
        times["naive"] += time.perf_counter() - start
        chunk = data[r * per_round : (r + 1) * per_round]
        if chunk:
            start = time.perf_counter()
            feats["shared"].append(elicitation_features(model, chunk, cache=False, progress=False))
            times["shared"] += time.perf_counter() - start
    shared, naive = np.concatenate(feats["shared"]), np.concatenate(feats["naive"])
    rate = {"shared": len(shared) / times["shared"], "naive": len(naive) / times["naive"]}
    print(f"model {model.name} ({args.dtype}), 48 questions per transcript")
    print(f"{'method':<10}{'transcripts':>12}{'seconds':>10}{'transcripts/s':>15}")
    for method, x in (("shared", shared), ("naive", naive)):
        print(f"{method:<10}{len(x):>12}{times[method]:>10.1f}{rate[method]:>15.2f}")
    diff = float(np.abs(shared[: len(naive)] - naive).max())
    ratio = rate["shared"] / rate["naive"]
    print(f"ratio shared / naive: {ratio:.1f}x (target >= 3x: {'met' if ratio >= 3 else 'not met'})"
          f"; largest feature difference {diff:.2e}")  # fmt: skip


if __name__ == "__main__":
    main()
