"""Descriptor files in other projects' shapes, and summary statistics.

CBD (Menon & Vondrick), WaffleCLIP and CuPL publish one JSON object {class: [descriptor, ...]}. Their
code iterates that object in key order to number the classes, so order is kept both ways. That shape
has no room for descriptor kinds (background marks) or the style, so `export --format cbd` warns when it
drops them; `export --format vlmtools` writes one JSON object {"format": "vlmtools.descriptors/1",
"classes": [descriptor records]} that `import` reads back exactly.
"""

from __future__ import annotations

import json
from pathlib import Path
from statistics import mean

from vlmtools.console import warn
from vlmtools.errors import BadInput
from vlmtools.formats import (DESCRIPTORS_FORMAT, DescriptorLines, JsonProblem, descriptor_kinds, descriptor_record,
                              parse_json, read_descriptors, read_text, source_name)

IMPORT_FORMATS = ("cbd", "cupl")
EXPORT_FORMATS = ("cbd", "vlmtools")
KIND_FILTERS = ("all", "object", "background")


def records_from_dict(obj: object, where: str, style: str | None = None) -> list[dict]:
    """{class: [str]} -> descriptor records, in key order. Empty lists are kept (with a warning)."""
    if not isinstance(obj, dict) or not obj:
        raise BadInput(f"{where}: expected a JSON object {{class: [descriptors]}} with at least one class")
    records = []
    for cls, descs in obj.items():
        if not isinstance(descs, list) or not all(isinstance(d, str) for d in descs):
            raise BadInput(f"{where}: class {cls!r}: expected a list of strings, got {type(descs).__name__}")
        if not descs:
            warn(f"{where}: class {cls!r} has no descriptors")
        records.append(descriptor_record(str(cls), descs, style=style))
    return records


def _looks_like_record(obj: object) -> bool:
    return isinstance(obj, dict) and "class" in obj and isinstance(obj.get("descriptors"), list)


def _is_export(obj: object) -> bool:
    return isinstance(obj, dict) and obj.get("format") == DESCRIPTORS_FORMAT and isinstance(obj.get("classes"), list)


def records_from_export(obj: dict, where: str) -> list[dict]:
    """The records of an `export --format vlmtools` object, checked as descriptor lines are."""
    lines = DescriptorLines(where, allow_empty=True)
    return [lines.check(i, rec) for i, rec in enumerate(obj["classes"], 1)]


def read_any_descriptors(path: str | Path, style: str | None = None) -> list[dict]:
    """A JSON dict ({class: [descriptors]}) or a vlmtools descriptor JSONL, as records in file order."""
    where = source_name(path)
    text = read_text(path)
    try:
        obj = parse_json(text)
    except json.JSONDecodeError:
        obj = None  # maybe JSONL
    except JsonProblem as exc:
        raise BadInput(f"{where}: {exc}") from None
    if _is_export(obj):
        return records_from_export(obj, where)
    if obj is not None and not _looks_like_record(obj):
        return records_from_dict(obj, where, style)
    if str(path) == "-":
        raise BadInput("<stdin>: descriptor JSONL on stdin: pass it as a file")
    return list(read_descriptors(path, allow_empty=True).values())


def import_descriptors(path: str | Path, fmt: str = "cbd") -> list[dict]:
    if fmt not in IMPORT_FORMATS:
        raise BadInput(f"--format {fmt!r}: expected one of {', '.join(IMPORT_FORMATS)}")
    where = source_name(path)
    try:
        obj = parse_json(read_text(path))
    except json.JSONDecodeError as exc:
        raise BadInput(f"{where}: not a JSON object ({exc.msg} at line {exc.lineno})") from None
    except JsonProblem as exc:
        raise BadInput(f"{where}: {exc}") from None
    if _is_export(obj):  # our own lossless export: kinds, style and every other field come back as written
        return records_from_export(obj, where)
    return records_from_dict(obj, where, style=fmt)


def export_dict(records: list[dict], kind: str = "all") -> dict[str, list[str]]:
    """Records -> {class: [descriptors]}, keeping order; ``kind`` keeps only object/background ones."""
    if kind not in KIND_FILTERS:
        raise BadInput(f"--kind {kind!r}: expected one of {', '.join(KIND_FILTERS)}")
    out: dict[str, list[str]] = {}
    for rec in records:
        pairs = zip(rec["descriptors"], descriptor_kinds(rec))
        out[rec["class"]] = [d for d, k in pairs if kind == "all" or k == kind]
    return out


def export_object(records: list[dict], fmt: str = "cbd", kind: str = "all") -> dict:
    """What `descriptors export` writes: the CBD dict (warning about what that shape drops), or with
    ``fmt="vlmtools"`` the records themselves, which `descriptors import` restores exactly."""
    if fmt not in EXPORT_FORMATS:
        raise BadInput(f"--format {fmt!r}: expected one of {', '.join(EXPORT_FORMATS)}")
    if fmt == "vlmtools":
        if kind != "all":
            raise BadInput("--kind applies to --format cbd; --format vlmtools keeps every descriptor and its kind")
        return {"format": DESCRIPTORS_FORMAT, "classes": records}
    lost = []
    if kind == "all" and any("background" in descriptor_kinds(r) for r in records):
        lost.append("which descriptors are background (use --kind object|background to split them)")
    extra = sorted({k for r in records for k in r} - {"class", "descriptors", "kinds"})
    if extra:
        lost.append(f"the field(s) {', '.join(extra)}")
    if lost:
        warn(f"the CBD dict has no room for {' and '.join(lost)}; --format vlmtools keeps them")
    return export_dict(records, kind)


def descriptor_stats(records: list[dict]) -> tuple[list[dict], dict]:
    """Per-class rows and a totals row: counts, duplicates, background share, lengths, shared descriptors."""
    rows = []
    owners: dict[str, set[str]] = {}
    for rec in records:
        descs = rec["descriptors"]
        for d in set(descs):
            owners.setdefault(d, set()).add(rec["class"])
        rows.append({
            "class": rec["class"],
            "descriptors": len(descs),
            "duplicates": len(descs) - len(set(descs)),
            "background": sum(k == "background" for k in descriptor_kinds(rec)),
            "mean_chars": round(mean(len(d) for d in descs), 1) if descs else 0.0,
            "mean_words": round(mean(len(d.split()) for d in descs), 1) if descs else 0.0,
        })
    counts = [r["descriptors"] for r in rows]
    all_descs = [d for rec in records for d in rec["descriptors"]]
    total = {
        "classes": len(rows),
        "descriptors": sum(counts),
        "min_per_class": min(counts) if counts else 0,
        "mean_per_class": round(mean(counts), 2) if counts else 0.0,
        "max_per_class": max(counts) if counts else 0,
        "empty_classes": sum(c == 0 for c in counts),
        "duplicates": sum(r["duplicates"] for r in rows),
        "background": sum(r["background"] for r in rows),
        "shared_across_classes": sum(len(cs) > 1 for cs in owners.values()),
        "mean_chars": round(mean(len(d) for d in all_descs), 1) if all_descs else 0.0,
        "mean_words": round(mean(len(d.split()) for d in all_descs), 1) if all_descs else 0.0,
    }
    return rows, total
