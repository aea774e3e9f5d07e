import json


def test_circuits_ioi_on_tiny_test_writes_json_and_report(tmp_path, run_cli):
    out = tmp_path / "ioi"
    code, stdout, stderr = run_cli(
        "circuits", "ioi", "--model", "tiny-test", "--out", str(out),
        "--n-prompts", "6", "--dtype", "float32", "--no-cache",
    )  # fmt: skip
    assert code == 0, stderr
    assert "capital letters" in stderr  # the byte tokenizer has no single-token names
    doc = json.loads((out / "circuit.json").read_text())
    assert doc["model"] == "tiny-test" and doc["n_prompts"] == 6 and doc["n_layers"] == 2
    # A random model does not do IOI, and says so instead of claiming the target.
    assert doc["solves_task"] is False and doc["meets_target"] is False
    assert "faithfulness" in stdout and f"{doc['clean_logit_diff']:.2f}" in stdout
    assert (out / "report.html").read_text().startswith("<!DOCTYPE html>")


def test_circuits_ioi_bad_model_is_one_line_and_exit_code_2(tmp_path, run_cli):
    code, _, stderr = run_cli("circuits", "ioi", "--model", "no-such-model", "--out", str(tmp_path))
    assert code == 2
    assert stderr.strip().startswith("error: unknown model 'no-such-model'")
    assert len(stderr.strip().splitlines()) == 1
