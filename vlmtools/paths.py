"""Where vlmtools keeps caches: $VLMTOOLS_CACHE_DIR, else $XDG_CACHE_HOME/vlmtools, else ~/.cache/vlmtools."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(sub: str) -> Path:
    """The cache directory for one kind of cached thing ("llm", "text", ...); not created here."""
    root = os.environ.get("VLMTOOLS_CACHE_DIR")
    if root:
        return Path(root) / sub
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(xdg) / "vlmtools" / sub
