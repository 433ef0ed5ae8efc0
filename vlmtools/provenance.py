"""What a result rests on, said plainly: which rows a command scored, and whether a trained head saw them.

A top-1 printed "on 1000 labelled" over train and test together reads as a test accuracy; these helpers
let classify name the rows (all, or --where, with the split counts) and warn when a head is scored on the
rows it was trained or validated on.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Sequence

SPLIT_KEY = "split"


def rows_note(meta: Sequence[dict], where: Sequence[str] = ()) -> str:
    """"all 1000 rows (700 train, 300 test)" or "300 rows with split=test"."""
    n = len(meta)
    if where:
        return f"{n} rows with {' '.join(where)}"
    splits = Counter(str(r[SPLIT_KEY]) for r in meta if r.get(SPLIT_KEY) is not None)
    if len(splits) > 1:
        counts = ", ".join(f"{c} {s}" for s, c in sorted(splits.items()))
        return f"all {n} rows ({counts}; --where split=... scores one split)"
    return f"all {n} rows"


def _same_path(a, b) -> bool:
    try:
        return os.path.realpath(str(a)) == os.path.realpath(str(b))
    except (OSError, ValueError):
        return False


def seen_by_head(head_info: dict, image_store, meta: Sequence[dict]) -> tuple[int, str]:
    """(how many of ``meta``'s rows the head was trained or validated on, the selection that says so).

    The head file records its training store ("inputs"/"image_store"/"path") and the --where and
    --val-where that chose its rows ("training"); rows of the same store matching either were seen.
    (0, "") when the head was trained on another store or does not record it."""
    from vlmtools.store import parse_where

    inputs = (head_info.get("inputs") or {}).get("image_store") or {}
    trained_on = inputs.get("path")
    if not trained_on or not _same_path(trained_on, image_store):
        return 0, ""
    training = head_info.get("training") or {}
    where = [str(w) for w in training.get("where") or []]
    val_where = [str(w) for w in training.get("val_where") or []]
    selections = [parse_where(where)] + ([parse_where(val_where)] if val_where else [])

    def seen(row: dict) -> bool:
        return any(all(str(row.get(k)) == v for k, v in sel) for sel in selections)

    said = " ".join(where) if where else "every row"
    if val_where:
        said += f", val {' '.join(val_where)}"
    return sum(seen(r) for r in meta), f"{said} of {Path(str(trained_on)).name}"
