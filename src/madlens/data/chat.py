"""The one chat-formatting function: a conversation (system / user / assistant turns)
becomes the model's prompt text through its tokenizer's own chat template."""

from typing import Any

Message = dict[str, str]
ROLES = ("system", "user", "assistant")


def user(text: str) -> list[Message]:
    """A one-turn conversation: `text` as the user's message."""
    return [{"role": "user", "content": text}]


def validate_messages(messages: Any, where: str = "conversation") -> list[Message]:
    """Check that `messages` is a non-empty list of {"role", "content"} with known roles."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not {"role", "content"} <= set(message):
            raise ValueError(f"{where}: message {i} needs 'role' and 'content'")
        if message["role"] not in ROLES:
            raise ValueError(
                f"{where}: message {i} has role '{message['role']}', not one of {', '.join(ROLES)}"
            )
        if not isinstance(message["content"], str):
            raise ValueError(f"{where}: message {i} content must be a string")
    return messages


def format_chat(
    tokenizer: Any, messages: list[Message], add_generation_prompt: bool | None = None
) -> str:
    """Render `messages` with the tokenizer's chat template.

    `add_generation_prompt` defaults to True when the last turn is not the assistant's, so
    a prompt ends where the model starts answering, and a full transcript ends after the
    answer's end-of-turn token.
    """
    validate_messages(messages)
    if add_generation_prompt is None:
        add_generation_prompt = messages[-1]["role"] != "assistant"
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def response_span(tokenizer: Any, messages: list[Message]) -> tuple[str, int, int]:
    """The formatted transcript and the character span of the final assistant message's
    content in it (the response the model gave)."""
    validate_messages(messages)
    if messages[-1]["role"] != "assistant":
        raise ValueError("the conversation does not end with an assistant turn")
    prefix = format_chat(tokenizer, messages[:-1], add_generation_prompt=True)
    full = format_chat(tokenizer, messages, add_generation_prompt=False)
    content = messages[-1]["content"]
    start = full.find(content, len(prefix))
    if not full.startswith(prefix) or start < 0:
        raise ValueError("the chat template does not render the prompt as a prefix of the turn")
    return full, start, start + len(content)
