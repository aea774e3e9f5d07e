"""Detector fit / score time and peak memory, side by side with pytorch-ood and pyod.

Each (implementation, detector) pair runs in a fresh worker process on the same arrays, so
that its peak resident memory is its own. Prints a table with the reference / madlens ratio
(>1 = madlens faster) and checks the targets of issue 3.

    .venv/bin/python benchmarks/detectors_speed.py            # 100,000 x 576 trusted, 10,000 test
    .venv/bin/python benchmarks/detectors_speed.py --n-trusted 20000 --only mahalanobis knn

References: pytorch-ood 0.4.0 (Mahalanobis, KNN, ViM, MaxSoftmax, MaxLogit, EnergyBased,
Entropy; imported without its torchvision-importing package __init__) and pyod (LOF, IForest).
"""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

# madlens detector -> (reference name, library) run side by side
REFERENCES = {
    "mahalanobis": ("Mahalanobis", "pytorch-ood"),
    "knn": ("KNN", "pytorch-ood"),
    "pca-residual": ("ViM", "pytorch-ood"),
    "lof": ("LOF", "pyod"),
    "isolation-forest": ("IForest", "pyod"),
    "msp": ("MaxSoftmax", "pytorch-ood"),
    "max-logit": ("MaxLogit", "pytorch-ood"),
    "energy": ("EnergyBased", "pytorch-ood"),
    "entropy": ("Entropy", "pytorch-ood"),
}
ACTIVATION = [
    "mahalanobis",
    "knn",
    "que",
    "spectral",
    "pca-residual",
    "lof",
    "isolation-forest",
    "defection-probe",
    "mass-mean-probe-skyline",
    "logistic-probe-skyline",
]
OUTPUT = ["msp", "max-logit", "energy", "entropy", "perplexity", "windowed-perplexity"]
LOF_TRUSTED = 10_000  # madlens LOF's default max_trusted; pyod's LOF gets the same rows
VOCAB = 49_152  # SmolLM2's vocabulary


# --- data ---------------------------------------------------------------------------------------


def make_data(folder, n_trusted, n_test, dim, n_logits, seed=0):
    """Activation-like float32 arrays (decaying spectrum, large offset) and output stats."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    mixing = (np.logspace(0, -2, dim)[:, None] * basis).astype(np.float32)
    offset = rng.normal(size=dim).astype(np.float32) * 3

    def draw(n):
        return rng.standard_normal((n, dim), dtype=np.float32) @ mixing + offset

    test = draw(n_test)
    test[n_test // 2 :] += 0.5 * basis[-1].astype(np.float32)  # anomalies: a rare direction
    np.save(folder / "trusted.npy", draw(n_trusted))
    np.save(folder / "test.npy", test)
    np.save(folder / "logits.npy", rng.normal(size=(n_logits, VOCAB)).astype(np.float32) * 2)
    lengths = rng.integers(20, 100, size=n_test)
    np.save(folder / "lengths.npy", lengths)
    np.save(folder / "token_logprobs.npy", -rng.exponential(size=int(lengths.sum())))


# --- workers ------------------------------------------------------------------------------------


def _pytorch_ood_detector():
    # pytorch_ood/__init__ imports torchvision (via pytorch_ood.model); register a bare package
    # so that only pytorch_ood.detector and what it needs (torch, sklearn) are imported.
    spec = importlib.util.find_spec("pytorch_ood")
    if spec is None:
        raise SystemExit("pytorch-ood missing: pip install --no-deps pytorch-ood==0.4.0")
    package = types.ModuleType("pytorch_ood")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["pytorch_ood"] = package
    import pytorch_ood.detector

    return pytorch_ood.detector


REPEAT = int(os.environ.get("MADLENS_BENCH_REPEAT", "1"))


def _timed(fn):
    """Run fn REPEAT times (--repeat); return its last output and the best time."""
    best = float("inf")
    for _ in range(REPEAT):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return out, best


def run_madlens(name, folder):
    import madlens.detectors as D

    cls = D.DETECTORS[name]
    if cls.input_kind == "outputs":
        logits = np.load(folder / "logits.npy")
        lengths = np.load(folder / "lengths.npy")
        seqs = np.split(np.load(folder / "token_logprobs.npy"), np.cumsum(lengths)[:-1])
        stats = D.OutputStats(logits=logits) if cls.needs == "logits" else None
        stats = stats or D.OutputStats(token_logprobs=seqs)
        baseline = _rss_mb()
        det = D.get_detector(name)
        _, fit_s = _timed(lambda: det.fit(stats))
        _, score_s = _timed(lambda: det.score(stats))
        return fit_s, score_s, baseline
    trusted, test = np.load(folder / "trusted.npy"), np.load(folder / "test.npy")
    inputs = {}
    if "labels" in cls.fit_requires():
        inputs["labels"] = (np.arange(len(test)) >= len(test) // 2).astype(int)
    if "contrast" in cls.fit_requires():
        inputs["contrast"] = D.ContrastPairs(positive=test[-8:], negative=test[:8])
    untrusted = test if (cls.uses_untrusted or "labels" in cls.fit_requires()) else None
    baseline = _rss_mb()
    det = D.get_detector(name)
    _, fit_s = _timed(lambda: det.fit(trusted, untrusted, **inputs))
    _, score_s = _timed(lambda: det.score(test))
    return fit_s, score_s, baseline


def run_reference(name, folder):
    import torch

    if name in ("msp", "max-logit", "energy", "entropy"):
        od = _pytorch_ood_detector()
        logits = torch.from_numpy(np.load(folder / "logits.npy"))
        baseline = _rss_mb()
        ref = {
            "msp": od.MaxSoftmax(None),
            "max-logit": od.MaxLogit(None),
            "energy": od.EnergyBased(None),
            "entropy": od.Entropy(None),
        }[name]
        with torch.no_grad():
            _, score_s = _timed(lambda: ref.predict_logits(logits))
        return 0.0, score_s, baseline

    trusted, test = np.load(folder / "trusted.npy"), np.load(folder / "test.npy")
    if name in ("lof", "isolation-forest"):
        from pyod.models.iforest import IForest
        from pyod.models.lof import LOF

        if name == "lof":  # the same rows madlens' LOF keeps (max_trusted, seed 0)
            if len(trusted) > LOF_TRUSTED:
                rows = np.random.default_rng(0).choice(len(trusted), LOF_TRUSTED, replace=False)
                trusted = np.ascontiguousarray(trusted[np.sort(rows)])
        baseline = _rss_mb()
        ref = LOF(n_neighbors=20) if name == "lof" else IForest(random_state=0)
        _, fit_s = _timed(lambda: ref.fit(trusted))
        _, score_s = _timed(lambda: ref.decision_function(test))
        return fit_s, score_s, baseline

    od = _pytorch_ood_detector()
    z, t = torch.from_numpy(trusted), torch.from_numpy(test)
    labels = torch.zeros(len(z), dtype=torch.long)
    baseline = _rss_mb()
    if name == "mahalanobis":
        ref = od.Mahalanobis(None)
    elif name == "knn":
        ref = od.KNN(None, k=50)
    else:  # pca-residual: ViM with a random bias-free head, principal subspace of 90% variance
        w = torch.randn(10, z.shape[1])
        ref = od.ViM(None, d=_components_for_90pct(trusted), w=w, b=torch.zeros(10))
    with torch.no_grad():
        _, fit_s = _timed(lambda: ref.fit_features(z, labels))
        _, score_s = _timed(lambda: ref.predict_features(t))
    return fit_s, score_s, baseline


def _components_for_90pct(x):
    import madlens.detectors as D

    return D.PCAResidual(n_components=0.9).fit(x[:20000]).n_components_


def _rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb():
    # VmHWM: this process's peak resident memory. (getrusage's ru_maxrss would carry over the
    # parent's peak across fork + exec.)
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def worker(impl, name, folder):
    run = run_madlens if impl == "madlens" else run_reference
    fit_s, score_s, baseline = run(name, Path(folder))
    print(
        json.dumps({"fit_s": fit_s, "score_s": score_s, "peak_mb": _peak_mb(), "base_mb": baseline})
    )


# --- driver -------------------------------------------------------------------------------------


def spawn(impl, name, folder, timeout, repeat):
    cmd = [sys.executable, __file__, "--worker", impl, name, str(folder)]
    env = {**os.environ, "MADLENS_BENCH_REPEAT": str(repeat)}
    try:
        out = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, check=True, env=env
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timeout {timeout}s"}
    except subprocess.CalledProcessError as exc:
        return {"error": exc.stderr.strip().splitlines()[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _fmt(x):
    return "-" if x is None else f"{x:8.3f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-trusted", type=int, default=100_000)
    parser.add_argument("--n-test", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=576)
    parser.add_argument("--n-logits", type=int, default=2_000, help="rows of 49,152 logits")
    parser.add_argument("--only", nargs="*", help="detector names to run")
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per worker")
    parser.add_argument("--repeat", type=int, default=1, help="best of N fits and scores")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return

    names = args.only or ACTIVATION + OUTPUT
    print(
        f"trusted {args.n_trusted:,} x {args.dim}, test {args.n_test:,} x {args.dim} float32; "
        f"logits {args.n_logits:,} x {VOCAB:,}; token log-probs for {args.n_test:,} texts; "
        f"{os.cpu_count()} CPUs"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_data(folder, args.n_trusted, args.n_test, args.dim, args.n_logits)
        header = (
            f"{'detector':24} {'fit s':>8} {'score s':>8} {'peak MB':>8} | {'reference':22}"
            f" {'fit s':>8} {'score s':>8} {'peak MB':>8} | {'fit x':>6} {'score x':>7}"
        )
        print(header)
        print("-" * len(header))
        for name in names:
            ours = spawn("madlens", name, folder, args.timeout, args.repeat)
            ref_name, theirs = None, None
            if name in REFERENCES and not args.no_reference:
                ref_name = "{} ({})".format(*REFERENCES[name])
                theirs = spawn("reference", name, folder, args.timeout, args.repeat)
            rows.append({"detector": name, "madlens": ours, "reference": ref_name, "ref": theirs})
            print(_row(name, ours, ref_name, theirs), flush=True)
    _check_targets(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


def _row(name, ours, ref_name, theirs):
    def cells(r):
        if r is None:
            return f"{'':8} {'':8} {'':8}"
        if "error" in r:
            return f"{r['error'][:26]:26}"
        return f"{_fmt(r['fit_s'])} {_fmt(r['score_s'])} {r['peak_mb']:8.0f}"

    ratio = ""
    if theirs and "error" not in theirs and "error" not in ours:
        fit_x = theirs["fit_s"] / ours["fit_s"] if theirs["fit_s"] > 0 else None
        score_x = theirs["score_s"] / ours["score_s"]
        ratio = f"{'-' if fit_x is None else f'{fit_x:6.2f}':>6} {score_x:7.2f}"
    return f"{name:24} {cells(ours)} | {ref_name or '':22} {cells(theirs)} | {ratio}"


def _check_targets(rows):
    by_name = {r["detector"]: r for r in rows}
    checks = []
    if "mahalanobis" in by_name and "error" not in by_name["mahalanobis"]["madlens"]:
        m = by_name["mahalanobis"]["madlens"]
        checks += [("mahalanobis fit <= 3 s", m["fit_s"] <= 3), ("score <= 1 s", m["score_s"] <= 1)]
    if "knn" in by_name and "error" not in by_name["knn"]["madlens"]:
        checks.append(("knn score <= 10 s", by_name["knn"]["madlens"]["score_s"] <= 10))
    peaks = [r["madlens"]["peak_mb"] for r in rows if "error" not in r["madlens"]]
    if peaks:
        checks.append((f"peak memory <= 3 GB (max {max(peaks):.0f} MB)", max(peaks) <= 3072))
    slower = [
        r["detector"]
        for r in rows
        if r["ref"]
        and "error" not in r["ref"]
        and "error" not in r["madlens"]
        and r["madlens"]["fit_s"] + r["madlens"]["score_s"]
        > r["ref"]["fit_s"] + r["ref"]["score_s"]
    ]
    which = f": {', '.join(slower)}" if slower else ""
    checks.append((f"none slower than its reference (fit + score){which}", not slower))
    print()
    for text, ok in checks:
        print(f"{'PASS' if ok else 'MISS'}  {text}")


if __name__ == "__main__":
    main()
