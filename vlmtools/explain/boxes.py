"""`vlmtools explain box HEAD STORE`: the LARE boxes of stored images, per image or per class.

For each image the head's f_Box gives [X-, X+]; its log volume is the sum of the log side lengths (the
volume itself under- or overflows in hundreds of dimensions), with the mean, smallest and largest side.
Per class: the mean of each over the class's images. Large boxes are where LARE sampled widely.
"""

from __future__ import annotations

from typing import Sequence

from vlmtools import formats
from vlmtools.console import warn
from vlmtools.errors import BadInput

STATS = ("log_volume", "mean_side", "min_side", "max_side")
LEVELS = ("class", "image")
DIGITS = 6


def box_rows(head_path, image_store, *, where: Sequence[str] = (), per: str = "class",
             device: str = "cpu") -> list[dict]:
    """Rows of box statistics: one per image (id, label, the manifest's split/domain, STATS) or per
    class (class, n, the mean of each of STATS)."""
    import numpy as np
    import torch

    from vlmtools.classify import parse_where, selected_images
    from vlmtools.heads.base import load_head
    from vlmtools.heads.lare import box_stats
    from vlmtools.heads.predict import check_store_fits_head
    from vlmtools.models import resolve_device
    from vlmtools.store import open_store

    if per not in LEVELS:
        raise BadInput(f"--per {per!r}: expected one of {', '.join(LEVELS)}")
    parse_where(where)  # a malformed --where fails before the head is loaded
    device = resolve_device(device)
    head, info = load_head(head_path, device)
    if info["kind"] != "lare":
        raise BadInput(f"{head_path}: a {info['kind']} head has no boxes; `explain box` reads heads from "
                       f"`vlmtools train lare`")
    if not (info.get("training") or {}).get("samples", 1):
        warn(f"{head_path} was trained with --samples 0: its f_Box was never trained, the boxes mean nothing")
    images = open_store(image_store, kind="image")
    check_store_fits_head(images, info, head_path)
    meta, rows = selected_images(images, where, image_store)
    emb = images.embeddings if rows is None else images.embeddings[np.asarray(rows)]
    stats = box_stats(head.aug, torch.from_numpy(np.ascontiguousarray(emb, dtype=np.float32)).to(device))
    if per == "image":
        out = []
        for n, rec in enumerate(meta):
            row = {k: rec[k] for k in ("id", "label", "split", "domain") if rec.get(k) is not None}
            row.update({s: round(float(stats[s][n]), DIGITS) for s in STATS})
            out.append(row)
        return out
    groups: dict[str, list[int]] = {}
    for n, rec in enumerate(meta):
        groups.setdefault(str(rec.get("label", "-")), []).append(n)
    return [{"class": cls, "n": len(idx), **{s: round(float(stats[s][idx].mean()), DIGITS) for s in STATS}}
            for cls, idx in groups.items()]


def table(rows: list[dict], per: str):
    """A rich table of the rows (for the terminal)."""
    from rich.table import Table
    from rich.text import Text

    keys = ["class", "n"] if per == "class" else [k for k in ("id", "label", "domain") if any(k in r for r in rows)]
    t = Table(title="LARE boxes" + (" (means over each class's images)" if per == "class" else ""),
              title_justify="left")
    for k in keys:
        t.add_column(k, justify="right" if k == "n" else "left")
    for s in STATS:
        t.add_column(s.replace("_", " "), justify="right")
    for r in rows:
        t.add_row(*[Text(str(r.get(k, "-"))) for k in keys], f"{r['log_volume']:.2f}",
                  *(f"{r[s]:.4g}" for s in STATS[1:]))
    return t


def explain_boxes(head_path, image_store, *, where: Sequence[str] = (), per: str = "class", output="-",
                  device: str = "cpu") -> list[dict]:
    """The command: the table on stderr, the rows as NDJSON on stdout or -o FILE."""
    from vlmtools.console import data_to_terminal, hint_data_elsewhere, info

    rows = box_rows(head_path, image_store, where=where, per=per, device=device)
    shown = per == "class" or len(rows) <= 50
    if shown:
        info(table(rows, per))
    if shown and data_to_terminal(output):  # the table says it all; a pipe or -o gets the rows
        hint_data_elsewhere()
    else:
        formats.write_jsonl(output, rows)
    return rows
