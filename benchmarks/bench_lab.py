"""`madlens lab NAME --quick`, cold and warm: wall seconds, CPU seconds and the load average
for each experiment, each in its own process and its own fresh MADLENS_HOME (cold: the model
is converted, every fine-tune, generation and activation pass runs), then again in the same
home (warm: read from the cache). Issues 15 and 16 ask for each `--quick` budget to run in
at most 10 minutes on a quiet 2-core machine.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_lab.py
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_lab.py steer graft --no-warm
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_lab.py edit --full --no-warm

`--full` runs the full budget instead (no `--quick`), cold in the same way; the issues ask
only for its time to be stated, so the 10-minute column reads "full budget".

CPU seconds are the child's user + system time (all its threads). On a machine shared with
other jobs the wall time is inflated and CPU time is the better guide; the load average
(mean of before and after) says how shared the machine was. Not a timed test: a benchmark
to run by hand, the figures go to docs/lab.md with this command. Each run's lab.json and
lab.html are kept under `--results` (default runs/bench-lab/NAME-BUDGET-PHASE).
"""

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUDGET_S = 600  # the issues' --quick budget: 10 minutes


def run_one(name: str, home: Path, out: Path, model: str | None, full: bool = False) -> dict:
    """One `madlens lab NAME [--quick]` in a child process with MADLENS_HOME=`home`."""
    env = os.environ | {"MADLENS_HOME": str(home), "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, "-m", "madlens", "lab", name, "--out", str(out)]
    cmd += [] if full else ["--quick"]
    cmd += ["--model", model] if model else []
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    row = {"experiment": name, "wall_s": wall, "cpu_s": cpu, "full": full,
           "load": (load + os.getloadavg()[0]) / 2, "rc": done.returncode}  # fmt: skip
    if done.returncode != 0:
        row["error"] = (done.stderr.strip().splitlines() or ["failed"])[-1]
    return row


def table(rows: list[dict]) -> str:
    """One line per run, and whether each cold run met the budget."""
    head = f"{'phase':<6}{'experiment':<20}{'wall s':>9}{'CPU s':>9}{'load':>7}  within 10 min"
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            ok = "error: " + r["error"]
        elif r.get("full"):
            ok = "full budget"
        elif r["wall_s"] <= BUDGET_S:
            ok = "yes"
        else:
            ok = f"no (CPU {'<=' if r['cpu_s'] <= BUDGET_S else '>'} 600 s)"
        lines.append(f"{r['phase']:<6}{r['experiment']:<20}{r['wall_s']:>9.1f}{r['cpu_s']:>9.1f}"
                     f"{r['load']:>7.1f}  {ok}")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("experiments", nargs="*", help="default: every registered experiment")
    parser.add_argument("--model", default=None, help="default: the lab's default model")
    parser.add_argument("--no-warm", action="store_true", help="skip the warm rerun")
    parser.add_argument("--keep", action="store_true", help="keep the temporary homes")
    parser.add_argument("--results", default="runs/bench-lab",
                        help="each run's lab.json and lab.html are copied to RESULTS/NAME-PHASE "
                             "(the temporary home is removed unless --keep)")  # fmt: skip
    parser.add_argument("--full", action="store_true", help="the full budget, not --quick")
    args = parser.parse_args()
    if args.experiments:
        names = args.experiments
    else:
        from madlens.lab import EXPERIMENTS

        names = list(EXPERIMENTS)
    rows = []
    for name in names:
        home = Path(tempfile.mkdtemp(prefix=f"madlens-lab-{name}-"))
        for phase in ("cold",) if args.no_warm else ("cold", "warm"):
            row = {"phase": phase} | run_one(name, home, home / "out", args.model, args.full)
            kept = Path(args.results) / f"{name}-{'full' if args.full else 'quick'}-{phase}"
            if (home / "out").is_dir():
                shutil.copytree(home / "out", kept, dirs_exist_ok=True)
                row["results"] = str(kept)
            rows.append(row)
            print(table([row]).splitlines()[-1], flush=True)
        if not args.keep:
            shutil.rmtree(home, ignore_errors=True)
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
