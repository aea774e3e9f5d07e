"""Every `madlens` command, fed random option values and random-bytes input files on the
`tiny-test` model, either works (exit 0) or says why in one line on stderr (exit 2); it
never shows a traceback.

Each command gets a small, derandomised budget of examples (the whole file runs in about a
minute on two cores); progress bars are switched off, since they are not messages.
Knobs that only make a valid run longer (tokens, prompts, statements) are kept small.
"""

import contextlib
import io
import json
import shutil
import tempfile
import traceback
from pathlib import Path

import numpy as np
import pytest
from cli_inputs import no_template_model, silence_progress, write_sae
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from madlens.cli import main
from madlens.detectors import DETECTORS

HOOKS = [
    "0", "1", "-1", "2", "-3", "all-resid", "blocks.0.hook_resid_post", "blocks.1.hook_mlp_out",
    "blocks.0.attn.hook_z", "blocks.1.attn.hook_pattern", "blocks.0.attn.hook_attn_scores",
    "blocks.0.attn.hook_cos", "rotary_emb.hook_sin", "blocks.0.hook_attn_in", "hook_pos_embed",
    "embed.hook_in", "hook_embed", "blocks.1.mlp.hook_post", "blocks.0.ln1.hook_scale",
    "hook_unembed", "blocks.9.hook_resid_post",
]  # fmt: skip
CHEAP_DETECTORS = ["mahalanobis", "knn", "msp", "energy", "perplexity", "pca-residual"]
TEXT = st.text(
    st.characters(exclude_characters="\x00", exclude_categories=("Cs",)), max_size=12
)  # argv holds no NUL; a surrogate only stands for a byte of a path, not a user's text


def settings_for(examples: int) -> settings:
    return settings(
        max_examples=examples, deadline=None, derandomize=True, database=None,
        suppress_health_check=list(HealthCheck),
    )  # fmt: skip


def invoke(args: list[str]) -> tuple[int, str, str]:
    """Run `madlens ARGS` in-process: (exit code, stdout, stderr); a traceback fails."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(args)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except Exception:  # noqa: BLE001 - what the user would see as a traceback
            pytest.fail(f"madlens {args!r} raised:\n{traceback.format_exc()}")
    return code, out.getvalue(), err.getvalue()


def check(args: list[str]) -> None:
    code, out, err = invoke(args)
    event(f"exit {code}" + (f": {' '.join(err.split()[1:8])}" if code else ""))
    assert code in (0, 2), (args, code, err)
    assert "Traceback" not in out + err, (args, out, err)
    if code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, err)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Valid inputs to mutate: a corpus, a custom task, chat data, a trained SAE, an SAE of
    another width, and a model dir without a chat template."""
    root = tmp_path_factory.mktemp("fuzz")
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "(x)", "return 3", "def f():"]
    (root / "corpus.txt").write_text(
        "\n\n".join(" ".join(rng.choice(words, 10)) for _ in range(100))
    )
    rows = [{"text": f"a question about {w}?", "split": "trusted"} for w in words * 2]
    rows += [{"text": f"question {w}?", "split": "test", "label": 0} for w in words[:4]]
    rows += [{"text": f"zq {w} !!", "split": "test", "label": 1} for w in words[:4]]
    (root / "task.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    chat = [{"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant",
                                                                "content": "Hello."}]}]  # fmt: skip
    lines = [{"text": "hello there"}, {"text": "a " * 300}, *chat]
    (root / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in chat))
    (root / "mixed.jsonl").write_text("\n".join(json.dumps(r) for r in lines))
    write_sae(root / "sae", 64)
    write_sae(root / "narrow-sae", 32)
    no_template_model(root / "no-template-model")
    (root / "a-file").write_text("x")
    return root


@pytest.fixture(autouse=True)
def quiet(monkeypatch, tmp_path_factory):
    """Caches in a scratch home; no progress bars (they are not messages)."""
    monkeypatch.setenv("MADLENS_HOME", str(tmp_path_factory.mktemp("home")))
    silence_progress(monkeypatch)


# --- strategies --------------------------------------------------------------------------------
# Each option is drawn valid most of the time and bad now and then, so that examples reach
# past the argument parser into the work, where the subtle failures live.


def pick(data, label: str, valid, bad=TEXT, one_in: int = 6):
    """A value for option `label`: from `valid`, or (one time in `one_in`) from `bad`."""
    # hypothesis favours small integers: 0 (the simplest draw) is a valid value
    if data.draw(st.integers(0, one_in - 1), label=f"{label} is bad") == one_in - 1:
        return data.draw(bad, label=label)
    return data.draw(valid, label=label)


def ints(lo: int, hi: int):
    return st.integers(lo, hi).map(str)


def comma_list(values, max_size: int = 3):
    return st.lists(st.sampled_from(values), min_size=1, max_size=max_size).map(",".join)


def options(data, spec: dict) -> list[str]:
    """Some of the options in `spec` ({flag: (valid strategy, bad strategy)})."""
    args = []
    for flag, (valid, bad) in spec.items():
        if data.draw(st.booleans(), label=f"use {flag}"):
            value = pick(data, flag, valid, bad)
            args += [flag] if value is True else [] if value is False else [flag, value]
    return args


class Files:
    """Per-example input files under a scratch folder."""

    def __init__(self, world: Path):
        self.world = world
        self.root = Path(tempfile.mkdtemp(dir=world))

    def random_bytes(self, data, suffix: str) -> Path:
        path = self.root / f"random{len(list(self.root.iterdir()))}{suffix}"
        path.write_bytes(data.draw(st.binary(max_size=200), label="bytes"))
        return path

    def out(self, data) -> str:
        new = str(self.root / "out")
        bad = st.sampled_from([str(self.world / "a-file"), str(self.world / "a-file" / "sub")])
        return pick(data, "--out", st.sampled_from([new, str(self.root)]), bad)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def model(data, world: Path, chat: bool = False) -> str:
    bad = ["gpt-17", str(world)] + ([str(world / "no-template-model")] if chat else [])
    return pick(data, "--model", st.just("tiny-test"), st.sampled_from(bad))


BOOL = (st.booleans(), st.booleans())
DTYPE = (st.sampled_from(["float32", "bfloat16"]), st.sampled_from(["float16", "f8", ""]))
DEVICE = (st.sampled_from(["cpu", "auto"]), st.sampled_from(["nonsense", "cuda:99", "", "gpu"]))
SEED = (ints(0, 2**32 - 1), st.one_of(ints(-3, -1), ints(2**32, 2**40), TEXT))
HOOK_LIST = (comma_list(HOOKS[:3] + ["blocks.1.hook_mlp_out", "blocks.0.attn.hook_z"]),
             st.one_of(comma_list(HOOKS), st.sampled_from([",", " "]), TEXT))  # fmt: skip


# --- commands ------------------------------------------------------------------------------


@settings_for(60)
@given(st.data())
def test_extract(world, data):
    files = Files(world)
    bad = st.sampled_from(["bytes", "chat-without-template", "task", "missing"])
    source = pick(data, "--data", st.sampled_from(["mixed", "chat"]), bad)
    path = {"mixed": world / "mixed.jsonl", "chat": world / "chat.jsonl",
            "task": world / "task.jsonl", "missing": world / "nope.jsonl",
            "chat-without-template": world / "chat.jsonl"}.get(source)  # fmt: skip
    path = path or files.random_bytes(data, ".jsonl")
    lm = str(world / "no-template-model") if source == "chat-without-template" else "tiny-test"
    args = ["extract", "--data", str(path), "--out", files.out(data), "--no-cache"]
    args += ["--model", lm if data.draw(st.booleans()) else model(data, world, chat=True)]
    args += options(data, {
        "--hooks": HOOK_LIST,
        "--positions": (comma_list(["last", "all", "response", "mean"]),
                        st.one_of(st.sampled_from(["first", ",", ""]), TEXT)),
        "--dtype": DTYPE, "--device": DEVICE, "--batch-size": (ints(1, 20), ints(-1, 0)),
        "--padding-side": (st.sampled_from(["left", "right"]), TEXT),
        "--max-length": (ints(1, 300), ints(-2, 0)), "--logits": BOOL, "--logprobs": BOOL,
        "--strict": BOOL,
    })  # fmt: skip
    check(args)
    files.close()


@settings_for(24)
@given(st.data())
def test_bench(world, data):
    files = Files(world)
    source = pick(data, "--task-file", st.just("valid"), st.sampled_from(["bytes", "chat"]))
    path = {"valid": world / "task.jsonl", "chat": world / "chat.jsonl"}.get(source)
    path = path or files.random_bytes(data, ".jsonl")
    detectors = pick(data, "--detectors", comma_list(CHEAP_DETECTORS, 2),
                     st.one_of(st.sampled_from(["nope", ",", "msp,nope"]), TEXT))  # fmt: skip
    args = ["bench", "--task-file", str(path), "--out", files.out(data), "--quick",
            "--detectors", detectors, "--model", model(data, world)]  # fmt: skip
    args += options(data, {
        "--tasks": (st.sampled_from([",", "nope"]), st.sampled_from([" , ", "nope,"])),
        "--hooks": HOOK_LIST, "--seed": SEED, "--dtype": DTYPE, "--device": DEVICE,
    })  # fmt: skip
    check(args)
    files.close()


@settings_for(30)
@given(st.data())
def test_sae_train(world, data):
    files = Files(world)
    bad = st.sampled_from(["bytes-txt", "bytes-jsonl", "missing", "task"])
    corpus = pick(data, "--corpus", st.just("valid"), bad)
    corpus_path = {"valid": world / "corpus.txt", "missing": world / "nope.txt",
                   "task": world / "task.jsonl"}.get(corpus)  # fmt: skip
    if corpus_path is None:
        corpus_path = files.random_bytes(data, ".txt" if corpus == "bytes-txt" else ".jsonl")
    args = ["sae", "train", "--corpus", str(corpus_path), "--out", files.out(data),
            "--model", model(data, world), "--expansion", "2", "--batch-size", "64",
            "--hook", pick(data, "--hook", st.sampled_from(HOOKS[:3] + ["blocks.1.hook_mlp_out"]),
                           st.one_of(st.sampled_from(HOOKS), TEXT)),
            "--tokens", pick(data, "--tokens", ints(64, 600), ints(-1, 63)),
            "--context-size", pick(data, "--context-size", ints(8, 32), ints(0, 400))]  # fmt: skip
    args += options(data, {
        "--architecture": (st.sampled_from(["topk", "relu"]), TEXT),
        "--k": (ints(1, 8), ints(-1, 300)),
        "--l1": (st.sampled_from(["0", "5"]), st.sampled_from(["-1", "nan", "inf"])),
        "--lr": (st.sampled_from(["1e-3"]), st.sampled_from(["0", "-0.1", "nan", "inf"])),
        "--dtype": DTYPE, "--device": DEVICE, "--seed": SEED,
    })  # fmt: skip
    check(args)
    files.close()


def sae_dir(world: Path, files: Files, data) -> str:
    """A valid SAE, or one of another width, with a corrupt file, or no SAE at all."""
    bad = st.sampled_from(["narrow", "cfg", "weights", "sparsity", "missing", "file"])
    kind = pick(data, "--sae", st.just("valid"), bad, one_in=2)
    if kind in ("valid", "narrow"):
        return str(world / ("sae" if kind == "valid" else "narrow-sae"))
    if kind in ("missing", "file"):
        return str(world / ("nope" if kind == "missing" else "a-file"))
    copy = files.root / "sae"
    shutil.copytree(world / "sae", copy)
    name = {"cfg": "cfg.json", "weights": "sae_weights.safetensors",
            "sparsity": "sparsity.safetensors"}[kind]  # fmt: skip
    (copy / name).write_bytes(data.draw(st.binary(max_size=200), "corrupt bytes"))
    return str(copy)


@settings_for(30)
@given(st.data())
def test_explain(world, data):
    files = Files(world)
    args = ["explain", "--sae", sae_dir(world, files, data), "--text", data.draw(TEXT, "text")]
    args += options(data, {
        "--model": (st.just("tiny-test"), st.sampled_from(["gpt-17", str(world)])),
        "--top": (ints(1, 5), ints(-1, 0)), "--dtype": DTYPE, "--device": DEVICE,
        "--dashboard": (TEXT, TEXT),
    })  # fmt: skip
    check(args)
    files.close()


@settings_for(14)
@given(st.data())
def test_sae_dashboard(world, data):
    files = Files(world)
    bad = st.sampled_from([str(files.root), str(world / "a-file" / "d.html")])
    out = pick(data, "--out", st.just(str(files.root / "d.html")), bad)
    corpus = pick(data, "--corpus", st.just("valid"), st.just("bytes"))
    corpus_path = world / "corpus.txt" if corpus == "valid" else files.random_bytes(data, ".txt")
    args = ["sae", "dashboard", "--sae", sae_dir(world, files, data), "--out", out,
            "--corpus", str(corpus_path),
            "--tokens", pick(data, "--tokens", ints(32, 256), ints(-1, 1))]  # fmt: skip
    args += options(data, {"--model": (st.just("tiny-test"), st.just("gpt-17")),
                           "--dtype": DTYPE, "--device": DEVICE})  # fmt: skip
    check(args)
    files.close()


@settings_for(16)
@given(st.data())
def test_circuits_ioi(world, data):
    files = Files(world)
    args = ["circuits", "ioi", "--out", files.out(data), "--no-cache",
            "--model", model(data, world),
            "--n-prompts", pick(data, "--n-prompts", ints(2, 4), ints(-1, 1))]  # fmt: skip
    args += options(data, {
        "--dtype": DTYPE, "--device": DEVICE, "--seed": SEED,
        "--threshold": (st.sampled_from(["0", "0.5"]), st.sampled_from(["-1", "nan", "inf"])),
        "--min-attention": (st.sampled_from(["0", "0.5", "1"]),
                            st.sampled_from(["-0.1", "2", "nan"])),
        "--max-heads": (ints(1, 10), ints(-1, 0)), "--batch-size": (ints(1, 64), ints(-1, 0)),
    })  # fmt: skip
    check(args)
    files.close()


@settings_for(10)
@given(st.data())
def test_truth_sweep(world, data):
    files = Files(world)
    datasets = pick(data, "--datasets", st.sampled_from(["cities", "capitals"]),
                    st.one_of(st.sampled_from([",", "cities,nope"]), TEXT))  # fmt: skip
    args = ["truth", "sweep", "--out", files.out(data), "--datasets", datasets,
            "--n", pick(data, "--n", ints(4, 6), ints(-1, 3)),
            "--model", model(data, world)]  # fmt: skip
    args += options(data, {
        "--hooks": HOOK_LIST,
        "--transfer-hook": (st.sampled_from(["0", "1", "-1"]),
                            st.one_of(st.sampled_from(HOOKS + [",", "0,1"]), TEXT)),
        "--seed": SEED, "--dtype": DTYPE, "--device": DEVICE,
    })  # fmt: skip
    check(args)
    files.close()


@settings_for(6)
@given(st.data())
def test_models_and_lists(data):
    command = data.draw(st.sampled_from([["models", "list"], ["models", "pull"],
                                         ["detectors", "list"], ["tasks", "list"]]))  # fmt: skip
    if command[1] == "pull":
        command.append(pick(data, "name", st.just("tiny-test"), st.just("gpt-17")))
    extra = pick(data, "extra arguments", st.just([]), st.lists(TEXT, min_size=1, max_size=1))
    check(command + extra)


@settings_for(6)
@given(st.data())
def test_cache(data):
    # --kind is drawn from plain names only: a path there (`..`, `/`) walks outside the cache
    command = ["cache", data.draw(st.sampled_from(["list", "size", "clear"]), "command")]
    command += options(data, {"--kind": (st.sampled_from(["activations", "models"]),
                                         st.sampled_from(["nope", ""]))})  # fmt: skip
    days = (st.sampled_from(["0", "1.5"]), st.sampled_from(["-1", "nan", "x"]))
    if command[1] == "clear":
        command += options(data, {"--older-than": days})
    check(command)


def test_the_lists_name_every_detector_and_task():
    code, out, _ = invoke(["detectors", "list"])
    assert code == 0 and all(name in out for name in DETECTORS)
