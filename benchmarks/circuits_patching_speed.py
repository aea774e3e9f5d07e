"""Head-output patching speed: every head of SmolLM2-135M-Instruct (30 x 9 = 270) over 50 IOI
prompt pairs, madlens's batched patching against TransformerLens's own per-head loop, side by
side in one run.

madlens (`patch_head_out`) reuses the clean and corrupted caches, runs all heads of a layer as
one batch that starts at that layer, skips padding (prompts grouped by length) and reads only
the two answer logits. The reference is `transformer_lens.patching.generic_activation_patch`
(what `get_act_patch_attn_head_out_all_pos` loops over): one full forward per head, from the
embeddings to full-vocabulary logits. It is timed on a sample of heads and scaled to 270, and
its values are checked against madlens's on that sample.

    .venv/bin/python benchmarks/circuits_patching_speed.py [--dtype bfloat16] [--threads N]
"""

import argparse
import os
import time

import pandas as pd
import torch
from transformer_lens import patching as tl_patching

from madlens.circuits.ioi import make_ioi
from madlens.circuits.patching import PatchingSession, patch_head_out
from madlens.models import load_model


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--pairs", type=int, default=50)
    parser.add_argument("--sample", type=int, default=6, help="heads timed in the naive loop")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model("smollm2-135m-instruct", dtype=args.dtype)
    data = make_ioi(model.tokenizer, n=args.pairs, seed=0)
    n_heads = model.n_layers * model.bridge.cfg.n_heads
    print(
        f"SmolLM2-135M-Instruct {args.dtype}, {args.pairs} IOI pairs (padded to "
        f"{data.tokens.shape[1]} tokens, mean {data.lengths.float().mean():.1f}), {n_heads} heads, "
        f"threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}"
    )

    start = time.perf_counter()
    session = PatchingSession(
        model, data.tokens, data.corrupted_tokens, data.answers, data.end, progress=False
    )
    cache_s = time.perf_counter() - start
    start = time.perf_counter()
    ours = patch_head_out(session, base="corrupted", source="clean", normalise=False)
    ours_s = time.perf_counter() - start

    # TransformerLens's loop on a sample of heads spread over depth, same direction
    # (clean head output into the corrupted run) and the same metric.
    def metric(logits):
        last = logits[torch.arange(len(data)), data.end].float().gather(1, data.answers)
        return (last[:, 0] - last[:, 1]).mean()

    layers = torch.linspace(0, model.n_layers - 1, args.sample).round().long().tolist()
    sample = pd.DataFrame(
        {"layer": layers, "head_index": [i % model.bridge.cfg.n_heads for i in range(args.sample)]}
    )
    with torch.inference_mode():
        _, clean_cache = model.bridge.run_with_cache(data.tokens)
        start = time.perf_counter()
        theirs = tl_patching.generic_activation_patch(
            model.bridge, data.corrupted_tokens, clean_cache, metric,
            tl_patching.layer_head_vector_patch_setter, "z", index_df=sample,
        )  # fmt: skip
        naive_s = (time.perf_counter() - start) / args.sample * n_heads
    mine = torch.stack([ours[layer, head] for layer, head in sample.itertuples(index=False)])
    gap = float((session.logit_diffs["clean"] - session.logit_diffs["corrupted"]).mean())
    worst = float((mine - theirs.float()).abs().max()) / abs(gap)
    print(f"{'method':<44}{'seconds':>10}")
    print(f"{'madlens patch_head_out (all heads)':<44}{ours_s:>10.1f}")
    print(f"{'  + clean/corrupted caches, once':<44}{cache_s:>10.1f}")
    print(f"{'TransformerLens loop (estimate, 270 heads)':<44}{naive_s:>10.1f}")
    total = ours_s + cache_s
    verdict = "met" if total <= 300 else "not met"
    print(f"speed-up {naive_s / ours_s:.1f}x; target <= 300 s: {verdict} ({total:.0f} s)")
    print(f"largest difference on the sampled heads: {worst:.4f} of the clean-corrupted gap")


if __name__ == "__main__":
    main()
