"""Fixtures of the `madlens serve` tests (helpers: serve_support.py)."""

import pytest
from serve_support import KEYS, ServerProcess, build_sharp_model, running, trusted_prompts


@pytest.fixture(scope="session")
def serve_home_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("madlens_home")


@pytest.fixture(scope="module", autouse=True)
def serve_home(serve_home_dir):
    """A fresh MADLENS_HOME (activation cache) for these tests and their servers, set for
    each module of this folder and restored after it: the test modules that run later
    (the real-model integration tests) keep the warm cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MADLENS_HOME", str(serve_home_dir))
        yield serve_home_dir


@pytest.fixture(scope="session")
def sharp_dir(tmp_path_factory):
    return build_sharp_model(tmp_path_factory.mktemp("sharp") / "model")


@pytest.fixture(scope="session")
def monitor_dir(sharp_dir, tmp_path_factory):
    """A fitted mahalanobis monitor on layers 0 and 1, calibrated at fpr 0.05."""
    from madlens.monitor import Monitor

    monitor = Monitor(str(sharp_dir), hooks=[0, 1], detectors=["mahalanobis"], progress=False)
    monitor.fit(trusted_prompts()).calibrate(fpr=0.05)
    return monitor.save(tmp_path_factory.mktemp("monitor") / "monitor")


@pytest.fixture(scope="session")
def mean_monitor_dir(sharp_dir, tmp_path_factory):
    """A monitor that reads the answer (position `mean`), fitted on short transcripts."""
    from madlens.monitor import Monitor

    answers = ["Yes.", "No, I do not think so.", "It depends on the day.", "About ten."]
    transcripts = [
        [*p, {"role": "assistant", "content": answers[i % 4]}]
        for i, p in enumerate(trusted_prompts(120))
    ]
    monitor = Monitor(
        str(sharp_dir), hooks=[1], position="mean", detectors=["mahalanobis"], progress=False
    )
    monitor.fit(transcripts).calibrate(fpr=0.1)
    return monitor.save(tmp_path_factory.mktemp("mean") / "monitor")


@pytest.fixture(scope="session")
def ref_monitor(monitor_dir):
    """The saved monitor loaded on its own: the reference for every score."""
    from madlens.monitor import Monitor

    return Monitor.load(monitor_dir, progress=False)


@pytest.fixture(scope="session")
def ref_hf(sharp_dir):
    """The model dir read by plain transformers: (model, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(sharp_dir, attn_implementation="eager").eval()
    return model, AutoTokenizer.from_pretrained(sharp_dir)


@pytest.fixture(scope="session")
def key_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "keys.txt"
    path.write_text("# API keys\n" + "".join(f"{k}:{v}\n" for k, v in KEYS.items()))
    return path


@pytest.fixture(scope="session")
def servers(monitor_dir, key_file, tmp_path_factory):
    """The subprocess servers of this session, started together (each takes ~10 s to
    import torch and load): `kill` (for SIGKILL) and `term` (a long batch window, for
    SIGTERM)."""
    root = tmp_path_factory.mktemp("servers")
    specs = {
        "kill": [
            "--max-batch",
            "8",
            "--batch-wait-ms",
            "10",
            "--max-tokens",
            "24",
            "--api-key-file",
            str(key_file),
        ],
        "term": ["--batch-wait-ms", "1000"],
    }
    started = {}
    try:
        for name, extra in specs.items():
            audit = root / f"{name}.db"
            args = ["--monitor", str(monitor_dir), "--audit-db", str(audit), *extra]
            started[name] = ServerProcess(args, root / f"{name}.log", audit)
        yield started
    finally:
        for server in started.values():
            server.close()


@pytest.fixture(scope="session")
def main_server(monitor_dir, key_file, tmp_path_factory):
    """The monitor served in this process by uvicorn: API keys, --log-text, a 20 ms batch
    window."""
    from madlens.monitor import Monitor
    from madlens.serve.app import ServeOptions, create_app
    from madlens.serve.auth import load_keys

    audit = tmp_path_factory.mktemp("main") / "audit.db"
    options = ServeOptions(
        keys=load_keys(key_file), audit_db=audit, log_text=True, batch_wait_ms=20
    )
    app = create_app(Monitor.load(monitor_dir, progress=False), options)
    with running(app, audit) as server:
        yield server
