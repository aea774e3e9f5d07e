import sys

import pytest

from madlens.models import load_model


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
