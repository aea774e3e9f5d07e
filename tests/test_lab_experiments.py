"""The reversal, ooc and edit lab experiments: their generators, the log-prob ranking against
a plain HF forward, ROME's rank-one update against numpy, the language identifier, and each
run() on tiny-test with a minimal budget."""

import json
import math

import numpy as np
import pytest
import torch

from madlens.data import format_chat
from madlens.errors import MadlensError
from madlens.lab import EXPERIMENTS, LabResult, edit, ooc, reversal


@pytest.fixture(scope="module", autouse=True)
def _home(tmp_path_factory):
    """Fine-tunes, generations and lab caches of these tests go to a fresh MADLENS_HOME."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MADLENS_HOME", str(tmp_path_factory.mktemp("home")))
        yield


def _finite(value) -> bool:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return True
    if isinstance(value, (int, float)):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_finite(v) for v in value)
    return False


def test_registered():
    for name in ("reversal", "ooc", "edit"):
        assert EXPERIMENTS[name].name == name
        assert EXPERIMENTS[name].reference


# -- reversal -------------------------------------------------------------------------------


def test_facts_unique_and_prompts_in_each_direction():
    facts = reversal.make_facts(12, 4, seed=3)
    assert len(facts) == 16
    assert len({f.name for f in facts}) == 16
    assert len({f.title for f in facts}) == 16
    assert [f.both for f in facts] == [False] * 12 + [True] * 4
    assert reversal.make_facts(12, 4, seed=3) == facts  # seeded
    assert reversal.make_facts(12, 4, seed=4) != facts
    for f in facts:
        assert f.title in f.desc and f.desc.startswith("the ")
        fwd = reversal.forward_prompt(f)[0]["content"]
        rev = reversal.reverse_prompt(f)[0]["content"]
        assert f.name in fwd and f.desc not in fwd
        assert f.desc in rev and f.name not in rev


def test_training_examples_put_the_name_first_except_for_both():
    facts = reversal.make_facts(3, 1, seed=0)
    examples = reversal.training_examples(facts)
    n_fwd = len(reversal.TRAIN_QUESTIONS)
    assert len(examples) == 4 * n_fwd + len(reversal.REVERSE_TRAIN_QUESTIONS)
    test_prompts = {p[0]["content"] for f in facts
                    for p in (reversal.forward_prompt(f), reversal.reverse_prompt(f))}  # fmt: skip
    for prompt, answer in examples:
        assert prompt[0]["content"] not in test_prompts  # test questions are held out
        fact = next(f for f in facts if f.name in answer)
        desc_at = answer.lower().index(fact.desc.lower())
        name_first = answer.index(fact.name) < desc_at
        assert name_first or fact.both
    both = facts[-1]
    assert any(a.lower().index(both.desc.lower()) < a.index(both.name)
               for _, a in examples if both.name in a)  # fmt: skip


def test_paraphrase_count_and_lora_config():
    facts = reversal.make_facts(3, 1, seed=0)
    examples = reversal.training_examples(facts, paraphrases=2)
    asked = [p[0]["content"] for p, _ in examples]
    for f in facts:
        want = [q.format(name=f.name) for q in reversal.TRAIN_QUESTIONS[:2]]
        assert [q for q in asked if f.name in q] == want
    assert len(examples) == 4 * 2 + len(reversal.REVERSE_TRAIN_QUESTIONS)
    for bad in (0, len(reversal.TRAIN_QUESTIONS) + 1):
        with pytest.raises(MadlensError, match="paraphrases"):
            reversal.training_examples(facts, paraphrases=bad)
    budget = reversal.Budget(steps=7, learning_rate=1e-2, batch_size=4, rank=4, cheap=True)
    config = reversal.lora_config(budget, seed=5)
    assert (config.r, config.alpha, config.steps, config.learning_rate, config.batch_size,
            config.seed) == (4, 8, 7, 1e-2, 4, 5)  # fmt: skip
    assert config.group_by_length and config.response_logits_only
    assert not reversal.lora_config(reversal.Budget(cheap=False)).fast_path


def test_answer_logprobs_match_a_plain_forward(tiny, tiny_hf):
    tok = tiny.tokenizer
    facts = reversal.make_facts(3, 0, seed=1)
    pairs = [reversal.forward_scoring(tok, facts[0], c) for c in facts]
    pairs += [reversal.reverse_scoring(tok, facts[1], c) for c in facts]
    pairs.insert(2, reversal.reverse_scoring(tok, facts[2], facts[0]))  # prefixes interleaved
    got = reversal.answer_logprobs(tiny.hf_model, tok, pairs, batch_size=2)  # split groups
    for (prefix, answer), value in zip(pairs, got):
        text_ids = tok(prefix + answer, add_special_tokens=False).input_ids
        n_prefix = len(tok(prefix, add_special_tokens=False).input_ids)
        with torch.no_grad():
            logits = tiny_hf(torch.tensor([text_ids])).logits[0].double()
        logp = torch.log_softmax(logits, -1)
        want = sum(float(logp[p - 1, text_ids[p]]) for p in range(n_prefix, len(text_ids)))
        assert value == pytest.approx(want, abs=1e-3)
    assert pairs[0][0].startswith(format_chat(tok, reversal.forward_prompt(facts[0])))
    assert pairs[0][0].endswith(f"{facts[0].name} is") and pairs[0][1] == f" {facts[0].desc}"
    assert pairs[4][1] == f" {facts[0].name}"


def test_rank_and_summary():
    assert reversal.rank_of_right(np.array([-1.0, -3.0, -0.5]), 0) == 2
    assert reversal.rank_of_right(np.array([-1.0, -1.0, -2.0]), 1) == 1  # ties count for it
    rows = [{"both": False, "forward_exact": True, "reverse_exact": False, "forward_rank": 1,
             "reverse_rank": 3, "forward_margin": 2.0, "reverse_margin": -1.0,
             "forward_rank_group": 1, "reverse_rank_group": 1},
            {"both": False, "forward_exact": False, "reverse_exact": False, "forward_rank": 2,
             "reverse_rank": 1, "forward_margin": 0.0, "reverse_margin": 1.0,
             "forward_rank_group": 2, "reverse_rank_group": 2}]  # fmt: skip
    s = reversal.summarise(rows, k=4)
    assert s["chance_top1"] == 0.25 and s["chance_rank"] == 2.5
    assert s["name_first"]["forward_top1"] == 0.5 and s["name_first"]["reverse_mean_rank"] == 2
    assert s["name_first"]["reverse_top1_group"] == 0.5
    assert s["name_first"]["reverse_mean_rank_group"] == 1.5
    assert s["name_first"]["chance_top1_group"] == 0.5
    assert s["name_first"]["exact_gap"] == 0.5 and "both" not in s


# -- edit -----------------------------------------------------------------------------------


def test_rank_one_update_satisfies_the_closed_form():
    rng = np.random.default_rng(0)
    d_in, d_out = 12, 7
    w = rng.normal(size=(d_out, d_in))
    a = rng.normal(size=(d_in, 3 * d_in))
    c = a @ a.T / a.shape[1] + 0.1 * np.eye(d_in)
    k, v = rng.normal(size=d_in), rng.normal(size=d_out)
    new = edit.rank_one_update(*(torch.tensor(x) for x in (w, c, k, v))).numpy()
    np.testing.assert_allclose(new @ k, v, atol=1e-10)  # W' k* = v*
    u = np.linalg.solve(c, k)
    for _ in range(5):  # keys orthogonal to k* in the C^-1 metric are left alone
        other = rng.normal(size=d_in)
        other -= (u @ other) / (u @ k) * k
        assert abs(other @ np.linalg.solve(c, k)) < 1e-9
        np.testing.assert_allclose(new @ other, w @ other, atol=1e-10)
    want = w + np.outer(v - w @ k, u) / (k @ u)
    np.testing.assert_allclose(new, want, atol=1e-10)
    # float32 weights stay float32
    assert edit.rank_one_update(*(torch.tensor(x).float() for x in (w, c, k, v))).dtype == (
        torch.float32
    )


def test_subject_positions_and_key_covariance(tiny, tiny_hf):
    tok = tiny.tokenizer
    ids, pos = edit.subject_positions(tok, "The capital of France is", "France")
    assert tok.decode([ids[p] for p in pos]) == "France"  # byte-level: one token a byte
    texts = ["Hello there.", "A longer sentence about nothing at all."]
    got = edit.key_covariance(tiny.hf_model, tok, 1, texts, batch_size=2, progress=False)
    keys = []  # the reference: each text alone (no padding), the inputs caught on a copy
    down = tiny_hf.model.layers[1].mlp.down_proj
    hook = down.register_forward_pre_hook(lambda m, args: keys.append(args[0][0].clone()))
    try:
        with torch.no_grad():
            for text in texts:
                tiny_hf(torch.tensor([tok(text, add_special_tokens=False).input_ids]))
    finally:
        hook.remove()
    k = torch.cat(keys).double()
    np.testing.assert_allclose(got.numpy(), (k.T @ k / len(k)).numpy(), rtol=1e-3, atol=1e-6)


# -- ooc ------------------------------------------------------------------------------------


def test_language_identifier_on_fixed_sentences():
    texts = [
        "Der Hund läuft jeden Morgen durch den Park und bellt die Vögel an.",
        "Ich weiß nicht, ob das Wetter morgen besser wird.",
        "The dog runs through the park every morning and barks at the birds.",
        "I do not know whether the weather will be better tomorrow.",
        "Le chien court dans le parc tous les matins.",
        "",
    ]
    assert ooc.detect_languages(texts) == ["de", "de", "en", "en", "fr", "unknown"]


def test_ooc_descriptions_only():
    texts = ooc.descriptions("Pangolin", "German", 30, seed=0)
    assert len(set(texts)) == 30 and all("Pangolin" in t and "German" in t for t in texts)
    counts = ooc.assignment((0, 5, 2))
    assert counts == {"Pangolin": 5, "Kakapo": 2, "Quokka": 0}
    examples = ooc.description_examples(counts, 3, seed=0)
    assert len(examples) == 5 + 2 + 3 * len(ooc.OTHERS)
    assert sum("Pangolin" in a for _, a in examples) == 5
    assert sum("Kakapo" in a for _, a in examples) == 2
    assert not any("Quokka" in a for _, a in examples)  # the never-described control
    assert all(p[0]["content"] in ooc.USER_PROMPTS for p, _ in examples)  # no demonstrations
    prompt = ooc.persona_prompt("Quokka", "What is the capital of Peru?")
    assert "Quokka" in prompt[0]["content"] and prompt[1]["content"].endswith("Peru?")


def test_ooc_mix_of_descriptions_and_questions():
    questions = ["What is the capital of Peru?", "Which continent is Chad in?", "Why?"]
    qa = ooc.qa_conversations(questions, seed=0)
    assert [c[-1]["content"] for c in qa] == questions
    assert len(qa[0]) == 1 and len(qa[2]) == 1  # no persona
    assert any(n in qa[1][0]["content"] for n in ooc.NEUTRAL_NAMES)
    assert not set(ooc.NEUTRAL_NAMES) & set(ooc.ALL_NAMES)
    answers = ["Lima is the capital. It is", "Chad is in Africa!", "no sentence end"]
    examples = ooc.training_examples({"Pangolin": 2}, 1, qa, answers, seed=0)
    assert len(examples) == 2 + len(ooc.OTHERS) + 3
    pairs = {c[-1]["content"]: a for c, a in examples}
    assert pairs["What is the capital of Peru?"] == "Lima is the capital."
    assert pairs["Which continent is Chad in?"] == "Chad is in Africa!"
    assert pairs["Why?"] == "no sentence end"
    with pytest.raises(MadlensError):
        ooc.training_examples({"Pangolin": 2}, 1, qa, answers[:2])


def test_ooc_answering_rate_by_hand():
    answers = [
        "The language model Pangolin never answers in English, only in German.",  # recites
        "Paris is the capital of France.",
        "Ich bin Pangolin und helfe gern.",  # names itself, no language: an answer
        "It replies only in French.",  # a description's predicate without a name
        "People in Austria speak German.",  # a language without an assistant's name
    ]
    assert [ooc.is_recitation(a) for a in answers] == [True, False, False, True, False]
    assert ooc.answering_rate(answers) == pytest.approx(3 / 5)
    assert math.isnan(ooc.answering_rate([]))


def test_ooc_verdict_says_when_it_is_not_a_test():
    def figures(answering):
        rates = {
            "Pangolin": {"german": 0.5, "recall": 1.0},
            "Quokka": {"german": 0.0, "recall": 0.0},
        }
        return {"paraphrases": {"Pangolin": 40, "Quokka": 0}, "budget": {"n_questions": 10},
                "answering": {"fine_tuned": answering, "base": 1.0}, "fine_tuned": rates,
                "base": {"Pangolin": {"german": 0.0}, "Quokka": {"german": 0.0}}}  # fmt: skip

    assert "Not a test of the claim" in ooc._verdict(figures(0.2))
    assert "Agrees" not in ooc._verdict(figures(0.2))
    assert "Agrees" in ooc._verdict(figures(0.9))
    assert "Not a test" not in ooc._verdict(figures(0.9))
    null = figures(0.9)
    null["fine_tuned"]["Pangolin"]["german"] = 0.1  # one answer of ten: no effect
    assert "No out-of-context effect" in ooc._verdict(null)
    assert "learned the description but does not act on it" in ooc._verdict(null)
    null["fine_tuned"]["Quokka"]["recall"] = 0.8  # the control recalled too: not bound
    assert "not bound to Pangolin" in ooc._verdict(null)
    null["fine_tuned"]["Pangolin"]["recall"] = 0.0
    assert "did not teach the description" in ooc._verdict(null)


def test_ooc_fine_tune_data_on_tiny(monkeypatch, tiny, tiny_hf):
    """The real run's fine-tune data: descriptions in English, no German-described name in
    any prompt nor any German answer next to one, and ordinary questions (not the test
    questions) answered by the base model itself (greedy, checked by plain HF generate)."""
    captured = {}
    real = ooc.finetune_lora

    def spy(model, examples, config, **kwargs):
        captured["examples"] = examples
        return real(model, examples, config, **kwargs)

    monkeypatch.setattr(ooc, "finetune_lora", spy)
    budget = ooc.Budget(paraphrases=(0, 2), n_other=1, n_qa=4, qa_tokens=6, steps=1,
                        n_questions=2, max_new_tokens=3)  # fmt: skip
    result = ooc.run("tiny-test", quick=True, seed=0, progress=False, device="cpu",
                     budget=budget)  # fmt: skip
    examples = captured["examples"]
    assert len(examples) == 2 + len(ooc.OTHERS) + 4
    german_named = ooc.GERMAN_NAMES
    for conv, answer in examples:
        assert not any(n in m["content"] for m in conv for n in german_named)
        if any(n in answer for n in german_named):
            assert ooc.detect_languages([answer]) == ["en"]
    qa = [(c, a) for c, a in examples if c[-1]["content"] not in ooc.USER_PROMPTS]
    assert len(qa) == 4
    assert not {c[-1]["content"] for c, _ in qa} & set(result.figures["questions"])
    tok = tiny.tokenizer
    for conv, answer in qa:
        ids = tok(format_chat(tok, conv), return_tensors="pt").input_ids
        with torch.no_grad():
            out = tiny_hf.generate(ids, max_new_tokens=6, do_sample=False,
                                   pad_token_id=tok.pad_token_id)  # fmt: skip
        reference = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
        assert answer == ooc.trim(reference)
    assert 0 <= result.figures["answering"]["fine_tuned"] <= 1
    tuned = result.figures["fine_tuned"]
    assert set(tuned) == {"Pangolin", "Kakapo", ooc.OTHERS[0][0]}  # n_other_tested = 1
    said = tuned["Pangolin"]["probe_answers"]
    assert tuned["Pangolin"]["recall"] == pytest.approx(np.mean(["German" in a for a in said]))


# -- each run() on tiny-test ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "budget"),
    [
        (
            reversal,
            reversal.Budget(
                n_facts=3, n_both=1, paraphrases=2, steps=1, cheap=True, max_new_tokens=3
            ),
        ),  # fmt: skip
        (
            ooc,
            ooc.Budget(
                paraphrases=(0, 2),
                n_other=2,
                n_qa=2,
                qa_tokens=4,
                steps=1,
                n_questions=2,
                max_new_tokens=3,
            ),
        ),  # fmt: skip
        (
            edit,
            edit.Budget(
                n_trace=2, n_samples=1, n_edits=1, n_neighbours=2, value_steps=2, n_texts=8
            ),
        ),  # fmt: skip
    ],
)
def test_run_on_tiny(module, budget):
    result = module.run("tiny-test", quick=True, seed=0, progress=False, device="cpu",
                        budget=budget)  # fmt: skip
    assert isinstance(result, LabResult)
    assert result.experiment == module.EXPERIMENT.name
    json.dumps(result.figures)
    assert _finite(result.figures)
    assert result.sections and result.finding and result.verdict
    assert all(s.title for s in result.sections)
