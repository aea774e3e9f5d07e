import torch

from madlens.circuits.probes import attention_probes, repeated_tokens, scores_from_patterns
from madlens.models.tiny import tiny_tokenizer


def test_repeated_tokens_repeat_distinct_ordinary_tokens():
    tokenizer = tiny_tokenizer()
    tokens = repeated_tokens(tokenizer, n_sequences=5, length=12, seed=1)
    assert tokens.shape == (5, 25)
    assert (tokens[:, 0] == tokenizer.bos_token_id).all()
    assert torch.equal(tokens[:, 1:13], tokens[:, 13:])
    special = set(tokenizer.all_special_ids)
    for row in tokens:
        half = row[1:13].tolist()
        assert len(set(half)) == 12 and not special & set(half)
    assert torch.equal(tokens, repeated_tokens(tokenizer, 5, 12, seed=1))


def one_hot_pattern(length, key_of):
    """A (1, 1, T, T) pattern attending from each query t to key_of(t) (or to BOS)."""
    size = 2 * length + 1
    pattern = torch.zeros(1, 1, size, size)
    for t in range(size):
        key = key_of(t)
        pattern[0, 0, t, key if key is not None and 0 <= key <= t else 0] = 1.0
    return pattern


def test_scores_are_one_for_the_ideal_pattern_and_zero_otherwise():
    n = 6
    previous = one_hot_pattern(n, lambda t: t - 1)
    duplicate = one_hot_pattern(n, lambda t: t - n if t > n else None)
    induction = one_hot_pattern(n, lambda t: t - n + 1 if t > n else None)
    patterns = torch.cat([previous, duplicate, induction], dim=1)  # three heads
    scores = scores_from_patterns(patterns, n)
    # Only the first query's fallback to BOS (position 0 = t - 1) counts for the others.
    expected = torch.tensor([1.0, 1 / (2 * n), 1 / (2 * n)])
    torch.testing.assert_close(scores["previous_token"], expected)
    torch.testing.assert_close(scores["duplicate_token"], torch.tensor([0.0, 1.0, 0.0]))
    # The last query's "token after the earlier copy" is itself, so it is left out.
    torch.testing.assert_close(scores["induction"], torch.tensor([0.0, 0.0, 1.0]))


def test_probes_find_the_planted_previous_token_head(planted):
    scores = attention_probes(planted, n_sequences=4, length=10)
    assert scores["previous_token"].shape == (1, 4)
    assert scores["previous_token"][0, 3] > 0.99  # planted: query i matches key i - 1
    assert scores["previous_token"][0, :3].max() < 0.2
    assert scores["induction"].max() < 0.2  # one layer cannot do induction
