"""Position specs: which token positions of each input become activation rows.

`last` (the final token; for a prompt, the one before the model answers), `all` (every
token), `response` (every token of the final assistant message), `mean` (their mean).
"""

from dataclasses import dataclass
from typing import Any

from madlens.data import format_chat, response_span
from madlens.errors import MadlensError

POSITIONS = ("last", "all", "response", "mean")


@dataclass(frozen=True)
class Encoded:
    """One tokenised input: its token ids, the [start, end) token span whose activations
    are kept (or averaged), and whether the input was truncated."""

    input_ids: list[int]
    span: tuple[int, int]
    truncated: bool
    scored: tuple[int, int]  # the tokens whose log-probs are returned


def check_position(position: str) -> str:
    """Validate a position spec name."""
    if position not in POSITIONS:
        raise MadlensError(f"unknown position '{position}'; choose one of {', '.join(POSITIONS)}")
    return position


def encode(
    tokenizer: Any, item: str | list[dict[str, str]] | list[int], position: str, max_length: int
) -> Encoded:
    """Tokenise one text or conversation (token-id lists pass through as they are) and
    locate the span `position` selects.

    Inputs longer than `max_length` keep their last `max_length` tokens, so the final
    (prompt) token, which detectors read most, is never the one cut.
    """
    char_span = None
    if isinstance(item, list) and item and all(isinstance(t, int) for t in item):
        if position in ("response", "mean"):
            raise MadlensError(f"position '{position}' needs conversations, not token ids")
        ids = item[-max_length:]
        span = (len(ids) - 1, len(ids)) if position == "last" else (0, len(ids))
        return Encoded(list(ids), span, len(item) > max_length, (1, len(ids)))
    if isinstance(item, str):
        if position in ("response", "mean"):
            raise MadlensError(
                f"position '{position}' needs conversations ending with an assistant turn, "
                "not plain text"
            )
        text = item
    elif position in ("response", "mean"):
        try:
            text, start, end = response_span(tokenizer, item)
        except ValueError as exc:
            raise MadlensError(f"position '{position}': {exc}") from exc
        char_span = (start, end)
    else:
        text = format_chat(tokenizer, item)
    # A conversation's log-probs cover its last message's text (the user's prompt, or the
    # answer): the chat template around it is the same for every input.
    message_span = None
    if not isinstance(item, str):
        content = item[-1]["content"]
        start = text.rfind(content) if content else -1
        message_span = (start, start + len(content)) if start >= 0 else None
    encoding = tokenizer(text, return_offsets_mapping=True)
    ids = list(encoding["input_ids"])
    if not ids:
        raise MadlensError("an input is empty after tokenisation")

    def tokens_in(chars: tuple[int, int]) -> tuple[int, int] | None:
        inside = [
            i
            for i, (a, b) in enumerate(encoding["offset_mapping"])
            if b > chars[0] and a < chars[1]
        ]
        return (inside[0], inside[-1] + 1) if inside else None

    if char_span is None:
        span = (len(ids) - 1, len(ids)) if position == "last" else (0, len(ids))
    else:
        span = tokens_in(char_span)
        if span is None:
            raise MadlensError(f"position '{position}': the assistant response is empty")
    scored = (1, len(ids))
    if message_span is not None:
        found = tokens_in(message_span)
        scored = (max(1, found[0]), found[1]) if found else scored
    cut = max(0, len(ids) - max_length)
    if cut:
        ids = ids[cut:]
        span = (max(0, span[0] - cut), span[1] - cut)
        scored = (max(1, scored[0] - cut), max(1, scored[1] - cut))
        if span[1] <= 0:
            raise MadlensError(f"position '{position}': the span was cut away by truncation")
    return Encoded(ids, span, truncated=cut > 0, scored=scored)
