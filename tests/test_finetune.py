"""LoRA fine-tune options (tasks.finetune) on tiny-test: the explicit forward against the
model's own, LoRA restricted to layers, the activation loss, batches and cache keys."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from madlens import cache
from madlens.activations import extract
from madlens.errors import MadlensError
from madlens.models import load_hf, load_model, resid_post
from madlens.tasks.finetune import (
    ActivationLoss,
    LoraConfig,
    _batches,
    _encode,
    _pad,
    _pad_rows,
    _residual_before,
    finetune_lora,
    lm_loss,
)

PROMPTS = ["hello there", "what is two plus two, please?", "name a colour", "ok"]
ANSWERS = ["hi", "four, I think", "blue", "sure, what next?"]
EXAMPLES = [([{"role": "user", "content": p}], a) for p, a in zip(PROMPTS, ANSWERS)]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    path = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MADLENS_HOME", str(path))
        yield path


@pytest.fixture()
def batch():
    model, tokenizer, _ = load_hf("tiny-test", "float32", device="cpu")
    encoded = [_encode(tokenizer, p, r, 128) for p, r in EXAMPLES]
    ids = _pad([x for x, _ in encoded], tokenizer.pad_token_id)
    labels = _pad([y for _, y in encoded], -100)
    mask = _pad([[1] * len(x) for x, _ in encoded], 0)
    return model, encoded, ids, labels, mask


def test_default_config_keeps_the_cache_key_of_adapters_trained_before_the_options():
    config = LoraConfig(steps=150, seed=3)
    # What `cache.key` saw before the options existed: the dataclass's first nine fields.
    before = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)[:9]}
    assert list(before)[-1] == "target_modules"
    assert cache.key(config=before) == cache.key(config=config.key())
    assert not config.fast_path
    for changed in (LoraConfig(steps=150, seed=3, layers=(1,)),
                    LoraConfig(steps=150, seed=3, group_by_length=True),
                    LoraConfig(steps=150, seed=3, response_logits_only=True)):  # fmt: skip
        assert changed.fast_path and cache.key(config=changed.key()) != cache.key(config=before)


@pytest.mark.parametrize(
    "config",
    [
        LoraConfig(response_logits_only=True),
        LoraConfig(layers=(1,)),
        LoraConfig(layers=(1,), response_logits_only=True),
    ],  # fmt: skip
)
def test_explicit_forward_equals_the_models_own_loss(batch, config):
    model, encoded, ids, labels, mask = batch
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        prefix = None
        if config.layers:
            prefix = _pad_rows(_residual_before(model, encoded, min(config.layers), "cpu"))
        loss = lm_loss(model, ids, labels, mask, config, prefix)
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)


def test_activation_loss_reads_the_residual_stream_that_extract_reads(batch):
    model, encoded, ids, labels, mask = batch
    width = model.config.hidden_size
    ends = torch.tensor([next(i for i, y in enumerate(lab) if y != -100) - 1
                         for _, lab in encoded])  # fmt: skip
    rows = torch.tensor([False, True, True, False])
    mean = np.linspace(-1, 1, width).astype(np.float32)
    precision = np.diag(np.linspace(0.5, 2, width)).astype(np.float32)
    extra = ActivationLoss(layer=1, mean=mean, precision=precision, rows=(1, 2), weight=0.5)
    with torch.no_grad():
        plain = lm_loss(model, ids, labels, mask, LoraConfig(response_logits_only=True))
        both = lm_loss(model, ids, labels, mask,
                       LoraConfig(response_logits_only=True, activation_loss=extra),
                       None, ends, rows)  # fmt: skip
    hook = resid_post(1)
    acts = extract(load_model("tiny-test"), [p for p, _ in EXAMPLES[1:3]], [hook], "last",
                   cache=False, progress=False)[hook].astype(np.float64)  # fmt: skip
    centred = acts - mean
    expected = 0.5 * np.mean(np.einsum("nd,de,ne->n", centred, precision, centred) / width)
    assert float(both - plain) == pytest.approx(expected, rel=1e-4)


def _adapter(path):
    return load_file(str(path / "adapter_model.safetensors"))


def test_lora_on_chosen_layers_only_and_they_train(home):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    config = LoraConfig(steps=4, layers=(1,), group_by_length=True, response_logits_only=True)
    weights = _adapter(finetune_lora("tiny-test", EXAMPLES, config, progress=False))
    # peft's own view of the same restriction: the trainable parameters it creates.
    model, _, _ = load_hf("tiny-test", "float32", device="cpu")
    peft_model = get_peft_model(model, PeftLoraConfig(
        r=8, target_modules=list(config.target_modules), layers_to_transform=[1],
        task_type="CAUSAL_LM"))  # fmt: skip
    trainable = {n.replace(".default", "") for n, p in peft_model.named_parameters()
                 if p.requires_grad}  # fmt: skip
    assert set(weights) == trainable and all(".layers.1." in n for n in weights)
    # LoRA's B starts at zero: every B of the chosen layer moved.
    b = [n for n in weights if "lora_B" in n]
    assert len(b) == 7 and all(np.abs(weights[n]).max() > 0 for n in b)
    every = _adapter(finetune_lora("tiny-test", EXAMPLES, LoraConfig(steps=1), progress=False))
    assert any(".layers.0." in n for n in every)


def test_a_fine_tune_and_its_merge_do_not_pass_on_peft_s_deprecation_warning(home):
    import warnings

    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    def peft_warns() -> bool:
        model, _, _ = load_hf("tiny-test", "float32", device="cpu")
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            get_peft_model(model, PeftLoraConfig(r=8, target_modules=["q_proj"],
                                                 task_type="CAUSAL_LM"))  # fmt: skip
        return any("is_gradient_checkpointing" in str(w.message) for w in seen)

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        adapter = finetune_lora("tiny-test", EXAMPLES, LoraConfig(steps=1, seed=7),
                                progress=False)  # fmt: skip
        load_model("tiny-test", adapter=adapter, device="cpu")  # merging the adapter
    assert not any("is_gradient_checkpointing" in str(w.message) for w in seen)
    # peft itself still warns (when it stops, the filter in `finetune` can go)
    assert peft_warns()


def test_activation_loss_changes_the_weights_and_the_cache_key(home):
    width = 64
    extra = ActivationLoss(layer=1, mean=np.full(width, 3.0, np.float32),
                           precision=np.eye(width, dtype=np.float32), rows=(1, 3),
                           weight=10.0)  # fmt: skip
    plain = LoraConfig(steps=3, layers=(1,), response_logits_only=True)
    attacked = dataclasses.replace(plain, activation_loss=extra)
    heavier = dataclasses.replace(plain, activation_loss=dataclasses.replace(extra, weight=1.0))
    dirs = [finetune_lora("tiny-test", EXAMPLES, c, progress=False)
            for c in (plain, attacked, heavier)]  # fmt: skip
    assert len(set(dirs)) == 3
    a, b = _adapter(dirs[0]), _adapter(dirs[1])
    assert max(float(np.abs(a[n] - b[n]).max()) for n in a) > 1e-4
    record = json.loads((dirs[1] / "madlens_finetune.json").read_text())
    assert record["config"]["activation_loss"] == {"layer": 1, "weight": 10.0, "rows": 2}


def test_length_grouped_batches_cover_every_example_with_less_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 200, size=96).tolist()
    config = LoraConfig(batch_size=8, group_by_length=True)
    plain = _batches(lengths, LoraConfig(batch_size=8))
    grouped = _batches(lengths, config)
    first = [next(grouped) for _ in range(12)]  # one epoch: 96 / 8
    assert all(len(b) == 8 for b in first)
    assert sorted(i for b in first for i in b) == list(range(96))

    def padding(bs):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in bs)

    assert padding(first) < 0.3 * padding([next(plain) for _ in range(12)])


@pytest.mark.parametrize(
    "config, message",
    [
        (LoraConfig(layers=(2,)), r"LoRA layers \[2\]: the model has decoder layers 0..1"),
        (LoraConfig(layers=()), r"LoRA layers \[\]"),
        (
            LoraConfig(activation_loss=ActivationLoss(5, np.zeros(64), np.eye(64), (0,))),
            "activation loss at layer 5",
        ),
    ],  # fmt: skip
)
def test_bad_options_fail_in_one_line(home, config, message):
    with pytest.raises(MadlensError, match=message):
        finetune_lora("tiny-test", EXAMPLES, config, progress=False)


def test_activation_loss_below_the_lora_layers_is_refused(home):
    extra = ActivationLoss(0, np.zeros(64, np.float32), np.eye(64, dtype=np.float32), (0,))
    with pytest.raises(MadlensError, match="below the lowest LoRA layer 1"):
        finetune_lora("tiny-test", EXAMPLES, LoraConfig(steps=1, layers=(1,),
                      activation_loss=extra), progress=False)  # fmt: skip
