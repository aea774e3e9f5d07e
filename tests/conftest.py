import sys

import numpy as np
import pytest

from madlens.models import load_model


@pytest.fixture(scope="session", autouse=True)
def _run_registry(tmp_path_factory):
    """Runs the tests record go to a throwaway registry, never the developer's own (the
    activation cache under MADLENS_HOME stays where it is, warm)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MADLENS_RUNS_DB", str(tmp_path_factory.mktemp("runs") / "runs.duckdb"))
        patch.delenv("MADLENS_NO_RUNS", raising=False)
        yield


@pytest.fixture(scope="session")
def tiny():
    return load_model("tiny-test")


@pytest.fixture(scope="session")
def smol():
    """The real SmolLM2-135M-Instruct in float32 (converted once into MADLENS_HOME)."""
    return load_model("smollm2-135m-instruct", dtype="float32")


@pytest.fixture(scope="session")
def tiny_hf():
    """An independent, unwrapped copy of tiny-test's HF module (same seed, same weights):
    the bridge wraps the modules of the model it boots, so references use this copy."""
    from madlens.models.tiny import tiny_model

    return tiny_model()


@pytest.fixture
def run_cli(monkeypatch, capsys):
    """Run `madlens ARGS...` in-process; returns (exit code, stdout, stderr)."""
    from madlens.cli import main

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["madlens", *args])
        code = 0
        try:
            main()
        except SystemExit as exc:
            code = exc.code or 0
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


@pytest.fixture(scope="session")
def weather_task_file(tmp_path_factory):
    """A custom task file: 40 trusted sentences; test: 12 like them (0), 12 symbol strings (1)."""
    from madlens.data import write_jsonl

    rng = np.random.default_rng(0)
    lines = [{"text": f"The weather today is nice, number {i}.", "split": "trusted"}
             for i in range(40)]  # fmt: skip
    lines += [{"text": f"The weather later is fine, number {i}.", "split": "test", "label": 0}
              for i in range(12)]  # fmt: skip
    lines += [{"text": "".join(rng.choice(list("#@!%&*")) for _ in range(30)), "split": "test",
               "label": 1} for _ in range(12)]  # fmt: skip
    return write_jsonl(tmp_path_factory.mktemp("task") / "weather.jsonl", lines)
