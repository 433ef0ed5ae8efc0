"""On-disk cache of LLM answers, so reruns (and resumed runs) cost nothing.

One JSON file per request, named by sha256 of the request (base URL, model, messages, temperature,
max_tokens, sample index). The request is stored beside the answer for inspection; it never holds the
API key because the key is not part of a request, and the JSON writer redacts it from any field.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from vlmtools.errors import BadInput
from vlmtools.formats import MAX_JSON, parse_json, read_capped, write_json
from vlmtools.paths import cache_dir

MAX_ENTRY = MAX_JSON


def default_cache_dir() -> Path:
    """$VLMTOOLS_CACHE_DIR/llm, else $XDG_CACHE_HOME/vlmtools/llm, else ~/.cache/vlmtools/llm."""
    return cache_dir("llm")


def request_key(request: dict) -> str:
    blob = json.dumps(request, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ResponseCache:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, request: dict) -> dict | None:
        path = self._path(request_key(request))
        try:
            entry = parse_json(read_capped(path, MAX_ENTRY).decode("utf-8"))
        except (OSError, ValueError, BadInput):
            return None  # missing, unreadable, too large or not JSON: ask again
        if not isinstance(entry, dict) or not isinstance(entry.get("text"), str):
            return None
        return entry

    def put(self, request: dict, text: str, finish_reason: str | None) -> None:
        path = self._path(request_key(request))
        # through the one JSON writer: no registered secret reaches the cache, whatever field holds it
        write_json(path, {"request": request, "text": text, "finish_reason": finish_reason})

    def discard(self, request: dict) -> None:
        try:
            self._path(request_key(request)).unlink()
        except FileNotFoundError:
            pass
