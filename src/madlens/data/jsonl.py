"""JSONL read/write for madlens inputs: one object per line with `text` or `messages`.

Errors name the file and line, so a malformed file is fixed in one look.
"""

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from madlens.data.chat import validate_messages
from madlens.errors import MadlensError


def parse_object(text: str, where: str) -> dict[str, Any]:
    """One JSON object from `text`; every problem is one line that starts with `where`."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MadlensError(f"{where}: not valid JSON ({exc.msg})") from exc
    except RecursionError as exc:
        raise MadlensError(f"{where}: JSON nested too deeply") from exc
    if not isinstance(value, dict):
        raise MadlensError(f"{where}: expected a JSON object")
    return value


def read_text(path: str | Path, where: str | None = None) -> str:
    """The UTF-8 text of file `path`; a problem is one line that starts with `where`
    (default: the path)."""
    path = Path(path)
    where = str(path) if where is None else where
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MadlensError(f"{where}: not UTF-8 text (byte {exc.start + 1})") from exc
    except OSError as exc:
        raise MadlensError(f"{where}: cannot read ({exc.strerror})") from exc


def read_object(path: str | Path) -> dict[str, Any]:
    """The JSON object in file `path` (a config), each problem one line naming the file."""
    return parse_object(read_text(path), str(path))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read every object of a JSONL file; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise MadlensError(f"{path}: no such file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise MadlensError(f"{path}: cannot read ({exc.strerror})") from exc
    records = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise MadlensError(
                f"{path}:{number}: not UTF-8 text (byte {exc.start + 1} of the line)"
            ) from exc
        if not line.strip():
            continue
        record = parse_object(line, f"{path}:{number}")
        record["_line"] = number
        records.append(record)
    if not records:
        raise MadlensError(f"{path}: the file is empty")
    return records


def record_input(record: dict[str, Any], where: str) -> str | list[dict[str, str]]:
    """The model input of one record: its `text`, or its `messages` conversation."""
    if "messages" in record:
        try:
            messages = validate_messages(record["messages"], where)
        except ValueError as exc:
            raise MadlensError(str(exc)) from exc
        for message in messages:
            _check_encodable(message["content"], where)
        return messages
    if "text" in record:
        if not isinstance(record["text"], str) or not record["text"]:
            raise MadlensError(f"{where}: 'text' must be a non-empty string")
        return _check_encodable(record["text"], where)
    raise MadlensError(f"{where}: each line needs a 'text' or a 'messages' field")


def _check_encodable(text: str, where: str) -> str:
    """JSON can spell an unpaired surrogate (`"\\ud800"`), which is no text a tokenizer
    can read."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise MadlensError(f"{where}: the text holds an unpaired surrogate ({exc.reason})") from exc
    return text


def read_inputs(path: str | Path) -> list[str | list[dict[str, str]]]:
    """Read a JSONL file of `text` / `messages` objects into model inputs."""
    return [record_input(r, f"{path}:{r['_line']}") for r in read_jsonl(path)]


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> Path:
    """Write records one JSON object per line (UTF-8, keys kept in order)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for record in records:
            clean = {k: v for k, v in record.items() if k != "_line"}
            handle.write(json.dumps(clean, ensure_ascii=False) + "\n")
    return path
