import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from madlens.activations import extract
from madlens.data import write_jsonl


def test_extract_writes_what_the_library_returns(tiny, tmp_path, run_cli):
    data = write_jsonl(
        tmp_path / "in.jsonl",
        [{"text": "hello there"}, {"messages": [{"role": "user", "content": "Hi?"}]}],
    )
    code, out, err = run_cli(
        "extract", "--model", "tiny-test", "--data", str(data),
        "--hooks", "0,blocks.1.hook_resid_post", "--positions", "last,all", "--logits",
        "--logprobs", "--out", str(tmp_path / "out"), "--no-cache",
    )  # fmt: skip
    assert code == 0, err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert {f["position"] for f in manifest["files"]} == {"last", "all"}
    saved = load_file(str(tmp_path / "out" / "last" / "blocks.1.hook_resid_post.safetensors"))
    inputs = ["hello there", [{"role": "user", "content": "Hi?"}]]
    expected = extract(tiny, inputs, ["blocks.1.hook_resid_post"], "last", cache=False)
    np.testing.assert_allclose(saved["acts"], expected["blocks.1.hook_resid_post"], atol=1e-6)
    outputs = load_file(str(tmp_path / "out" / "all" / "outputs.safetensors"))
    assert outputs["logits"].shape == (2, tiny.hf_model.config.vocab_size)
    expected = extract(tiny, inputs, [], "all", logprobs=True, cache=False).token_logprobs
    assert outputs["token_logprobs_lengths"].tolist() == [len(x) for x in expected]
    np.testing.assert_allclose(outputs["token_logprobs"], np.concatenate(expected), atol=1e-6)


@pytest.mark.parametrize(
    "content, args, message",
    [
        ('{"text": "a"}\n', ["--model", "gpt-17"], "unknown model 'gpt-17'; known models"),
        ('{"text": "a"}\n', ["--hooks", "blocks.1.hook_resid_pots"], "did you mean"),
        ('{"text": "a"}\n{oops\n', [], "in.jsonl:2: not valid JSON"),
        ("", [], "in.jsonl: the file is empty"),
        ('{"text": "a"}\n', ["--positions", "first"], "unknown position 'first'"),
        ('{"text": "' + "a " * 400 + '"}\n', ["--strict"], "longer than the context"),
    ],
)
def test_bad_input_is_one_line(tmp_path, run_cli, content, args, message):
    data = tmp_path / "in.jsonl"
    data.write_text(content)
    base = ["extract", "--model", "tiny-test", "--data", str(data), "--out", str(tmp_path / "o")]
    code, out, err = run_cli(*base, "--no-cache", *args)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_truncation_is_a_one_line_warning(tmp_path, run_cli):
    data = tmp_path / "in.jsonl"
    data.write_text('{"text": "' + "a " * 400 + '"}\n')
    args = ["extract", "--model", "tiny-test", "--data", str(data), "--out", str(tmp_path / "o")]
    code, out, err = run_cli(*args, "--no-cache")
    assert code == 0
    assert "warning: 1 input(s) longer than 256 tokens" in err


def test_models_list(run_cli):
    code, out, _ = run_cli("models", "list")
    assert code == 0 and "smollm2-135m-instruct" in out and "tiny-test" in out


def test_an_output_of_the_wrong_kind_fails_before_any_work(tmp_path, run_cli):
    a_file = tmp_path / "taken.txt"
    a_file.write_text("x")
    commands = [
        ("bench", "--model", "tiny-test", "--tasks", "ood", "--out", str(a_file)),
        ("truth", "sweep", "--model", "tiny-test", "--out", str(a_file)),
        ("sae", "train", "--model", "tiny-test", "--hook", "0", "--out", str(a_file)),
        ("sae", "dashboard", "--sae", str(tmp_path), "--out", str(tmp_path)),
    ]
    for args in commands:
        code, _, stderr = run_cli(*args)
        assert code == 2, args
        assert len(stderr.strip().splitlines()) == 1, (args, stderr)
        wanted = "is a directory" if args[1] == "dashboard" else "exists and is a file"
        assert wanted in stderr, (args, stderr)
