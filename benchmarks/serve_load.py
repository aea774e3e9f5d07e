"""`madlens serve` under load: closed-loop clients on loopback at 1, 4 and 16 concurrent
requests, the monitor on against the same server with the monitor off (`--no-monitor`, the
hidden baseline option: same model, same engine, nothing scored or hooked), side by side in
one run: p50 / p99 latency and requests/s of a 32-token chat completion, the overhead ratio,
and what `/v1/monitor/score` adds to a bare prefill forward pass.

    .venv/bin/python benchmarks/serve_load.py [--model tiny-test | --monitor DIR]
        [--concurrency 1,4,16] [--requests 48] [--seconds 30] [--max-tokens 32]

Without --monitor, a mahalanobis monitor is fitted on --model (default tiny-test) and
calibrated in a temporary folder. Both servers run as subprocesses (`madlens serve`) while
the clients run here; each phase is bounded by --requests and --seconds.
"""

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

from madlens.data import format_chat
from madlens.data.generators import english_questions
from madlens.monitor import Monitor


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(monitor_dir, audit, extra, log):
    port = free_port()
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    proc = subprocess.Popen(
        [sys.executable, "-c", "from madlens.cli import main; main()", "serve",
         "--monitor", str(monitor_dir), "--port", str(port), "--audit-db", str(audit),
         "--log-level", "warning", *extra],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}; see {log.name}")
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    raise SystemExit("server did not start")


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def closed_loop(url, bodies, path, concurrency, n_requests, seconds):
    """`concurrency` clients, each sending its next request when the last one answered,
    until `n_requests` answers or `seconds` pass. Returns (latencies s, wall s, tokens)."""
    latencies, tokens = [], []
    lock = threading.Lock()
    issued = iter(range(n_requests))
    deadline = time.monotonic() + seconds

    def client(k):
        with httpx.Client(base_url=url, timeout=300) as http:
            while time.monotonic() < deadline:
                with lock:
                    i = next(issued, None)
                if i is None:
                    return
                start = time.perf_counter()
                response = http.post(path, json=bodies[(i + k) % len(bodies)])
                elapsed = time.perf_counter() - start
                response.raise_for_status()
                with lock:
                    latencies.append(elapsed)
                    usage = response.json().get("usage", {})
                    tokens.append(usage.get("completion_tokens", 0))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, time.perf_counter() - start, tokens


def fit_monitor(model, folder):
    questions = english_questions(200, seed=0)
    random.Random(0).shuffle(questions)
    monitor = Monitor(model, detectors=["mahalanobis"], progress=False)
    monitor.fit([[{"role": "user", "content": q}] for q in questions]).calibrate(fpr=0.05)
    return monitor.save(Path(folder) / "monitor")


def bare_prefill_ms(monitor_dir, messages, repeats):
    """The median time of one plain Hugging Face forward pass over a prompt (batch 1)."""
    monitor = Monitor.load(monitor_dir, progress=False)
    model = monitor.model
    ids = model.tokenizer(format_chat(model.tokenizer, messages), return_tensors="pt")
    times = []
    with torch.inference_mode():
        model.hf_model(**ids)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            model.hf_model(**ids, use_cache=True)
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny-test")
    parser.add_argument("--monitor", type=Path, help="a saved monitor (default: fit one)")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--requests", type=int, default=48, help="answers per phase, at most")
    parser.add_argument("--seconds", type=float, default=30, help="time per phase, at most")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    work = Path(tempfile.mkdtemp(prefix="serve_load_"))
    monitor_dir = args.monitor or fit_monitor(args.model, work)
    questions = english_questions(40, seed=9)
    chats = [{"messages": [{"role": "user", "content": q}], "max_tokens": args.max_tokens,
              "temperature": 0} for q in questions]  # fmt: skip
    scores = [{"messages": c["messages"]} for c in chats]
    log = (work / "servers.log").open("wb")
    servers = {}
    try:
        servers["on"] = start_server(monitor_dir, work / "on.db", [], log)
        servers["off"] = start_server(monitor_dir, work / "off.db", ["--no-monitor"], log)
        for _, url in servers.values():  # warm-up
            closed_loop(url, chats, "/v1/chat/completions", 2, 4, 60)
        print(f"model {Monitor.load(monitor_dir, progress=False).model_spec}, "
              f"{args.max_tokens}-token completions, greedy; torch threads "
              f"{torch.get_num_threads()}")  # fmt: skip
        print(f"{'clients':>7} {'monitor':>7} {'answers':>7} {'req/s':>7} {'tok/s':>7} "
              f"{'p50 ms':>8} {'p99 ms':>8}")  # fmt: skip
        summary = {}
        for c in levels:
            for mode in ("on", "off"):  # side by side at each level
                _, url = servers[mode]
                lat, wall, tokens = closed_loop(url, chats, "/v1/chat/completions", c,
                                                args.requests, args.seconds)  # fmt: skip
                p50, p99 = 1000 * percentile(lat, 0.5), 1000 * percentile(lat, 0.99)
                rate = len(lat) / wall
                summary[(c, mode)] = (p50, rate)
                print(f"{c:>7} {mode:>7} {len(lat):>7} {rate:>7.2f} {sum(tokens) / wall:>7.0f} "
                      f"{p50:>8.1f} {p99:>8.1f}")  # fmt: skip
        print()
        for c in levels:
            (p50_on, rate_on), (p50_off, rate_off) = summary[(c, "on")], summary[(c, "off")]
            print(f"overhead at {c:>2} client(s): p50 x{p50_on / p50_off:.2f}, "
                  f"throughput x{rate_on / rate_off:.2f} (monitor on / off)")  # fmt: skip
        _, url = servers["on"]
        lat, _, _ = closed_loop(url, scores, "/v1/monitor/score", 1, args.requests, args.seconds)
        score_ms = 1000 * statistics.median(lat)
        bare = bare_prefill_ms(monitor_dir, chats[0]["messages"], 20)
        print(f"/v1/monitor/score p50 {score_ms:.1f} ms over HTTP; a bare prefill forward "
              f"{bare:.1f} ms; added {score_ms - bare:.1f} ms")  # fmt: skip
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=60)
        log.close()


if __name__ == "__main__":
    main()
