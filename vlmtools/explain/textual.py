"""Textual explanations: the descriptor similarities behind a CBD prediction, as terminal bars (rich)
and as figures like the CBD paper's (the image beside horizontal bars, one per descriptor).

Both read a predictions file only (its "explanation" and "explanation_true" lists), so they work on
any classify output without the stores or the model.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Sequence

from vlmtools import formats
from vlmtools.errors import BadInput

# One colour meaning in both views: the kind of descriptor (the legend says which). Right/wrong is said
# in words, never by colour.
KIND_COLOR = {"object": "#4c72b0", "background": "#dd8452", "name": "#8c8c8c"}
KIND_LABEL = {"object": "object descriptor", "background": "background descriptor", "name": "class name"}
KIND_TAG = {"background": "bg", "name": "name"}
SCORE_COLOR = "#333333"  # the class score bar
ORIGIN = 0.0  # bars start at cosine similarity 0, so their lengths compare as the scores do
BLOCKS = " ▏▎▍▌▋▊▉█"  # eighths, for sub-character bar ends


def select(records: Sequence[dict], *, ids: Sequence[str] = (), wrong: bool = False,
           limit: int | None = 10, source: str = "predictions") -> list[dict]:
    """The records to explain: those with ``ids`` (in that order), else all; ``wrong`` keeps the
    misclassified ones; at most ``limit``."""
    if ids:
        by_id = {r["id"]: r for r in records}
        for i in ids:
            if i not in by_id:
                raise BadInput(f"--id {i!r}: no such image in {source}")
        chosen = [by_id[i] for i in ids]
    else:
        chosen = list(records)
    if wrong:
        if any(r.get("label") is None for r in chosen):
            raise BadInput(f"--wrong: {source} has images without a \"label\"; cannot tell which are wrong")
        chosen = [r for r in chosen if r["pred"] != r["label"]]
    if chosen and not any("explanation" in r for r in chosen):
        raise BadInput(f"{source}: no descriptor explanations in the selected predictions; "
                       f"they come from `vlmtools classify --method cbd`")
    return chosen[:limit] if limit else chosen


def class_score(rec: dict, cls: str, explanation: Sequence[dict]) -> float:
    """The class's score from topk when listed there, else the mean of its descriptor scores."""
    for t in rec["topk"]:
        if t["class"] == cls:
            return t["score"]
    return sum(e["score"] for e in explanation) / len(explanation)


def panels(rec: dict, max_descriptors: int | None = None) -> list[tuple[str, str, float, list[dict]]]:
    """(title, class, class score, descriptors) for the predicted class, and for the true class when it
    differs and its explanation is in the record."""
    out = []
    if "explanation" in rec:
        out.append(("predicted", rec["pred"], class_score(rec, rec["pred"], rec["explanation"]),
                    rec["explanation"][:max_descriptors]))
    label = rec.get("label")
    if label is not None and label != rec["pred"] and "explanation_true" in rec:
        out.append(("true", label, class_score(rec, label, rec["explanation_true"]),
                    rec["explanation_true"][:max_descriptors]))
    return out


def _bar(value: float, lo: float, hi: float, width: int) -> str:
    frac = 0.0 if hi <= lo else min(max((value - lo) / (hi - lo), 0.0), 1.0)
    eighths = round(frac * width * 8)
    return "█" * (eighths // 8) + (BLOCKS[eighths % 8] if eighths % 8 else "")


def terminal_view(rec: dict, *, width: int = 30, max_descriptors: int | None = None, total_width: int = 80):
    """A rich renderable: header line, then per panel one bar per descriptor (plus the class score).
    Bars of all panels share one scale, from 0 (stated below them) to the highest score."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    # ids and class names are user data: assembled as plain text, never parsed as rich markup
    label = rec.get("label")
    header = Text.assemble((str(rec["id"]), "bold"), "  predicted ", (str(rec["pred"]), "bold"))
    if label is not None:
        right = label == rec["pred"]
        header.append("  true ")
        header.append(str(label), "bold")
        header.append(" right" if right else " wrong", "green" if right else "red")
    parts = [header]
    shown = panels(rec, max_descriptors)
    scores = [e["score"] for _, _, s, ex in shown for e in ex] + [s for _, _, s, _ in shown]
    if not scores:
        return Group(header, Text("  (no descriptor explanation in this record)"))
    lo, hi = ORIGIN, max(max(scores), ORIGIN + 1e-6)
    # one descriptor column width for all panels, so that their bars line up
    longest = max(len(e["descriptor"]) for _, _, _, ex in shown for e in ex)
    name_width = max(min(longest, total_width - width - 18), len("class score"))  # 18: kind, score, gaps
    for title, cls, score, explanation in shown:
        table = Table(title=Text(f"{title}: {cls}"), title_justify="left", show_header=False, box=None, pad_edge=False)
        table.add_column("descriptor", overflow="fold", width=name_width)
        table.add_column("kind", width=4, style="dim")
        table.add_column("bar", no_wrap=True, width=width)
        table.add_column("score", justify="right")
        table.add_row(Text("class score", style="bold"), "", Text(_bar(score, lo, hi, width), style="bold"),
                      f"{score:.4f}")
        for e in explanation:
            kind = e.get("kind", "object")
            table.add_row(Text(e["descriptor"]), KIND_TAG.get(kind, ""),
                          Text(_bar(e["score"], lo, hi, width), style=KIND_COLOR.get(kind, "")), f"{e['score']:.4f}")
        parts.append(table)
    kinds = {e.get("kind", "object") for _, _, _, ex in shown for e in ex}
    key = Text(f"  bars from {lo:g} to {hi:.3f} (cosine similarity); ", style="dim")
    for n, kind in enumerate(k for k in KIND_LABEL if k in kinds):
        key.append(("; " if n else "") + "█ ", style=KIND_COLOR[kind])
        key.append(KIND_LABEL[kind] + (f" ({KIND_TAG[kind]})" if kind in KIND_TAG else ""), style="dim")
    parts.append(key)
    return Group(*parts)


def _safe_name(id_: str) -> str:
    """A file stem for an id; an image suffix in the id (unlabelled images' ids are file names) is
    dropped, so that the figure is img01.png, not img01.png.png."""
    stem = id_[: -len(Path(id_).suffix)] if Path(id_).suffix.lower() in formats.IMAGE_SUFFIXES else id_
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._")[:100] or "image"


def _load_image(path):
    """The image as RGB, or None when it cannot be read (the figure then says so)."""
    from vlmtools.images import load_rgb

    try:
        return load_rgb(path)
    except Exception:  # PIL raises many types for missing, truncated or unknown files
        return None


def figure(rec: dict, *, max_descriptors: int | None = None):
    """A matplotlib Figure: the image, then one bar panel per explained class."""
    from matplotlib.figure import Figure  # renders with Agg without pyplot: headless-safe

    shown = panels(rec, max_descriptors)
    rows = max([len(ex) + 1 for _, _, _, ex in shown] + [4])
    fig = Figure(figsize=(3.2 + 5.2 * len(shown), max(3.0, 0.34 * rows + 1.2)), dpi=110)
    grid = fig.add_gridspec(1, 1 + len(shown), width_ratios=[3] + [5] * len(shown), wspace=0.9)
    ax = fig.add_subplot(grid[0, 0])
    image = _load_image(rec["path"]) if rec.get("path") else None
    if image is not None:
        ax.imshow(image)
    else:
        ax.text(0.5, 0.5, "image not available", ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()
    label = rec.get("label")
    # parse_math=False: a "$" in an id, class or descriptor is text, not matplotlib mathtext
    ax.set_title(f"{rec['id']}\ntrue: {label if label is not None else 'unknown (no label)'}", fontsize=9,
                 parse_math=False)
    scores = [e["score"] for _, _, s, ex in shown for e in ex] + [s for _, _, s, _ in shown]
    lo, hi = min(scores + [ORIGIN]), max(scores + [ORIGIN])
    span = (hi - lo) or 1.0
    kinds = []
    for n, (title, cls, score, explanation) in enumerate(shown, 1):
        bx = fig.add_subplot(grid[0, n])
        names = ["class score (mean)" if len(explanation) > 1 else "class score"] + [
            textwrap.shorten(e["descriptor"], 70, placeholder="…") for e in explanation]
        values = [score] + [e["score"] for e in explanation]
        kinds += [e.get("kind", "object") for e in explanation]
        colors = [SCORE_COLOR] + [KIND_COLOR.get(e.get("kind", "object"), KIND_COLOR["object"]) for e in explanation]
        y = list(range(len(values)))
        bx.barh(y, values, left=ORIGIN, color=colors)
        for yi, v in zip(y, values):  # the value on each bar, just past its end
            bx.text(v + 0.01 * span if v >= ORIGIN else v - 0.01 * span, yi, f"{v:.3f}", va="center",
                    ha="left" if v >= ORIGIN else "right", fontsize=6)
        bx.axvline(ORIGIN, color="black", linewidth=0.8)
        bx.set_yticks(y, labels=["\n".join(textwrap.wrap(s, 38)) or s for s in names], fontsize=7,
                      parse_math=False)
        bx.invert_yaxis()
        bx.set_xlim(min(lo, ORIGIN) - (0.12 * span if lo < ORIGIN else 0), hi + 0.18 * span)
        bx.set_xlabel(f"cosine similarity (bars start at {ORIGIN:g})", fontsize=8)
        bx.tick_params(axis="x", labelsize=7)
        verdict = "" if label is None else (" (right)" if cls == label else " (wrong)") if title == "predicted" else ""
        bx.set_title(f"{title}: {cls}{verdict}", fontsize=9, parse_math=False)
    if shown:
        from matplotlib.patches import Patch

        handles = [Patch(color=SCORE_COLOR, label="class score")] + [
            Patch(color=KIND_COLOR[k], label=KIND_LABEL[k]) for k in KIND_LABEL if k in kinds]
        # below the panels, outside every axis: nothing overlaps the axis labels
        fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=len(handles),
                   fontsize=7, frameon=False)
    return fig


def save_figures(records: Sequence[dict], out_dir, *, max_descriptors: int | None = None) -> list[Path]:
    """One PNG per record, named after its id (written atomically)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, used = [], set()
    for rec in records:
        name = _safe_name(rec["id"])
        stem, n = name, 1
        while stem in used:
            n += 1
            stem = f"{name}-{n}"
        used.add(stem)
        path = out_dir / f"{stem}.png"
        fig = figure(rec, max_descriptors=max_descriptors)
        with formats.atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", bbox_inches="tight",
                        metadata={"Software": "vlmtools", "Description": "explain", "Title": f"{rec['id']}: "
                                  f"predicted {rec['pred']}, true {rec.get('label')}"})
        paths.append(path)
    return paths
