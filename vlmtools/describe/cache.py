"""On-disk cache of LLM answers, so reruns (and resumed runs) cost nothing.

One JSON file per request, named by sha256 of the request (base URL, model, messages, temperature,
max_tokens, sample index). The request is stored beside the answer for inspection; it never holds the
API key because the key is not part of a request.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from vlmtools.formats import atomic_path
from vlmtools.paths import cache_dir


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
            entry = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None  # missing or unreadable: ask again
        if not isinstance(entry, dict) or not isinstance(entry.get("text"), str):
            return None
        return entry

    def put(self, request: dict, text: str, finish_reason: str | None) -> None:
        path = self._path(request_key(request))
        entry = {"request": request, "text": text, "finish_reason": finish_reason}
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(entry, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
