import json

import pytest

from madlens.data import format_chat, read_inputs, read_jsonl, response_span, write_jsonl
from madlens.errors import MadlensError

CONV = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4, of course."},
]


def test_format_chat_renders_chatml(tiny):
    prompt = format_chat(tiny.tokenizer, CONV[:1])
    assert prompt == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    full = format_chat(tiny.tokenizer, CONV)
    assert full.startswith(prompt) and full.endswith("4, of course.<|im_end|>\n")


@pytest.mark.integration
def test_format_chat_uses_smollm2_template_on_real_tokenizer(smol):
    prompt = format_chat(smol.tokenizer, CONV[:1])
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert prompt.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")


def test_response_span_is_exact(tiny):
    text, start, end = response_span(tiny.tokenizer, CONV)
    assert text[start:end] == "4, of course."


def test_bad_roles_rejected(tiny):
    with pytest.raises(ValueError, match="role"):
        format_chat(tiny.tokenizer, [{"role": "robot", "content": "x"}])


def test_jsonl_roundtrip(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "héllo"}, {"messages": CONV}])
    assert read_inputs(path) == ["héllo", CONV]


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "empty"),
        ('{"text": "a"}\n{"text": \n', ":2: not valid JSON"),
        ('{"text": "a"}\n[1, 2]\n', ":2: expected a JSON object"),
        ('{"text": "a"}\n\n{"prompt": "b"}\n', ":3: each line needs"),
        ('{"messages": [{"role": "user"}]}\n', ":1: message 0 needs"),
        ('{"text": ""}\n', ":1: 'text' must be a non-empty string"),
    ],
)
def test_bad_jsonl_names_the_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(MadlensError, match=message):
        read_inputs(path)


def test_missing_file(tmp_path):
    with pytest.raises(MadlensError, match="no such file"):
        read_jsonl(tmp_path / "nope.jsonl")


def test_write_drops_line_numbers(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "x"}\n')
    records = read_jsonl(path)
    write_jsonl(path, records)
    assert json.loads(path.read_text()) == {"text": "x"}
