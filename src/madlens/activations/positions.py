"""Position specs: which token positions of each input become activation rows.

`last` (the final token; for a prompt, the one before the model answers), `all` (every
token), `response` (every token of the final assistant message), `mean` (their mean).
"""

import re
from dataclasses import dataclass
from typing import Any

from madlens.data import format_chat, response_span
from madlens.errors import MadlensError

POSITIONS = ("last", "all", "response", "mean")
# Hook shapes already probed, by (weights fingerprint, model name, hook): the trailing
# (per-token) shape of the hook's activations.
_PROBED: dict[tuple[str, str, str], tuple[int, ...]] = {}


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


def check_inputs(inputs: list[Any], position: str) -> None:
    """Fail before any work when `position` cannot read an input: `response` and `mean`
    read the final assistant turn, so they need conversations that end with one."""
    if position not in ("response", "mean"):
        return
    for i, item in enumerate(inputs):
        if not (isinstance(item, list) and item and isinstance(item[-1], dict)):
            raise MadlensError(f"position '{position}' needs conversations ending with an "
                               f"assistant turn; input {i} is not a conversation")  # fmt: skip
        if item[-1].get("role") != "assistant":
            raise MadlensError(f"position '{position}' needs conversations ending with an "
                               f"assistant turn; input {i} ends with a "
                               f"{item[-1].get('role')} turn")  # fmt: skip


def check_chat_template(tokenizer: Any) -> None:
    """Fail with one clear line when a conversation is given to a model without a chat
    template (a base model: it only reads plain text)."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or "this model"
        raise MadlensError(
            f"{name} has no chat template: give it plain 'text' inputs, not 'messages'"
        )


def hook_shapes(
    model: Any, hooks: list[str], position: str | None = None
) -> dict[str, tuple[int, ...]]:
    """The per-token shape of each hook's activations, e.g. `(d_model,)` or `(n_heads,
    d_head)`, from one tiny probe forward pass (remembered per model and hook).

    Every position spec reads a hook's `(batch, position, ...)` tensor along its position
    axis, so a hook whose tensor is laid out otherwise (attention patterns are `(batch, head,
    query, key)`, rotary tables have no batch axis), that never fires, or that the model has
    switched off fails here, before any real work, instead of deep inside extraction."""
    key = (str(getattr(model, "fingerprint", "")), str(getattr(model, "name", "")))
    missing = [h for h in hooks if (*key, h) not in _PROBED]
    if missing:
        _PROBED.update({(*key, h): s for h, s in _probe(model, missing, position).items()})
    return {h: _PROBED[(*key, h)] for h in hooks}


def _probe(model: Any, hooks: list[str], position: str | None) -> dict[str, tuple[int, ...]]:
    import torch

    config = model.hf_model.config
    heads = {getattr(config, "num_attention_heads", 0), getattr(config, "num_key_value_heads", 0)}
    # a sequence length no head count equals, so (batch, head, ...) is never mistaken
    # for (batch, position, ...)
    length = next(n for n in range(3, 1 << 20) if n not in heads)
    batch = 2
    pad = model.tokenizer.pad_token_id or 0
    ids = torch.full((batch, length), pad, dtype=torch.long, device=model.device)
    seen: dict[str, Any] = {}

    def record(name: str) -> Any:
        def hook(tensor: Any, hook: Any) -> None:
            seen.setdefault(name, tensor)

        return hook

    try:
        with torch.inference_mode():
            model.bridge.run_with_hooks(
                ids, fwd_hooks=[(h, record(h)) for h in hooks], return_type=None
            )
    except ValueError as exc:
        found = re.search(r"Cannot add hook (\S+) because (\w+) is False", str(exc))
        if not found:
            raise
        raise MadlensError(
            f"hook '{found[1]}' is switched off in {model.name} ({found[2]} is False)"
        ) from exc
    shapes = {}
    for name in hooks:
        tensor = seen.get(name)
        if tensor is None:
            raise MadlensError(f"hook '{name}' never fires in {model.name}'s forward pass")
        shape = tuple(getattr(tensor, "shape", ()))
        if len(shape) < 3 or shape[:2] != (batch, length):
            at = f"position '{position}'" if position else "any position"
            raise MadlensError(
                f"hook '{name}' cannot be read at {at}: its activations are laid out "
                f"{_layout(shape, batch, length)}, not (batch, position, features)"
            )
        shapes[name] = shape[2:]
    return shapes


def _layout(shape: tuple[int, ...], batch: int, length: int) -> str:
    """A probe tensor's shape with its batch and position axes named."""
    names = ["batch" if i == 0 and n == batch else "position" if n == length else str(n)
             for i, n in enumerate(shape)]  # fmt: skip
    return "(" + ", ".join(names) + ")" if names else "(a scalar)"


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
        check_chat_template(tokenizer)
        try:
            text, start, end = response_span(tokenizer, item)
        except ValueError as exc:
            raise MadlensError(f"position '{position}': {exc}") from exc
        char_span = (start, end)
    else:
        check_chat_template(tokenizer)
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
