"""Indirect-object-identification prompts: templates, single-token names, ABBA / BABA orders
and the paired ABC corruption, tokenized and aligned position by position. Seeded."""

import random
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from madlens.errors import MadlensError

# Written in ABBA order: [A] is the indirect object, [B] the subject (named twice). BABA
# swaps the first two names. Most follow the IOI paper (Wang et al. 2022) and TransformerLens's
# replication of it.
TEMPLATES = [
    "When [A] and [B] went to the [PLACE], [B] gave a [OBJECT] to [A]",
    "Then, [A] and [B] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [A] and [B] had a lot of fun at the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [A] and [B] were working at the [PLACE]. [B] decided to give a [OBJECT] to [A]",
    "Then, [A] and [B] were thinking about going to the [PLACE]. [B] wanted to give a [OBJECT] "
    "to [A]",
    "After [A] and [B] went to the [PLACE], [B] gave a [OBJECT] to [A]",
    "When [A] and [B] got a [OBJECT] at the [PLACE], [B] decided to give it to [A]",
    "While [A] and [B] were working at the [PLACE], [B] gave a [OBJECT] to [A]",
    "While [A] and [B] were commuting to the [PLACE], [B] gave a [OBJECT] to [A]",
    "Afterwards, [A] and [B] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Friends [A] and [B] found a [OBJECT] at the [PLACE]. [B] gave it to [A]",
    "Then, [A] and [B] had a long argument. Afterwards [B] said to [A]",
]
NAMES = [
    "Mary", "John", "Tom", "James", "Dan", "Sid", "Martin", "Amy", "Anna", "Kate", "Sarah",
    "Lisa", "Paul", "Mark", "Ben", "Laura", "Emma", "David", "Michael", "Robert", "Daniel",
    "Jessica", "Jennifer", "Rachel", "Andrew", "Chris", "Steve", "Alice", "Bob", "Peter",
    "Henry", "George", "Jack", "Harry", "Charlie", "Lucy", "Sophie", "Grace", "Ryan", "Adam",
    "Eric", "Kevin", "Brian", "Jason", "Matt", "Nick", "Sam", "Joe", "Tim", "Jane", "Helen",
    "Linda", "Susan", "Karen", "Nancy", "Rose", "Julia", "Victoria", "Oliver", "Thomas",
]  # fmt: skip
PLACES = ["store", "garden", "restaurant", "school", "hospital", "office", "station", "house",
          "park", "market", "library", "beach"]  # fmt: skip
OBJECTS = ["drink", "ring", "book", "bone", "computer", "necklace", "snack", "ball", "letter",
           "bag", "gift", "key"]  # fmt: skip
# When a tokenizer splits every common name (byte-level tokenizers, `tiny-test`), capital
# letters stand in for names: a random model has no preference between them either.
LETTER_NAMES = [chr(c) for c in range(ord("A"), ord("Z") + 1)]
ORDERS = ("ABBA", "BABA")
POSITION_NAMES = ("IO", "S1", "S1+1", "S2", "END")
MIN_NAMES = 5


@dataclass
class IOIDataset:
    """Clean IOI prompts and their ABC corruptions, tokenized and right-padded.

    `tokens[i, :lengths[i]]` is prompt `i` (it ends just before the answer); the corrupted
    prompt has the same template, place and object but three fresh names, so both are the same
    length and every position lines up. `positions[name][i]` is the token index of IO, S1,
    S1+1 (the token after S1), S2 and END (the last prompt token) in prompt `i`.
    """

    prompts: list[str]
    corrupted_prompts: list[str]
    tokens: torch.Tensor
    corrupted_tokens: torch.Tensor
    lengths: torch.Tensor
    io_tokens: torch.Tensor
    s_tokens: torch.Tensor
    positions: dict[str, torch.Tensor]
    template_ids: torch.Tensor
    orders: list[str]
    io_names: list[str]
    s_names: list[str]
    templates: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def answers(self) -> torch.Tensor:
        """`(n, 2)`: the indirect object's token, then the subject's."""
        return torch.stack([self.io_tokens, self.s_tokens], dim=1)

    @property
    def end(self) -> torch.Tensor:
        """Index of each prompt's last token, where the answer is predicted."""
        return self.positions["END"]

    def groups(self) -> torch.Tensor:
        """Prompts that share a template share every position: the unit for mean-ablation."""
        return self.template_ids


def _spans(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(encoded["input_ids"]), [tuple(span) for span in encoded["offset_mapping"]]


def _token_at(spans: list[tuple[int, int]], start: int, end: int) -> int | None:
    """The one token that covers characters [start, end) (a leading space allowed), else None."""
    touching = [i for i, (a, b) in enumerate(spans) if a < end and b > start]
    if len(touching) != 1:
        return None
    a, b = spans[touching[0]]
    return touching[0] if a >= start - 1 and b <= end else None


def single_token_words(tokenizer: Any, words: list[str], frame: str = "When {} went") -> dict:
    """`{word: token id}` for the words that are one token after a space (inside `frame`)."""
    found = {}
    for word in words:
        text = frame.format(word)
        start = text.index(word)
        ids, spans = _spans(tokenizer, text)
        index = _token_at(spans, start, start + len(word))
        if index is not None:
            found[word] = ids[index]
    ids = list(found.values())
    return {w: t for w, t in found.items() if ids.count(t) == 1}


def _fill(template: str, names: dict[str, str], place: str, obj: str) -> tuple[str, list]:
    """Substitute the slots; return the text and the (slot, start, end) of every name."""
    text, slots = "", []
    rest = template.replace("[PLACE]", place).replace("[OBJECT]", obj)
    while rest:
        cut = [rest.find(s) for s in ("[A]", "[B]", "[C]") if rest.find(s) >= 0]
        if not cut:
            text += rest
            break
        at = min(cut)
        slot = rest[at + 1]
        text += rest[:at]
        slots.append((slot, len(text), len(text) + len(names[slot])))
        text += names[slot]
        rest = rest[at + 3 :]
    return text, slots


def _ordered(template: str, order: str) -> str:
    """BABA: swap the first [A] and the first [B] (the two names of the opening clause)."""
    if order == "ABBA":
        return template
    first_a, first_b = template.index("[A]"), template.index("[B]")
    lo, hi = sorted((first_a, first_b))
    swap = {"[A]": "[B]", "[B]": "[A]"}
    return (
        template[:lo] + swap[template[lo : lo + 3]] + template[lo + 3 : hi]
        + swap[template[hi : hi + 3]] + template[hi + 3 :]
    )  # fmt: skip


def _abc(template: str) -> str:
    """The ABC corruption of a template: its name slots become [A], [B], [C] in order of
    appearance; the final slot (the answer, cut off) stays [A] so the text lines up."""
    out, rest, k = "", template, 0
    while True:
        cut = [rest.find(s) for s in ("[A]", "[B]") if rest.find(s) >= 0]
        if not cut:
            return out + rest
        at = min(cut)
        out += rest[:at] + ("[A]", "[B]", "[C]", "[A]")[min(k, 3)]
        rest = rest[at + 3 :]
        k += 1


def _encode(tokenizer: Any, text: str, slots: list, bos: int | None) -> tuple[list[int], list]:
    """Tokenize a full sentence (answer included) and locate every name's single token."""
    ids, spans = _spans(tokenizer, text)
    where = []
    for _slot, start, end in slots:
        index = _token_at(spans, start, end)
        if index is None:
            raise MadlensError(f"a name in {text!r} is not a single token in context")
        where.append(index)
    offset = 0 if bos is None else 1
    return ([] if bos is None else [bos]) + ids, [i + offset for i in where]


def make_ioi(
    tokenizer: Any,
    n: int = 50,
    seed: int = 0,
    *,
    templates: list[str] | None = None,
    orders: tuple[str, ...] = ORDERS,
    names: list[str] | None = None,
    places: list[str] | None = None,
    objects: list[str] | None = None,
    prepend_bos: bool = True,
) -> IOIDataset:
    """`n` IOI prompts (cycling through templates and orders) with their ABC corruptions.

    Names, places and objects are kept only if they are a single token after a space in this
    tokenizer, so that prompts from one template all have the same length. If fewer than five
    names survive, single capital letters stand in (with a warning). The prompt is plain text,
    not a chat turn: IOI is next-token completion of a sentence.
    """
    if n < 1:
        raise MadlensError("the IOI dataset needs at least one prompt")
    if not orders or any(o not in ORDERS for o in orders):
        raise MadlensError(f"orders must be drawn from {', '.join(ORDERS)}")
    templates = list(templates or TEMPLATES)
    for template in templates:
        if template.count("[A]") != 2 or template.count("[B]") != 2 or not template.endswith("[A]"):
            raise MadlensError(
                f"template must name [A] twice and [B] twice, ending on [A]: {template!r}"
            )
    name_tokens = single_token_words(tokenizer, names or NAMES)
    if len(name_tokens) < MIN_NAMES:
        warnings.warn(
            f"only {len(name_tokens)} of the names are single tokens for this tokenizer; "
            "using capital letters as names",
            stacklevel=2,
        )
        name_tokens = single_token_words(tokenizer, LETTER_NAMES)
    if len(name_tokens) < MIN_NAMES:
        raise MadlensError(
            f"the tokenizer has fewer than {MIN_NAMES} single-token names; IOI needs five "
            "(two for the prompt, three more for its corruption)"
        )
    place_list = list(single_token_words(tokenizer, places or PLACES, "at the {} today")) or [
        (places or PLACES)[0]
    ]
    object_list = list(single_token_words(tokenizer, objects or OBJECTS, "gave a {} to")) or [
        (objects or OBJECTS)[0]
    ]
    bos = None
    if prepend_bos:
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else None
        bos = bos if bos is not None else tokenizer.eos_token_id
    rng = random.Random(seed)
    pool = list(name_tokens)
    rows: list[dict] = []
    for i in range(n):
        t_index = i % len(templates)
        order = orders[(i // len(templates)) % len(orders)]
        template = _ordered(templates[t_index], order)
        io, s, a, b, c = rng.sample(pool, 5)
        place, obj = rng.choice(place_list), rng.choice(object_list)
        text, slots = _fill(template, {"A": io, "B": s}, place, obj)
        ids, where = _encode(tokenizer, text, slots, bos)
        bad_text, bad_slots = _fill(_abc(template), {"A": a, "B": b, "C": c}, place, obj)
        bad_ids, bad_where = _encode(tokenizer, bad_text, bad_slots, bos)
        final = where[-1]
        if len(bad_ids) != len(ids) or bad_where[-1] != final:
            raise MadlensError(f"the corrupted prompt does not line up with {text!r}")
        slot_names = [slot for slot, _, _ in slots]
        first_a, first_b = slot_names.index("A"), slot_names.index("B")
        second_b = len(slot_names) - 1 - slot_names[::-1].index("B")
        rows.append(
            {
                "prompt": text[: slots[-1][1]].rstrip(" "),
                "corrupted": bad_text[: bad_slots[-1][1]].rstrip(" "),
                "ids": ids[:final],
                "bad_ids": bad_ids[:final],
                "io": name_tokens[io],
                "s": name_tokens[s],
                "IO": where[first_a],
                "S1": where[first_b],
                "S2": where[second_b],
                "template": t_index,
                "order": order,
                "io_name": io,
                "s_name": s,
            }
        )
    width = max(len(r["ids"]) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    tokens = torch.full((n, width), pad, dtype=torch.long)
    corrupted = torch.full((n, width), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r["ids"])] = torch.tensor(r["ids"])
        corrupted[i, : len(r["bad_ids"])] = torch.tensor(r["bad_ids"])
    lengths = torch.tensor([len(r["ids"]) for r in rows])
    positions = {
        "IO": torch.tensor([r["IO"] for r in rows]),
        "S1": torch.tensor([r["S1"] for r in rows]),
        "S1+1": torch.tensor([r["S1"] + 1 for r in rows]),
        "S2": torch.tensor([r["S2"] for r in rows]),
        "END": lengths - 1,
    }
    return IOIDataset(
        prompts=[r["prompt"] for r in rows],
        corrupted_prompts=[r["corrupted"] for r in rows],
        tokens=tokens,
        corrupted_tokens=corrupted,
        lengths=lengths,
        io_tokens=torch.tensor([r["io"] for r in rows]),
        s_tokens=torch.tensor([r["s"] for r in rows]),
        positions=positions,
        template_ids=torch.tensor([r["template"] for r in rows]),
        orders=[r["order"] for r in rows],
        io_names=[r["io_name"] for r in rows],
        s_names=[r["s_name"] for r in rows],
        templates=templates,
    )
