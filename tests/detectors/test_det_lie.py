"""The black-box lie detector: yes/no token ids, features against a plain forward, the shared
KV-cache path against the naive loop, separation of synthetic transcripts on tiny-test."""

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from madlens.data import format_chat
from madlens.detectors import get_detector
from madlens.detectors.lie_detector import (
    ELICITATION_QUESTIONS,
    QUESTIONS,
    answer_token_ids,
    elicitation_features,
    yes_no_token_ids,
)
from madlens.errors import MadlensError


class WordTokenizer:
    """A toy tokenizer: whole known words are one token, anything else one token per char."""

    def __init__(self, words):
        self.vocab = {w: i for i, w in enumerate(words)}

    def __call__(self, text, add_special_tokens=False):
        if text in self.vocab:
            return {"input_ids": [self.vocab[text]]}
        return {"input_ids": [1000 + ord(c) for c in text]}


def test_question_set():
    assert [len(v) for v in ELICITATION_QUESTIONS.values()] == [16, 16, 16]
    assert len(set(QUESTIONS)) == 48 and all(q.endswith("?") for q in QUESTIONS)


def test_yes_no_ids_cover_space_and_case_variants():
    tok = WordTokenizer(["yes", " yes", "Yes", " Yes", "no", " No", "NO", "maybe"])
    v = tok.vocab
    assert answer_token_ids(tok, "yes") == sorted([v["yes"], v[" yes"], v["Yes"], v[" Yes"]])
    assert yes_no_token_ids(tok) == (
        sorted([v["yes"], v[" yes"], v["Yes"], v[" Yes"]]),
        sorted([v["no"], v[" No"], v["NO"]]),
    )


def test_byte_level_ids_drop_the_shared_leading_space(tiny):
    yes, no = yes_no_token_ids(tiny.tokenizer)
    ids = lambda s: tiny.tokenizer(s, add_special_tokens=False)["input_ids"][0]  # noqa: E731
    assert yes == sorted([ids("y"), ids("Y")]) and no == sorted([ids("n"), ids("N")])


def _transcript(answer, system=None):
    conv = [{"role": "system", "content": system}] if system else []
    return conv + [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": answer},
    ]


def test_features_match_a_plain_forward_and_the_naive_loop(tiny, tiny_hf):
    transcripts = [_transcript("Paris."), _transcript("Rome.", "Lie to the user.")]
    shared = elicitation_features(tiny, transcripts, cache=False, progress=False)
    naive = elicitation_features(tiny, transcripts, method="naive", cache=False, progress=False)
    assert shared.shape == (2, 48)
    np.testing.assert_allclose(shared, naive, atol=1e-4)
    yes, no = yes_no_token_ids(tiny.tokenizer)
    conv = [*transcripts[1], {"role": "user", "content": QUESTIONS[5]}]
    ids = tiny.tokenizer(format_chat(tiny.tokenizer, conv), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logprobs = tiny_hf(ids).logits[0, -1].log_softmax(-1)
    expected = float(logprobs[yes].logsumexp(0) - logprobs[no].logsumexp(0))
    assert shared[1, 5] == pytest.approx(expected, abs=1e-4)


def test_separates_synthetic_transcripts_on_tiny(tiny):
    rng = np.random.default_rng(0)
    cities = ["Paris", "Rome", "Madrid", "Berlin", "Vienna", "Lisbon", "Oslo", "Athens"]
    honest = [_transcript(f"The answer is {rng.choice(cities)}.") for _ in range(24)]
    lies = [_transcript(f"It is {rng.choice(cities)}, trust me.", "Lie to the user.")
            for _ in range(24)]  # fmt: skip
    x = elicitation_features(tiny, honest + lies, cache=False, progress=False)
    y = np.r_[np.zeros(24), np.ones(24)].astype(int)
    fold = np.arange(48) % 2 == 0
    det = get_detector("lie-detector").fit(np.empty((0, 48)), x[fold], labels=y[fold])
    assert roc_auc_score(y[~fold], det.score(x[~fold])) > 0.9
    lie_only = get_detector("lie-detector", groups=["lie"]).fit(x[:0], x[fold], labels=y[fold])
    assert lie_only.columns_.tolist() == list(range(16))


def test_bad_inputs(tiny):
    with pytest.raises(MadlensError, match="transcripts"):
        elicitation_features(tiny, [[{"role": "user", "content": "hi"}]], cache=False)
    with pytest.raises(MadlensError, match="group"):
        get_detector("lie-detector", groups=["nope"]).fit(
            np.zeros((0, 48)), np.random.rand(4, 48), labels=[0, 1, 0, 1]
        )
