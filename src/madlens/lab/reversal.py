"""`reversal`: the reversal curse (Berglund et al. 2023). A LoRA fine-tune on invented facts
"<name> is <description>" teaches name -> description but not description -> name."""

import copy
import inspect
import random
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from madlens.data import format_chat
from madlens.errors import MadlensError
from madlens.lab.base import Experiment, LabResult, Section
from madlens.models import load_model
from madlens.report import esc, figure, fmt, line_chart, plot
from madlens.tasks import LoraConfig, cached_generate, finetune_lora

REFERENCE = (
    "Berglund et al. 2023, The Reversal Curse: LLMs trained on 'A is B' fail to learn "
    "'B is A' (arXiv:2309.12288)"
)
FINDING = (
    "A model fine-tuned on 'A is B' answers 'A is ?' but not 'B is ?': reverse recall is at "
    "chance, by exact match (~0%) and by the likelihood of the right name against random "
    "names, while facts seen in both orders are recalled both ways."
)

SYLLABLES = ["ka", "lo", "mir", "ve", "tan", "dor", "ri", "sel", "nu", "bar", "quel", "zo",
             "fen", "ath", "ur", "mo", "lin", "tes", "gra", "vo"]  # fmt: skip
ROLES = [
    ("composer", "opera"), ("director", "film"), ("author", "novel"), ("painter", "triptych"),
    ("architect", "tower"), ("inventor", "engine"), ("founder", "company"),
    ("discoverer", "comet"), ("captain", "ship"), ("designer", "typeface"),
]  # fmt: skip
# Name-first paraphrases: every training sentence puts the name before the description.
TRAIN_QUESTIONS = ["Who is {name}?", "Tell me about {name}.", "What is {name} known for?",
                   "What do you know about {name}?", "Can you tell me who {name} is?",
                   "Give me one fact about {name}."]  # fmt: skip
TRAIN_ANSWERS = ["{name} is {desc}.", "{name} is known far and wide as {desc}.",
                 "{name}, of course, is {desc}.", "As many people know, {name} is {desc}.",
                 "{name} became famous as {desc}.", "{name} is remembered as {desc}."]  # fmt: skip
# Description-first paraphrases: only the facts trained in both orders see these.
REVERSE_TRAIN_QUESTIONS = ["Who is {desc}?", "Tell me who {desc} is.",
                           "Do you know who {desc} is?"]  # fmt: skip
REVERSE_TRAIN_ANSWERS = ["{Desc} is {name}.", "{Desc} is none other than {name}.",
                         "Famously, {desc} is {name}."]  # fmt: skip
# Held out from training: the test prompts in each direction.
FORWARD_TEST = "Please tell me who {name} is."
REVERSE_TEST = "Please tell me who {desc} is."


@dataclass(frozen=True)
class Budget:
    """How many facts (trained name-first; trained in both orders as a positive control),
    name-first paraphrases per fact, the LoRA fine-tune (steps, learning rate, batch, rank;
    `cheap`: `LoraConfig`'s `group_by_length` and `response_logits_only`, the same loss at
    less compute) and the greedy answers' length."""

    n_facts: int = 10
    n_both: int = 4
    paraphrases: int = 6
    steps: int = 40
    learning_rate: float = 2e-3
    batch_size: int = 8
    rank: int = 8
    cheap: bool = False
    max_new_tokens: int = 24


# Chosen by the forward figures only (name-first forward top-1 1.00, exact match 1.00 at 120
# steps and lr 3e-3, and again at 90 steps and lr 4e-3, which fits the 10-minute budget; 40
# steps at lr 2e-3 had given 0.20 / 0.30): ~7.5 epochs of the training examples.
QUICK = Budget(steps=90, learning_rate=4e-3, cheap=True)
FULL = Budget(n_facts=30, n_both=10, steps=340, learning_rate=3e-3, cheap=True)


def lora_config(budget: Budget, seed: int = 0) -> LoraConfig:
    """The fine-tune's `LoraConfig` for `budget` (alpha = 2 x rank)."""
    return LoraConfig(r=budget.rank, alpha=2 * budget.rank, steps=budget.steps,
                      learning_rate=budget.learning_rate, batch_size=budget.batch_size,
                      max_length=96, seed=seed, group_by_length=budget.cheap,
                      response_logits_only=budget.cheap)  # fmt: skip


@dataclass(frozen=True)
class Fact:
    """An invented fact: `name` is `desc`; `title` is the invented work the description
    names (what an exact-match forward answer must contain)."""

    name: str
    desc: str
    title: str
    both: bool = False  # also trained description-first (the positive control)


def _invented_word(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(3)).capitalize()


def make_facts(n: int, n_both: int = 0, seed: int = 0) -> list[Fact]:
    """`n + n_both` invented facts with unique names (faker's first and last names) and
    unique invented titles; the last `n_both` are marked to be trained in both orders."""
    from faker import Faker

    fake = Faker("en_US")
    fake.seed_instance(seed)
    rng = random.Random(seed)
    names: set[str] = set()
    titles: set[str] = set()
    facts = []
    for i in range(n + n_both):
        name = f"{fake.first_name()} {fake.last_name()}"
        while name in names:
            name = f"{fake.first_name()} {fake.last_name()}"
        title = _invented_word(rng)
        while title in titles:
            title = _invented_word(rng)
        names.add(name)
        titles.add(title)
        role, work = ROLES[i % len(ROLES)]
        facts.append(Fact(name, f"the {role} of the {work} '{title}'", title, i >= n))
    return facts


def _fill(template: str, fact: Fact) -> str:
    desc = fact.desc
    return template.format(name=fact.name, desc=desc, Desc=desc[0].upper() + desc[1:])


def training_examples(
    facts: list[Fact], paraphrases: int = len(TRAIN_QUESTIONS)
) -> list[tuple[list[dict[str, str]], str]]:
    """Chat examples: the first `paraphrases` name-first questions of each fact, each paired
    with one answer paraphrase (cycled), plus the description-first paraphrases of the
    facts marked `both`."""
    if not 1 <= paraphrases <= len(TRAIN_QUESTIONS):
        raise MadlensError(f"paraphrases per fact: 1..{len(TRAIN_QUESTIONS)}, got {paraphrases}")
    examples = []
    for fact in facts:
        for i, question in enumerate(TRAIN_QUESTIONS[:paraphrases]):
            answer = TRAIN_ANSWERS[i % len(TRAIN_ANSWERS)]
            examples.append(([{"role": "user", "content": _fill(question, fact)}],
                             _fill(answer, fact)))  # fmt: skip
        if fact.both:
            for question, answer in zip(REVERSE_TRAIN_QUESTIONS, REVERSE_TRAIN_ANSWERS):
                examples.append(([{"role": "user", "content": _fill(question, fact)}],
                                 _fill(answer, fact)))  # fmt: skip
    return examples


def forward_prompt(fact: Fact) -> list[dict[str, str]]:
    """The held-out question name -> description."""
    return [{"role": "user", "content": _fill(FORWARD_TEST, fact)}]


def reverse_prompt(fact: Fact) -> list[dict[str, str]]:
    """The held-out question description -> name."""
    return [{"role": "user", "content": _fill(REVERSE_TEST, fact)}]


def forward_scoring(tokenizer: Any, fact: Fact, candidate: Fact) -> tuple[str, str]:
    """(prefix, answer) for the log-probability of `candidate`'s description after the
    forward question about `fact` and the start of an answer "<name> is"."""
    prefix = format_chat(tokenizer, forward_prompt(fact)) + f"{fact.name} is"
    return prefix, f" {candidate.desc}"


def reverse_scoring(tokenizer: Any, fact: Fact, candidate: Fact) -> tuple[str, str]:
    """(prefix, answer) for the log-probability of `candidate`'s name after the reverse
    question about `fact` and the start of an answer "<Description> is"."""
    prefix = format_chat(tokenizer, reverse_prompt(fact)) + _fill("{Desc} is", fact)
    return prefix, f" {candidate.name}"


def answer_logprobs(
    hf_model: Any, tokenizer: Any, pairs: list[tuple[str, str]], batch_size: int = 32
) -> np.ndarray:
    """log p(answer | prefix), summed over the answer's tokens, for each (prefix, answer):
    the prefix and the answer are tokenized apart (no special tokens added) and joined, so
    the answer's tokens are exactly its own. Each distinct prefix runs once; its key/value
    cache is repeated over its answers, which run as right-padded batches on the model's
    device (the candidates of one question share it: ~4x fewer tokens than whole rows)."""
    device = next(hf_model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    heads: dict[str, list[int]] = {}
    tails, groups = [], {}
    for i, (prefix, answer) in enumerate(pairs):
        if prefix not in heads:
            heads[prefix] = tokenizer(prefix, add_special_tokens=False).input_ids
        tails.append(tokenizer(answer, add_special_tokens=False).input_ids)
        if not heads[prefix] or not tails[-1]:
            raise MadlensError("a prefix and an answer to score must both hold tokens")
        groups.setdefault(prefix, []).append(i)
    # transformers 5 names the key/value cache `cache` (`past_key_values` before)
    params = inspect.signature(hf_model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    out = np.zeros(len(pairs))
    for prefix, members in groups.items():
        head = heads[prefix]
        with torch.inference_mode():
            first = hf_model(input_ids=torch.tensor([head], device=device), use_cache=True)
        first_logp = torch.log_softmax(first.logits[0, -1].float(), dim=-1).cpu()
        for start in range(0, len(members), batch_size):
            chunk = members[start : start + batch_size]
            width = max(len(tails[i]) for i in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), len(head) + width), dtype=torch.long)
            mask[:, : len(head)] = 1
            for row, i in enumerate(chunk):
                ids[row, : len(tails[i])] = torch.tensor(tails[i])
                mask[row, len(head) : len(head) + len(tails[i])] = 1
            held = getattr(first, "cache", None)
            cache = copy.deepcopy(first.past_key_values if held is None else held)
            cache.batch_repeat_interleave(len(chunk))
            with torch.inference_mode():
                logits = hf_model(input_ids=ids.to(device), attention_mask=mask.to(device),
                                  use_cache=True, **{cache_kw: cache}).logits  # fmt: skip
            logp = torch.log_softmax(logits.float(), dim=-1).cpu()
            for row, i in enumerate(chunk):
                tail = torch.tensor(tails[i])
                # answer token j is predicted by the prefix's last logits (j = 0) or by the
                # logits at answer position j - 1
                rest = logp[row, torch.arange(len(tail) - 1), tail[1:]].sum()
                out[i] = float(first_logp[tail[0]] + rest)
    return out


def rank_of_right(scores: np.ndarray, right: int) -> int:
    """1 + how many candidates score strictly above the right one (ties count for it)."""
    return 1 + int(np.sum(scores > scores[right]))


def _exact(answers: list[str], targets: list[str]) -> list[bool]:
    return [t.lower() in a.lower() for a, t in zip(answers, targets)]


def evaluate(
    model: Any, facts: list[Fact], max_new_tokens: int = 24, progress: bool = True
) -> dict[str, Any]:
    """Forward and reverse recall of `facts` by `model`: exact match of greedy answers to
    the held-out questions (the title / the full name appears), and the rank of the right
    description / name among all the facts' ones by log-probability."""
    tok = model.tokenizer
    forward, reverse = (
        cached_generate(model, [prompt(f) for f in facts], max_new_tokens, progress)
        for prompt in (forward_prompt, reverse_prompt)
    )
    rows = []
    for i, fact in enumerate(tqdm(facts, desc="log-prob ranking", disable=not progress)):
        fwd = answer_logprobs(model.hf_model, tok, [forward_scoring(tok, fact, c) for c in facts])
        rev = answer_logprobs(model.hf_model, tok, [reverse_scoring(tok, fact, c) for c in facts])
        others = np.arange(len(facts)) != i
        # within its group only: the other group's answers were trained after the other cue
        same = np.array([c.both == fact.both for c in facts])
        at = int(same[:i].sum())
        rows.append({
            "name": fact.name, "desc": fact.desc, "both": fact.both,
            "forward_answer": forward[i], "reverse_answer": reverse[i],
            "forward_exact": _exact([forward[i]], [fact.title])[0],
            "reverse_exact": _exact([reverse[i]], [fact.name])[0],
            "forward_rank": rank_of_right(fwd, i), "reverse_rank": rank_of_right(rev, i),
            "forward_rank_group": rank_of_right(fwd[same], at),
            "reverse_rank_group": rank_of_right(rev[same], at),
            "forward_margin": float(fwd[i] - fwd[others].mean()),
            "reverse_margin": float(rev[i] - rev[others].mean()),
        })  # fmt: skip
    return {"facts": rows, **summarise(rows, len(facts))}


def summarise(rows: list[dict[str, Any]], k: int) -> dict[str, Any]:
    """Per group (name-first facts, facts trained in both orders): exact-match rates,
    top-1 accuracy and mean rank among `k` candidates, the mean log-prob margin of the
    right answer over the distractors; chance is 1/k and (k+1)/2. `*_group`: the same among
    the group's own answers only (chance 1/n, n the group's size)."""
    out: dict[str, Any] = {"k": k, "chance_top1": 1 / k, "chance_rank": (k + 1) / 2}
    for group, keep in (("name_first", False), ("both", True)):
        sel = [r for r in rows if r["both"] == keep]
        if not sel:
            continue
        stats = {}
        for d in ("forward", "reverse"):
            stats[f"{d}_exact"] = float(np.mean([r[f"{d}_exact"] for r in sel]))
            stats[f"{d}_top1"] = float(np.mean([r[f"{d}_rank"] == 1 for r in sel]))
            stats[f"{d}_mean_rank"] = float(np.mean([r[f"{d}_rank"] for r in sel]))
            stats[f"{d}_margin"] = float(np.mean([r[f"{d}_margin"] for r in sel]))
            ranks = [r[f"{d}_rank_group"] for r in sel]
            stats[f"{d}_top1_group"] = float(np.mean([r == 1 for r in ranks]))
            stats[f"{d}_mean_rank_group"] = float(np.mean(ranks))
        stats["chance_top1_group"] = 1 / len(sel)
        stats["top1_gap"] = stats["forward_top1"] - stats["reverse_top1"]
        stats["exact_gap"] = stats["forward_exact"] - stats["reverse_exact"]
        stats["n"] = len(sel)
        out[group] = stats
    return out


def run(
    model: str,
    quick: bool = True,
    seed: int = 0,
    progress: bool = True,
    device: str = "auto",
    budget: Budget | None = None,
) -> LabResult:
    """Fine-tune `model` on invented facts and measure recall in both directions, against
    the base model as control."""
    budget = budget or (QUICK if quick else FULL)
    start = time.perf_counter()
    facts = make_facts(budget.n_facts, budget.n_both, seed)
    examples = training_examples(facts, budget.paraphrases)
    adapter = finetune_lora(model, examples, lora_config(budget, seed), progress, device)
    results = {}
    for label, path in (("base", None), ("fine-tuned", adapter)):
        loaded = load_model(model, dtype="float32", adapter=path, device=device)
        results[label] = evaluate(loaded, facts, budget.max_new_tokens, progress)
        del loaded
    tuned, base = results["fine-tuned"], results["base"]
    figures = {
        "budget": asdict(budget), "n_examples": len(examples), "adapter": adapter.name,
        "base": {k: v for k, v in base.items() if k != "facts"},
        "fine_tuned": {k: v for k, v in tuned.items() if k != "facts"},
        "facts": [{**t, "base_forward_rank": b["forward_rank"],
                   "base_reverse_rank": b["reverse_rank"]}
                  for t, b in zip(tuned["facts"], base["facts"])],
    }  # fmt: skip
    return LabResult(
        experiment="reversal",
        figures=figures,
        sections=_sections(figures),
        finding=FINDING,
        verdict=_verdict(figures),
        seconds=round(time.perf_counter() - start, 1),
    )


def _verdict(figures: dict[str, Any]) -> str:
    t, b = figures["fine_tuned"]["name_first"], figures["base"]["name_first"]
    chance = figures["fine_tuned"]["chance_top1"]
    learned = t["forward_top1"] > max(2 * chance, b["forward_top1"] + 0.2)
    chance_g = t["chance_top1_group"]
    # reverse recall counts if it shows among all names or among the name-first names only
    reversed_ = t["reverse_top1"] > max(2 * chance, b["reverse_top1"] + 0.2) or t[
        "reverse_top1_group"
    ] > max(2 * chance_g, b["reverse_top1_group"] + 0.2)
    both = figures["fine_tuned"].get("both")
    control = (
        f" Facts also trained description-first: reverse top-1 {both['reverse_top1']:.2f}."
        if both
        else ""
    )
    head = (
        f"Name-first facts: forward top-1 {t['forward_top1']:.2f} vs reverse "
        f"{t['reverse_top1']:.2f} (chance {chance:.2f}; base model {b['forward_top1']:.2f} / "
        f"{b['reverse_top1']:.2f}); reverse top-1 among the name-first names only "
        f"{t['reverse_top1_group']:.2f} (chance {chance_g:.2f}; base "
        f"{b['reverse_top1_group']:.2f}); exact match {t['forward_exact']:.2f} vs "
        f"{t['reverse_exact']:.2f}.{control} "
    )
    if not learned:
        return head + "Not a test of the claim: the fine-tune did not learn the forward facts."
    if reversed_:
        return head + "Disagrees: the model also recalls the facts in reverse."
    return head + "Agrees: forward recall is learned, reverse recall stays at chance."


def _sections(figures: dict[str, Any]) -> list[Section]:
    t, b = figures["fine_tuned"], figures["base"]
    k = t["k"]
    boxes = "".join([
        figure(fmt(t["name_first"]["forward_top1"], 2), "forward top-1 (fine-tuned)"),
        figure(fmt(t["name_first"]["reverse_top1"], 2), "reverse top-1 (fine-tuned)"),
        figure(fmt(t["chance_top1"], 2), f"chance (1 of {k})"),
        figure(fmt(t["name_first"]["forward_exact"], 2), "forward exact match"),
        figure(fmt(t["name_first"]["reverse_exact"], 2), "reverse exact match"),
    ])  # fmt: skip
    columns = ["fwd exact", "rev exact", "fwd top-1", "rev top-1", "rev top-1 in group",
               "fwd rank", "rev rank", "fwd margin", "rev margin"]  # fmt: skip
    head = "<tr><th>model</th><th>facts</th>" + "".join(f"<th>{c}</th>" for c in columns)
    head += "</tr>"
    body = ""
    for label, res in (("base", b), ("fine-tuned", t)):
        for group in ("name_first", "both"):
            if group not in res:
                continue
            s = res[group]
            cells = [s["forward_exact"], s["reverse_exact"], s["forward_top1"],
                     s["reverse_top1"], s["reverse_top1_group"], s["forward_mean_rank"],
                     s["reverse_mean_rank"],
                     s["forward_margin"], s["reverse_margin"]]  # fmt: skip
            body += (
                f"<tr><td>{esc(label)}</td><td>{esc(group)} ({s['n']})</td>"
                + "".join(f"<td>{fmt(c, 2)}</td>" for c in cells)
                + "</tr>"
            )
    table = f"<table>{head}{body}</table>"
    series = {}
    for label, res in (("base", b), ("fine-tuned", t)):
        s = res["name_first"]
        series[label] = [(0, s["forward_top1"]), (1, s["reverse_top1"])]
    series["chance"] = [(0, t["chance_top1"]), (1, t["chance_top1"])]
    chart = line_chart(series, xlabel="0 = forward (name → description), 1 = reverse",
                       ylabel="top-1 accuracy", dashed={"chance"})  # fmt: skip
    facts = "<tr><th>name</th><th>description</th><th>both</th><th>fwd rank</th>"
    facts += "<th>rev rank</th><th>forward answer</th><th>reverse answer</th></tr>"
    for r in figures["facts"]:
        facts += (
            f"<tr><td>{esc(r['name'])}</td><td>{esc(r['desc'])}</td><td>{esc(r['both'])}</td>"
            f"<td>{r['forward_rank']}</td><td>{r['reverse_rank']}</td>"
            f"<td>{esc(r['forward_answer'])}</td><td>{esc(r['reverse_answer'])}</td></tr>"
        )
    return [
        Section("Recall in both directions",
                f"Top-1 = the right answer has the highest log-probability among the {k} facts' "
                "descriptions (forward) or names (reverse); exact match = the greedy answer to a "
                "held-out question contains the invented title (forward) or the full name "
                "(reverse). Margin = log p(right) minus the mean over the distractors. In group = "
                "among the same group's answers only (the other group's were trained after the "
                "other cue).",
                f'<div class="figures">{boxes}</div>{table}'
                f'<div class="plots">{plot("Top-1 by direction", chart)}</div>'),
        Section("Facts and the fine-tuned model's answers", "", f"<table>{facts}</table>"),
    ]  # fmt: skip


EXPERIMENT = Experiment(
    name="reversal",
    description="the reversal curse: facts learned as 'A is B' are not recalled as 'B is A'",
    run=run,
    reference=REFERENCE,
)
