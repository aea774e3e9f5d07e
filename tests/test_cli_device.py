"""`--device` on every command that runs a model: `--device cpu` runs (tiny-test), and a
device this machine lacks (`cuda` here: CUDA is switched off for the test whatever the
machine has) or an unknown name (`nonsense`) is one error line and exit code 2, before any
work."""

import json

import numpy as np
import pytest
import torch
from cli_inputs import silence_progress, write_sae

from madlens.data import write_jsonl
from madlens.models import devices


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Inputs for every command: data, a corpus, a saved SAE, a fitted monitor's folder."""
    root = tmp_path_factory.mktemp("device-cli")
    texts = [f"A sentence about the weather, number {i}." for i in range(24)]
    write_jsonl(root / "data.jsonl", [{"text": t} for t in texts])
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "(x)", "return 3", "def f():"]
    (root / "corpus.txt").write_text(
        "\n\n".join(" ".join(rng.choice(words, 10)) for _ in range(60))
    )
    write_sae(root / "sae", 64)
    return root


@pytest.fixture(autouse=True)
def quiet(monkeypatch, tmp_path_factory):
    """Caches in a scratch home; no progress bars (the tests count the lines on stderr)."""
    monkeypatch.setenv("MADLENS_HOME", str(tmp_path_factory.mktemp("home")))
    silence_progress(monkeypatch)


def commands(root, out) -> dict[str, list[str]]:
    """Each model-running command with small, valid arguments on tiny-test."""
    data, corpus, sae = str(root / "data.jsonl"), str(root / "corpus.txt"), str(root / "sae")
    return {
        "extract": ["extract", "--data", data, "--out", str(out), "--model", "tiny-test",
                    "--no-cache"],
        "bench": ["bench", "--task-file", str(root / "task.jsonl"), "--detectors", "mahalanobis",
                  "--quick", "--model", "tiny-test", "--out", str(out)],
        "sae train": ["sae", "train", "--hook", "1", "--out", str(out), "--model", "tiny-test",
                      "--corpus", corpus, "--tokens", "256", "--context-size", "16",
                      "--expansion", "1", "--k", "4", "--batch-size", "64"],
        "sae dashboard": ["sae", "dashboard", "--sae", sae, "--out", str(out / "d.html"),
                          "--corpus", corpus, "--tokens", "64"],
        "explain": ["explain", "--sae", sae, "--text", "alpha beta gamma"],
        "circuits ioi": ["circuits", "ioi", "--out", str(out), "--model", "tiny-test",
                         "--n-prompts", "2", "--no-cache"],
        "truth sweep": ["truth", "sweep", "--out", str(out), "--datasets", "cities", "--n", "4",
                        "--model", "tiny-test"],
        "monitor fit": ["monitor", "fit", "--trusted", data, "--out", str(out / "mon"),
                        "--model", "tiny-test", "--hooks", "1", "--holdout", "0.5",
                        "--fpr", "0.2"],
        "monitor score": ["monitor", "score", "--monitor", str(root / "mon"), "--data", data,
                          "--out", str(out / "scores.jsonl")],
    }  # fmt: skip


NAMES = ["extract", "bench", "sae train", "sae dashboard", "explain", "circuits ioi",
         "truth sweep", "monitor fit", "monitor score"]  # fmt: skip


def test_the_list_is_every_command_that_runs_a_model(tmp_path):
    assert list(commands(tmp_path, tmp_path)) == NAMES


@pytest.fixture(scope="module")
def ready(files, weather_task_file, tmp_path_factory):
    """The inputs made by madlens itself: the custom task, a fitted monitor."""
    from madlens.monitor import Monitor

    (files / "task.jsonl").write_text(weather_task_file.read_text())
    texts = [f"A sentence about the weather, number {i}." for i in range(24)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MADLENS_HOME", str(tmp_path_factory.mktemp("home")))
        monitor = Monitor("tiny-test", hooks=[1], holdout=0.5, dtype="float32", progress=False)
        monitor.fit(texts).calibrate(0.2).save(files / "mon")
    return files


@pytest.mark.parametrize("name", NAMES)
def test_every_model_command_runs_with_device_cpu(ready, tmp_path, run_cli, name):
    code, out, err = run_cli(*commands(ready, tmp_path)[name], "--device", "cpu")
    assert code == 0, err
    if name == "extract":
        manifest = json.loads((tmp_path / "manifest.json").read_text())
        assert manifest["device"] == "cpu" and manifest["dtype"] in ("float32", "bfloat16")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "device, message",
    [("cuda", "device 'cuda': CUDA is not available"), ("cuda:0", "CUDA is not available"),
     ("nonsense", "unknown device 'nonsense'; choose one of auto, cpu, cuda, cuda:N, mps"),
     ("mps", "MPS backend is not available")],
)  # fmt: skip
def test_every_model_command_refuses_a_device_it_cannot_use(
    ready, tmp_path, run_cli, monkeypatch, name, device, message
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "_mps_available", lambda: False)
    code, out, err = run_cli(*commands(ready, tmp_path / "out")[name], "--device", device)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: Invalid value for '--device'") and message in lines[0]
    assert not (tmp_path / "out").exists()  # refused before any work


@pytest.mark.parametrize("device", ["cuda", "nonsense"])
def test_serve_refuses_a_device_it_cannot_use(ready, run_cli, monkeypatch, device):
    """`madlens serve` takes --device too (a server is not started here: the option is
    refused while the command line is parsed, before the monitor or the port is touched)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, out, err = run_cli("serve", "--monitor", str(ready / "mon"), "--device", device)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "--device" in lines[0], err
