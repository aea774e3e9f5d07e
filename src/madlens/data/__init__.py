"""Data: chat formatting (the one function that turns a conversation into prompt text),
JSONL read/write, and (later) the procedural dataset generators."""

from madlens.data.chat import Message, format_chat, response_span, user, validate_messages
from madlens.data.jsonl import read_inputs, read_jsonl, record_input, write_jsonl

__all__ = [
    "Message",
    "format_chat",
    "read_inputs",
    "read_jsonl",
    "record_input",
    "response_span",
    "user",
    "validate_messages",
    "write_jsonl",
]
