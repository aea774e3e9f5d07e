"""`ood`: trusted English chat questions; test = held-out English questions (normal) vs
other domains (code, other languages, base64-encoded prompts, random strings)."""

import numpy as np

from madlens.data import user
from madlens.data.generators import (
    base64_prompts,
    code_snippets,
    english_questions,
    foreign_sentences,
    random_strings,
)
from madlens.tasks.base import Task


def build_ood(
    model: str, quick: bool = True, seed: int = 0, progress: bool = True, check: bool = True,
    device: str = "auto",
) -> Task:  # fmt: skip
    """No fine-tune: the base model, last prompt token (builds no model: `device` is
    unused)."""
    n_trusted, n_group = (128, 24) if quick else (400, 60)
    questions = english_questions(n_trusted + n_group * 2, seed)
    trusted, normal, encoded = (
        questions[:n_trusted], questions[n_trusted : n_trusted + n_group],
        questions[n_trusted + n_group :],
    )  # fmt: skip
    domains = {
        "code": code_snippets(n_group, seed),
        "foreign": foreign_sentences(n_group, seed),
        "base64": base64_prompts(encoded),
        "random": random_strings(n_group, seed),
    }
    test = normal + [x for texts in domains.values() for x in texts]
    groups = ["english"] * n_group + [g for g, texts in domains.items() for _ in texts]

    return Task(
        name="ood", model=model, trusted=[user(q) for q in trusted],
        test=[user(x) for x in test], labels=np.r_[np.zeros(n_group), np.ones(len(test) - n_group)],
        untrusted=[user(x) for x in test], position="last", groups=groups,
        description="English chat questions vs code, other languages, base64, random strings. "
        "The novelty sanity check: there is no mechanism here, only novelty, so every cue "
        "(tokens unseen in trusted data, length, format) separates it by design and no group "
        "controls it; a detector that fails here fails at novelty itself",
    )  # fmt: skip
