"""Bearer API keys for `madlens serve`, read from `--api-key-file`.

The file holds one key per line, either `key` or `id:key` (the id is what the audit log
and the server's own messages name; a bare key's id is the first 8 hex digits of its
SHA-256). Blank lines and lines starting with `#` are skipped. A presented key is compared
with every key in constant time (`hmac.compare_digest`), so the time a check takes says
nothing about how much of a key was right or which key matched; keys are never logged.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path

from madlens.data.jsonl import read_text
from madlens.errors import MadlensError

MAX_KEY_FILE_BYTES = 1 << 20


def key_id(key: str) -> str:
    """The id of a key given without one: the first 8 hex digits of its SHA-256."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:8]


@dataclass(frozen=True)
class ApiKeys:
    """The accepted keys: `(id, key bytes)` pairs."""

    entries: tuple[tuple[str, bytes], ...]

    def check(self, authorization: bytes | None) -> str | None:
        """The id of the key an `Authorization: Bearer KEY` header carries (raw header
        bytes), or None when there is none or it matches no key."""
        if not authorization:
            return None
        scheme, _, token = authorization.strip().partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer" or not token:
            return None
        found = None
        for ident, key in self.entries:  # every key, so the time is the same whichever matched
            if hmac.compare_digest(token, key) and found is None:
                found = ident
        return found


def load_keys(path: str | Path) -> ApiKeys:
    """Read an API key file; a missing, empty, oversized, non-UTF-8 or malformed file is one
    `MadlensError` line that never quotes a key."""
    path = Path(path)
    if not path.is_file():
        raise MadlensError(f"--api-key-file {path}: no such file")
    size = path.stat().st_size
    if size > MAX_KEY_FILE_BYTES:
        raise MadlensError(f"--api-key-file {path}: {size} bytes; a key file is at most 1 MiB")
    text = read_text(path, f"--api-key-file {path}")
    entries: list[tuple[str, bytes]] = []
    seen_ids: set[str] = set()
    seen_keys: set[bytes] = set()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        ident, sep, key = line.partition(":")
        if not sep:
            ident, key = key_id(line), line
        ident, key = ident.strip(), key.strip()
        where = f"--api-key-file {path}, line {number}"
        if not ident or not key:
            raise MadlensError(f"{where}: expected 'key' or 'id:key'")
        if any(ch.isspace() for ch in key) or not key.isprintable():
            raise MadlensError(f"{where}: a key may not hold spaces or control characters")
        if not key.isascii():
            raise MadlensError(f"{where}: a key must be ASCII (HTTP headers carry it)")
        if ident in seen_ids:
            raise MadlensError(f"{where}: key id '{ident}' appears twice")
        if key.encode() in seen_keys:
            raise MadlensError(f"{where}: the same key appears twice")
        seen_ids.add(ident)
        seen_keys.add(key.encode())
        entries.append((ident, key.encode()))
    if not entries:
        raise MadlensError(f"--api-key-file {path}: holds no key")
    return ApiKeys(tuple(entries))
