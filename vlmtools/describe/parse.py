"""Turn an LLM answer into a list of descriptors.

`parse_cbd` is Menon & Vondrick's rule, kept literally; the other parsers accept the shapes chat models
actually produce (numbered lists, "* " bullets, JSON arrays, preambles, markdown bold).
"""

from __future__ import annotations

import json
import re

# "- x", "* x", "• x", "1. x", "2) x", "(3) x"
_BULLET = re.compile(r"^\s*(?:[-*•–]|\d{1,3}[.)]|\(\d{1,3}\))\s+(.*\S)\s*$")
# A non-bullet line that opens the surroundings/habitat section of a background answer.
_BACKGROUND_HEADER = re.compile(r"surround|habitat|behavio|background|environment|setting", re.IGNORECASE)
# "Field: value", tolerant of "**Field:** value", "- Field: value", "1. Field: value".
_FIELD_LINE = re.compile(r"^\s*(?:[-*•]\s+|\d{1,3}[.)]\s+)?\**\s*([A-Za-z][A-Za-z /&,'-]{0,40}?)\s*\**"
                         r"\s*:\s*\**\s*(.*\S)\s*$")


def parse_cbd(text: str) -> list[str]:
    """The paper's stringtolist: keep lines that start with "- ", drop those two characters, nothing else
    (no strip, no de-duplication)."""
    return [line[2:] for line in text.split("\n") if line != "" and line.startswith("- ")]


def _clean(item: str) -> str:
    item = item.strip()
    # Markdown emphasis around the whole item ("**long tail**") carries no meaning for CLIP.
    while len(item) > 4 and item.startswith("**") and item.endswith("**"):
        item = item[2:-2].strip()
    if len(item) >= 2 and item[0] == item[-1] and item[0] in "\"'":
        item = item[1:-1].strip()
    return item


def _dedupe(items: list[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for item in items:
        key = " ".join(item.split()).casefold()
        if item and key not in seen:
            seen.add(key)
            out.append(item)
    return out


def _strip_fences(text: str) -> str:
    return "\n".join(line for line in text.split("\n") if not line.strip().startswith("```"))


def _json_list(text: str) -> list[str] | None:
    """A JSON array of strings (or an object holding one), as some models answer; None if not JSON."""
    body = _strip_fences(text).strip()
    if not body.startswith(("[", "{")):
        return None
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    if isinstance(value, dict):
        lists = [v for v in value.values() if isinstance(v, list)]
        value = [x for lst in lists for x in lst]
    if not isinstance(value, list):
        return None
    return [_clean(x) for x in value if isinstance(x, str) and x.strip()]


def parse_lines(text: str) -> list[str]:
    """Loose list parser: a JSON array, else the bullet/numbered lines, else (no bullets at all) every
    non-empty line that is not a preamble ending in ':'. De-duplicated, order kept."""
    items = _json_list(text)
    if items is not None:
        return _dedupe(items)
    lines = [line for line in _strip_fences(text).split("\n") if line.strip()]
    bullets = [m.group(1) for m in map(_BULLET.match, lines) if m]
    if bullets:
        return _dedupe([_clean(b) for b in bullets])
    return _dedupe([_clean(line) for line in lines if not line.rstrip().endswith(":")])


def parse_background(text: str) -> tuple[list[str], list[str]]:
    """Bullets before a surroundings/habitat header are "object", after it "background"."""
    items = _json_list(text)
    if items is not None:
        items = _dedupe(items)
        return items, ["object"] * len(items)
    kind = "object"
    descs: list[str] = []
    kinds: list[str] = []
    for line in _strip_fences(text).split("\n"):
        m = _BULLET.match(line)
        if m:
            descs.append(_clean(m.group(1)))
            kinds.append(kind)
        elif line.strip() and _BACKGROUND_HEADER.search(line) and not line.lstrip().startswith(("Q:", "A:")):
            kind = "background"
    seen: set[str] = set()
    out_d, out_k = [], []
    for d, k in zip(descs, kinds):
        key = " ".join(d.split()).casefold()
        if d and key not in seen:
            seen.add(key)
            out_d.append(d)
            out_k.append(k)
    return out_d, out_k


def _field_key(name: str) -> str:
    return re.sub(r"[^a-z]", "", name.lower())


def _field_aliases(name: str) -> set[str]:
    """'beak or mouth' is also answered as 'Beak:', 'Mouth:' or 'Beak/Mouth:'."""
    parts = re.split(r"\s+or\s+|\s+and\s+|/|,", name)
    return {_field_key(name), _field_key("".join(parts))} | {_field_key(p) for p in parts if p.strip()}


def parse_structured(text: str, fields: list[str]) -> list[str]:
    """'Field: value' lines for the requested fields, as "field: value" in the requested order; the first
    line for a field wins, lines for other fields are ignored."""
    owner: dict[str, str] = {}
    for f in fields:
        for alias in _field_aliases(f):
            owner.setdefault(alias, f)
    found: dict[str, str] = {}
    for line in _strip_fences(text).split("\n"):
        m = _FIELD_LINE.match(line)
        if not m:
            continue
        f = owner.get(_field_key(m.group(1)))
        value = _clean(m.group(2))
        if f is not None and f not in found and value:
            found[f] = value
    return [f"{f}: {found[f]}" for f in fields if f in found]


def parse_exemplar_answer(text: str) -> tuple[str | None, list[str], list[str]]:
    """The answer to the domain-exemplar request: ("Name: X", bullets) -> (name, descriptors, kinds)."""
    name = None
    for line in _strip_fences(text).split("\n"):
        m = re.match(r"^\W*name\W*:\s*(.+)$", line.strip(), re.IGNORECASE)
        if m:
            name = _clean(m.group(1).strip("*").strip())
            break
    descs, kinds = parse_background(text)
    return name, descs, kinds
