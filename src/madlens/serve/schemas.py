"""The request bodies `madlens serve` accepts (pydantic v2) and OpenAI's error shape.

Fields are strict (a string is never read as a number, a number never as a boolean) and
bounded; unknown fields are ignored, as OpenAI ignores them. Server-side limits (the number of
messages, the context length) are checked by the app and the engine, which know them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

ROLES = ("system", "user", "assistant")
MAX_STOP = 4  # stop sequences per request, as OpenAI allows
MAX_SEED = 2**63 - 1


def _utf8(value: str) -> str:
    """Text that encodes as UTF-8: JSON can carry lone surrogates (`"\\ud800"`), which no
    tokenizer reads."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"not UTF-8 text ({exc.reason})") from None
    return value


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class TextPart(_Body):
    """One part of a message's content in OpenAI's list form; only text parts are read."""

    type: Literal["text"]
    text: str

    _check_text = field_validator("text")(_utf8)


class ChatMessage(_Body):
    """One turn: `role` system, user or assistant; `content` a string or a list of text
    parts (joined)."""

    role: Literal["system", "user", "assistant"]
    content: str | Annotated[list[TextPart], Field(max_length=1024)]

    @field_validator("content")
    @classmethod
    def _check_content(cls, value: str | list[TextPart]) -> str | list[TextPart]:
        return _utf8(value) if isinstance(value, str) else value

    def text(self) -> str:
        """The content as one string."""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


def plain_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """Messages as the `{"role", "content"}` dicts madlens's chat formatting reads."""
    return [{"role": m.role, "content": m.text()} for m in messages]


class StreamOptions(_Body):
    include_usage: bool = False


class ChatCompletionRequest(_Body):
    """`POST /v1/chat/completions`: OpenAI's request, the fields madlens honours."""

    model: str | None = Field(None, description="the served model's id (see /v1/models)")
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=1_000_000)
    max_completion_tokens: int | None = Field(None, ge=1, le=1_000_000)
    temperature: float | None = Field(None, ge=0, le=2, description="0: greedy; default 1")
    top_p: float | None = Field(None, ge=0, le=1)
    n: int | None = Field(None, ge=1, le=128, description="only 1 is supported")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=-(2**63), le=MAX_SEED)
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None

    @field_validator("model")
    @classmethod
    def _check_model(cls, value: str | None) -> str | None:
        return None if value is None else _utf8(value)

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        for item in [value] if isinstance(value, str) else value or []:
            if not item:
                raise ValueError("stop sequences must not be empty")
            _utf8(item)
        return value

    def stops(self) -> list[str]:
        """The stop sequences as a list."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ScoreRequest(_Body):
    """`POST /v1/monitor/score`: a prompt, or a prompt and its answer, to score without
    generating."""

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)

    @field_validator("model")
    @classmethod
    def _check_model(cls, value: str | None) -> str | None:
        return None if value is None else _utf8(value)


def error_body(
    message: str,
    param: str | None = None,
    code: str | None = None,
    kind: str = "invalid_request_error",
) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def param_of(loc: tuple[Any, ...] | list[Any]) -> str | None:
    """A pydantic error location as the field it names: `("body", "messages", 0, "role")`
    is `messages[0].role`; the body as a whole is None."""
    parts = [p for p in loc if p != "body"]
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and not _is_type_tag(part):
            out += f".{part}" if out else part
    return out or None


def _is_type_tag(part: str) -> bool:
    # pydantic names union members in locations: `content.str`, `content.list[TextPart]`
    return (
        part in ("str", "int", "float", "bool")
        or "[" in part
        or part.startswith(("function-", "constrained-", "json-"))
    )
