"""The Ray engine (`madlens.scale`, `--engine ray`) against the local engine: the same
activations (float32, to 1e-6) in the same cache entries, which a local run then reads
without computing anything; the same monitor verdicts in the same order; the same files
from the CLI; one line for a bad engine, a missing Ray or an address where no cluster is.

One local Ray cluster (2 CPUs, so a pool of 2 worker processes) serves the module; each
test that runs Ray work pays for its pool's start (the workers import torch and load
tiny-test), so there are three of them.
"""

import ast
import json
import random
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from madlens import Monitor
from madlens.activations import capture
from madlens.activations import extract as local_extract
from madlens.bench.runner import run_task
from madlens.data import write_jsonl
from madlens.data.generators import english_questions
from madlens.tasks import load_task_file

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
SRC = Path(__file__).resolve().parents[1] / "src" / "madlens"


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster with 2 CPUs (one actor per CPU: 2 worker processes)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}})  # fmt: skip
    yield ray
    ray.shutdown()


def one_line(code, err):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _fail(*args, **kwargs):
    """Stands in for the local engine's computation in this process (Ray's workers are other
    processes): what runs under it reads only what the cache already holds."""
    raise AssertionError("the local engine computed activations")


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- bad input: one line, exit 2, before any work ----------------------------------------------


def test_bad_engine_options_are_one_line(tmp_path, run_cli, monkeypatch):
    data = write_jsonl(tmp_path / "in.jsonl", [{"text": "hello"}])
    base = ["extract", "--model", "tiny-test", "--data", str(data), "--out", str(tmp_path / "o")]
    line = one_line(*run_cli(*base, "--engine", "nonsense")[::2])
    assert "unknown engine 'nonsense'" in line and "local, ray" in line
    line = one_line(*run_cli(*base, "--ray-address", "127.0.0.1:6379")[::2])
    assert "--ray-address needs --engine ray" in line
    line = one_line(*run_cli(*base, "--engine", "ray", "--ray-address", "not an address")[::2])
    assert "is not host:port" in line
    line = one_line(*run_cli(*base, "--engine", "ray", "--no-cache")[::2])
    assert "drop --no-cache" in line
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    for args in (base, ["monitor", "score", "--monitor", str(tmp_path), "--data", str(data),
                        "--out", str(tmp_path / "s.jsonl")]):  # fmt: skip
        line = one_line(*run_cli(*args, "--engine", "ray")[::2])
        assert "pip install 'madlens[ray]'" in line
    assert not (tmp_path / "o").exists() and not (tmp_path / "s.jsonl").exists()


def test_an_address_where_no_cluster_answers_fails_fast(tmp_path, run_cli):
    data = write_jsonl(tmp_path / "in.jsonl", [{"text": "hello"}])
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    for args in (["extract", "--model", "tiny-test", "--data", str(data), "--out",
                  str(tmp_path / "o")],
                 ["monitor", "score", "--monitor", str(tmp_path), "--data", str(data),
                  "--out", str(tmp_path / "s.jsonl")]):  # fmt: skip
        start = time.perf_counter()
        line = one_line(*run_cli(*args, "--engine", "ray", "--ray-address", address)[::2])
        assert time.perf_counter() - start < 30
        assert f"no Ray cluster answers at {address}" in line and "ray start --head" in line


def test_ray_is_imported_only_inside_the_scale_unit_and_lazily():
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        in_scale = path.parent.name == "scale"
        top_level = set(map(id, tree.body))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            if any(name == "ray" or name.startswith("ray.") for name in names):
                assert in_scale, f"{path.relative_to(SRC)} imports ray"
                assert id(node) not in top_level, f"{path.relative_to(SRC)} imports ray eagerly"


# --- extraction --------------------------------------------------------------------------------


def test_cli_extract_on_ray_fills_the_cache_a_local_run_reads(
    cluster, tiny, tmp_path, run_cli, monkeypatch
):
    monkeypatch.setenv("MADLENS_HOME", str(tmp_path / "home"))
    rng = random.Random(0)
    texts = [" ".join(rng.choices(["the", "weather", "is", "fine", "today", "a", "cat"],
                                  k=rng.randint(2, 12))) for _ in range(560)]  # fmt: skip
    chats = [[{"role": "user", "content": f"Question {i}?"},
              {"role": "assistant", "content": f"Answer {i}."}] for i in range(40)]  # fmt: skip
    inputs = texts + chats  # 600 inputs: two shards of the cache per position
    data = write_jsonl(tmp_path / "in.jsonl",
                       [{"text": t} for t in texts] + [{"messages": c} for c in chats])  # fmt: skip
    args = ["extract", "--model", "tiny-test", "--data", str(data), "--hooks", "0,1",
            "--positions", "last,all", "--logits", "--logprobs", "--dtype", "float32",
            "--device", "cpu"]  # fmt: skip
    code, out, err = run_cli(*args, "--out", str(tmp_path / "ray"), "--engine", "ray")
    assert code == 0, err
    assert "Traceback" not in err and "core_worker" not in err and "INFO" not in err

    # the entries a local run looks for, filled whole
    assert str(tiny.dtype) == "torch.float32" and tiny.device.type == "cpu"
    entries = {p: capture.cache_entry(tiny, inputs, p) for p in ("last", "all")}
    folder = tmp_path / "home" / "activations"
    assert sorted(p.name for p in folder.iterdir()) == sorted(e.root.name for e in entries.values())
    for entry in entries.values():
        names = capture.entry_names(HOOKS, logits=True, logprobs=True)
        assert all(entry.has(name) and len(entry.shards(name)) == 2 for name in names)
        assert not [p for p in entry.root.iterdir() if ".partial-" in p.name]

    # a local run computes nothing and writes the same files
    with monkeypatch.context() as patch:
        patch.setattr(capture, "_compute_chunk", _fail)
        code, out, err = run_cli(*args, "--out", str(tmp_path / "local"))
    assert code == 0, err
    ray_files = sorted(p.relative_to(tmp_path / "ray") for p in (tmp_path / "ray").rglob("*"))
    assert ray_files == sorted(
        p.relative_to(tmp_path / "local") for p in (tmp_path / "local").rglob("*")
    )
    for rel in ray_files:
        if rel.suffix == ".safetensors":
            assert (tmp_path / "ray" / rel).read_bytes() == (tmp_path / "local" / rel).read_bytes()

    # and what Ray computed is what the local engine computes (without the cache)
    for position in ("last", "all"):
        expected = local_extract(tiny, inputs, HOOKS, position, logits=True, logprobs=True,
                                 cache=False, progress=False)  # fmt: skip
        for hook in HOOKS:
            saved = load_file(str(tmp_path / "ray" / position / f"{hook}.safetensors"))
            assert saved["acts"].dtype == np.float32
            np.testing.assert_allclose(saved["acts"], expected[hook], rtol=0, atol=1e-6)
            assert saved["lengths"].tolist() == expected.lengths.tolist()
        outputs = load_file(str(tmp_path / "ray" / position / "outputs.safetensors"))
        np.testing.assert_allclose(outputs["logits"], expected.logits, rtol=0, atol=1e-6)
        np.testing.assert_allclose(outputs["token_logprobs"],
                                   np.concatenate(expected.token_logprobs), rtol=0,
                                   atol=1e-6)  # fmt: skip


# --- batch scoring -----------------------------------------------------------------------------


def test_cli_monitor_score_on_ray_writes_the_local_verdicts_in_order(
    cluster, tiny, tmp_path, run_cli
):
    questions = english_questions(360, seed=5)
    random.Random(1).shuffle(questions)
    prompts = [[{"role": "user", "content": q}] for q in questions]
    monitor = Monitor(tiny, hooks=HOOKS, detectors=["mahalanobis", "knn"], holdout=0.5,
                      progress=False)  # fmt: skip
    monitor.fit(prompts[:200]).calibrate(0.05).save(tmp_path / "mon")
    noise = "".join(random.Random(0).choices("#@!%&*~^", k=60))
    new = prompts[200:350] + [noise]  # 151 inputs: three batches of 64 over two workers
    lines = [{"id": f"q{i}", "messages": m} for i, m in enumerate(prompts[200:350])]
    data = write_jsonl(tmp_path / "new.jsonl", lines + [{"id": "noise", "text": noise}])
    args = ["monitor", "score", "--monitor", str(tmp_path / "mon"), "--data", str(data),
            "--device", "cpu"]  # fmt: skip
    code, out, err = run_cli(*args, "--out", str(tmp_path / "ray.jsonl"), "--engine", "ray")
    assert code == 0, err
    assert "Traceback" not in err and "core_worker" not in err and "INFO" not in err
    code, _, err = run_cli(*args, "--out", str(tmp_path / "local.jsonl"))
    assert code == 0, err
    ray_rows = [json.loads(x) for x in (tmp_path / "ray.jsonl").read_text().splitlines()]
    local_rows = [json.loads(x) for x in (tmp_path / "local.jsonl").read_text().splitlines()]
    reference = Monitor.load(tmp_path / "mon", progress=False).score(new, cache=False).rows()
    assert [r["line"] for r in ray_rows] == list(range(1, 152))
    assert [r["id"] for r in ray_rows] == [f"q{i}" for i in range(150)] + ["noise"]
    assert len(ray_rows) == len(local_rows) == len(reference) == 151
    for got, local, expected in zip(ray_rows, local_rows, reference):
        for row in (local, expected):
            assert set(got) - {"line", "id"} == set(row) - {"line", "id"}
            for key in ("scores", "p_values"):
                assert got[key].keys() == row[key].keys()
                for name, value in got[key].items():
                    assert value == pytest.approx(row[key][name], rel=1e-6, abs=1e-6)
            assert got["p_value"] == pytest.approx(row["p_value"], rel=1e-6, abs=1e-6)
            assert (got["flagged"], got["top_hook"]) == (row["flagged"], row["top_hook"])
            assert got["thresholds"] == pytest.approx(row["thresholds"], rel=1e-6)
    assert ray_rows[-1]["flagged"] is True


# --- the bench ---------------------------------------------------------------------------------


def test_bench_on_ray_reads_every_feature_from_what_ray_cached(
    cluster, weather_task_file, tmp_path, monkeypatch
):
    task = load_task_file(weather_task_file, "tiny-test")
    kwargs = {"hooks": HOOKS, "n_resamples": 50, "progress": False, "dtype": "float32",
              "device": "cpu"}  # fmt: skip
    monkeypatch.setenv("MADLENS_HOME", str(tmp_path / "local"))
    local = run_task(task, ["mahalanobis", "knn"], **kwargs)
    monkeypatch.setenv("MADLENS_HOME", str(tmp_path / "ray"))
    with monkeypatch.context() as patch:
        patch.setattr(capture, "_compute_chunk", _fail)
        on_ray = run_task(task, ["mahalanobis", "knn"], engine="ray", **kwargs)
    assert len(list((tmp_path / "ray" / "activations").iterdir())) == 2  # trusted, test
    assert [(r["detector"], r["hook"]) for r in on_ray.rows] == [
        (r["detector"], r["hook"]) for r in local.rows
    ]
    for got, expected in zip(on_ray.rows, local.rows):
        assert got["status"] == expected["status"] == "ok"
        assert got["auroc"] == pytest.approx(expected["auroc"], abs=1e-9)
    for key, scores in local.scores.items():
        np.testing.assert_allclose(on_ray.scores[key], scores, rtol=1e-6, atol=1e-6)
