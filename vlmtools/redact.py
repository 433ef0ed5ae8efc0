"""Secrets that must never reach a file or the terminal, and text from elsewhere made safe to show.

A command that holds a secret (describe: the API key, credentials written into --base-url) registers it
here once; every JSON writer of vlmtools.formats and every message of vlmtools.console then replaces it,
and its encoded forms (base64 as in an ``Authorization: Basic`` header, percent-encoding), with
``[redacted]`` wherever it appears: in any field, whoever put it there. Redacting at the writers, not in
a list of known fields, is what keeps a server that echoes the key in an unexpected place from getting
it onto disk.
"""

from __future__ import annotations

import base64
import re
import threading
from typing import Any
from urllib.parse import quote

REDACTED = "[redacted]"
MIN_SECRET = 8  # shorter strings are too likely to be ordinary words

_lock = threading.Lock()
_secrets: list[str] = []  # longest first, so that "user:pass" goes before "pass"
_pattern: re.Pattern | None = None


def encoded_forms(secret: str) -> set[str]:
    """The secret as written, base64-encoded (with and without padding) and percent-encoded."""
    forms = {secret, quote(secret, safe=""), quote(secret, safe=":@")}
    b64 = base64.b64encode(secret.encode("utf-8")).decode("ascii")
    forms |= {b64, b64.rstrip("=")}
    return {f for f in forms if len(f) >= MIN_SECRET}


def add_secret(*secrets: str | None) -> None:
    """Redact these secrets (and their encoded forms) from every later write and message."""
    global _pattern
    with _lock:
        for secret in secrets:
            if secret and len(secret) >= MIN_SECRET:
                for form in encoded_forms(secret):
                    if form not in _secrets:
                        _secrets.append(form)
        _secrets.sort(key=len, reverse=True)
        _pattern = re.compile("|".join(map(re.escape, _secrets))) if _secrets else None


def clear_secrets() -> None:
    """Forget every secret (tests, long-lived library callers between runs)."""
    global _pattern
    with _lock:
        _secrets.clear()
        _pattern = None


def has_secrets() -> bool:
    return _pattern is not None


def scrub(text: str, replacement: str = REDACTED) -> str:
    """``text`` with every registered secret replaced by [redacted] (or ``replacement``)."""
    pattern = _pattern
    return text if pattern is None or not text else pattern.sub(lambda m: replacement, text)


def scrub_obj(obj: Any) -> Any:
    """A copy of a JSON-able value with secrets scrubbed from every string in it, keys included."""
    if _pattern is None:
        return obj
    if isinstance(obj, str):
        return scrub(obj)
    if isinstance(obj, dict):
        return {scrub(k) if isinstance(k, str) else k: scrub_obj(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [scrub_obj(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------- the terminal
# Text from elsewhere (a server's error message, an LLM's answer, a file name) may hold control
# characters: an ANSI escape sequence would recolour, move the cursor or retitle the user's terminal.
# They are shown escaped (\x1b), as Python's repr shows them; tab and newline pass.

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def escape_controls(text: str) -> str:
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text) if _CONTROL.search(text) else text
