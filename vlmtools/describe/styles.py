"""Prompt styles: the template each one sends, how its fields are filled, how its answer is parsed.

Templates are plain text files in ``templates/`` with ``{field}`` slots (see TEMPLATE_FIELDS); every other
brace is left alone, so templates may contain JSON. ``Plan`` is one run's filled-in template (every field
but the class) plus its parser.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

from vlmtools.describe.parse import (parse_background, parse_cbd, parse_exemplar_answer, parse_lines,
                                     parse_structured)
from vlmtools.errors import BadInput, VlmError
from vlmtools.formats import read_text
from vlmtools.prompts import wordify

TEMPLATE_DIR = Path(__file__).parent / "templates"

STYLES = ("cbd", "domain", "background", "structured", "sentences", "waffle")
LLM_STYLES = STYLES[:-1]


@dataclass(frozen=True)
class StyleDefaults:
    template: str
    temperature: float
    max_tokens: int


# cbd keeps the paper's settings (temperature 0, 100 tokens); the others need room for longer answers.
STYLE_DEFAULTS = {
    "cbd": StyleDefaults("cbd.txt", 0.0, 100),
    "domain": StyleDefaults("domain.txt", 0.0, 150),
    "background": StyleDefaults("background.txt", 0.0, 250),
    "structured": StyleDefaults("structured.txt", 0.0, 400),
    "sentences": StyleDefaults("sentences.txt", 0.7, 600),
}

# What a template may use. {category_name} is the paper's name for {class}, accepted for pasted prompts.
TEMPLATE_FIELDS = {
    "class": "the class name, underscores as spaces",
    "category_name": "same as {class}",
    "exemplars": "the worked examples as Q/A blocks (--exemplars, --domain, or the style's defaults)",
    "domain": "the --domain text",
    "fields": "the structured fields, one 'Field: <field>' line each (--fields)",
    "count": "the number of sentences (--count)",
}

DEFAULT_FIELDS = ("size", "shape", "coloration", "pattern", "head", "beak or mouth", "eyes",
                  "wings or limbs", "legs and feet", "tail")

_SLOT = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")

EXEMPLAR_QUESTION = "Q: What are useful visual features for distinguishing a {name} in a photo?"
BACKGROUND_QUESTION = ("Q: What are useful visual features for distinguishing a {name} in a photo, "
                       "and where and how is it typically seen?")
EXEMPLAR_ANSWER = "A: There are several useful visual features to tell there is a {name} in a photo:"
BACKGROUND_HEADER = "Typical surroundings, habitat and behaviour:"


# ----------------------------------------------------------------------------- templates

def builtin_template(style: str) -> str:
    return (TEMPLATE_DIR / STYLE_DEFAULTS[style].template).read_text(encoding="utf-8")


def read_template(path: str | Path) -> str:
    p = Path(path)
    if not p.is_file():
        raise BadInput(f"--prompt-file {p}: no such file")
    text = read_text(p)
    check_template(text, str(p))
    return text


def check_template(text: str, where: str) -> None:
    for lineno, line in enumerate(text.split("\n"), 1):
        for m in _SLOT.finditer(line):
            if m.group(1) not in TEMPLATE_FIELDS:
                raise BadInput(f"{where}:{lineno}: unknown template field {{{m.group(1)}}} "
                               f"(known: {', '.join('{' + f + '}' for f in TEMPLATE_FIELDS)})")
    if not {"class", "category_name"} & template_fields(text):
        raise BadInput(f"{where}: a prompt template needs a {{class}} slot for the class name")


def template_fields(text: str) -> set[str]:
    return {m.group(1) for m in _SLOT.finditer(text)}


def render(text: str, values: dict[str, str]) -> str:
    """Fill the known ``{field}`` slots present in ``values``; leave every other brace as written."""
    return _SLOT.sub(lambda m: values.get(m.group(1), m.group(0)), text)


# ----------------------------------------------------------------------------- exemplars

@dataclass
class Exemplar:
    name: str
    descriptors: list[str]
    kinds: list[str] = field(default_factory=list)
    # "@background: inline" in its file: background lines are shown as ordinary bullets under Menon's
    # question (study 000's improvement 2), not under a surroundings header
    inline_background: bool = False

    def of_kind(self, kind: str) -> list[str]:
        kinds = self.kinds or ["object"] * len(self.descriptors)
        return [d for d, k in zip(self.descriptors, kinds) if k == kind]


def exemplar_block(ex: Exemplar, background: bool) -> str:
    """One worked example in the paper's Q/A shape; the background style adds a surroundings section, or
    for inline exemplars shows every line, in file order, as a bullet under the paper's question."""
    if background and ex.inline_background:
        lines = [EXEMPLAR_QUESTION.format(name=ex.name), EXEMPLAR_ANSWER.format(name=ex.name)]
        return "\n".join(lines + [f"- {d}" for d in ex.descriptors])
    question = BACKGROUND_QUESTION if background else EXEMPLAR_QUESTION
    lines = [question.format(name=ex.name), EXEMPLAR_ANSWER.format(name=ex.name)]
    lines += [f"- {d}" for d in ex.of_kind("object")]
    if background and ex.of_kind("background"):
        lines.append(BACKGROUND_HEADER)
        lines += [f"- {d}" for d in ex.of_kind("background")]
    return "\n".join(lines)


EXEMPLAR_OPTIONS = {"background": ("section", "inline")}


def parse_exemplar_text(text: str, where: str) -> list[Exemplar]:
    """Blocks separated by blank lines: a name line, then "- " descriptor lines; a "background:" line
    marks the rest of the block as background. '#' lines are comments. Before the first block, option
    lines "@background: section|inline" (how the background style shows background lines)."""
    exemplars: list[Exemplar] = []
    current: Exemplar | None = None
    kind = "object"
    options = {key: values[0] for key, values in EXEMPLAR_OPTIONS.items()}
    for lineno, raw in enumerate(text.split("\n"), 1):
        line = raw.strip()
        if line.startswith("#"):
            continue
        if line.startswith("@"):
            key, _, value = (part.strip() for part in line[1:].partition(":"))
            if exemplars or key not in EXEMPLAR_OPTIONS or value not in EXEMPLAR_OPTIONS[key]:
                known = "; ".join(f"@{k}: {'|'.join(v)}" for k, v in EXEMPLAR_OPTIONS.items())
                raise BadInput(f"{where}:{lineno}: {line!r}: expected an option line before the first "
                               f"example ({known})")
            options[key] = value
            continue
        if not line:
            current = None
            continue
        if current is None:
            if line.startswith("-"):
                raise BadInput(f"{where}:{lineno}: expected a class name before the '- ' lines")
            current = Exemplar(line.rstrip(":").strip(), [], [],
                               inline_background=options["background"] == "inline")
            exemplars.append(current)
            kind = "object"
        elif line.lower().rstrip(":") == "background":
            kind = "background"
        elif line.startswith("- ") and line[2:].strip():
            current.descriptors.append(line[2:].strip())
            current.kinds.append(kind)
        else:
            raise BadInput(f"{where}:{lineno}: expected a '- ' descriptor line, 'background:' or a blank line")
    for ex in exemplars:
        if not ex.of_kind("object"):
            raise BadInput(f"{where}: exemplar {ex.name!r} has no descriptors")
    if not exemplars:
        raise BadInput(f"{where}: no exemplars found")
    return exemplars


def exemplar_sets() -> dict[str, Path]:
    """The shipped exemplar files by name (templates/exemplars_NAME.txt): cbd (Menon & Vondrick's lemur
    and television), background (the same with surroundings), cub (study 000's Sooty Albatross)."""
    return {f.stem[len("exemplars_"):]: f for f in sorted(TEMPLATE_DIR.glob("exemplars_*.txt"))}


def exemplar_path(spec: str | Path) -> Path:
    """--exemplars: a file, else the name of a shipped set."""
    p = Path(spec)
    if p.is_file():
        return p
    sets = exemplar_sets()
    if str(spec) in sets:
        return sets[str(spec)]
    raise BadInput(f"--exemplars {spec}: no such file, nor a shipped set ({', '.join(sets)})")


def read_exemplars(path: str | Path) -> list[Exemplar]:
    """Exemplars from the text format above (a file or a shipped set's name), a descriptor JSONL, or a
    CBD-style JSON dict."""
    p = exemplar_path(path)
    text = read_text(p)
    if text.lstrip().startswith("{"):
        from vlmtools.describe.interchange import read_any_descriptors

        records = read_any_descriptors(p)
        exemplars = [Exemplar(r["class"], list(r["descriptors"]), list(r.get("kinds") or []))
                     for r in records]
        for ex in exemplars:
            if not ex.of_kind("object"):
                raise BadInput(f"{p}: exemplar {ex.name!r} has no descriptors")
        return exemplars
    return parse_exemplar_text(text, str(p))


def default_exemplars(style: str) -> list[Exemplar]:
    path = exemplar_sets()["background" if style == "background" else "cbd"]
    return parse_exemplar_text(path.read_text(encoding="utf-8"), str(path))


def inline_background(exemplars: list[Exemplar] | None) -> bool:
    """Whether the background style with these exemplars is study 000's prompt: Menon's question and
    parser, the background lines as ordinary bullets."""
    return bool(exemplars) and all(ex.inline_background for ex in exemplars)


def domain_exemplar_prompt(domain: str, background: bool) -> str:
    """The request for one worked example from the target domain (--domain), shown the paper's lemur."""
    lemur = default_exemplars("background" if background else "cbd")[0]
    template = (TEMPLATE_DIR / "domain_exemplar.txt").read_text(encoding="utf-8")
    return render(template, {"example": exemplar_block(lemur, background), "domain": domain})


def exemplar_from_answer(text: str, domain: str) -> Exemplar:
    name, descs, kinds = parse_exemplar_answer(text)
    if not name or not descs:
        raise VlmError(f"--domain {domain!r}: the LLM's exemplar answer has no 'Name:' line or no '- ' lines "
                       f"(answer began: {text[:120]!r}); pass --exemplars FILE instead")
    return Exemplar(name, descs, kinds)


# ----------------------------------------------------------------------------- plans

def fields_block(fields: list[str]) -> str:
    return "\n".join(f"{f[:1].upper() + f[1:]}: <{f}>" for f in fields)


@dataclass
class Plan:
    """One run's prompt (every field filled but the class), its request settings and its parser."""

    style: str
    template: str
    temperature: float
    max_tokens: int
    fields: list[str] = field(default_factory=list)
    # "cbd" ("- " lines, the loose parser when there are none), "background", "structured", "lines"
    parser: str = ""
    strict: bool = False  # cbd parser only: Menon's "- " lines, never the loose parser

    def __post_init__(self):
        if not self.parser:
            self.parser = PARSERS.get(self.style, "lines")
        if self.strict and self.parser != "cbd":
            raise BadInput("--strict-parse applies to the '- ' list prompts: cbd, domain, and background with "
                           "inline exemplars (--exemplars cub)")

    def prompt(self, cls: str) -> str:
        name = wordify(cls)  # as the paper does: category.replace('_', ' ')
        return render(self.template, {"class": name, "category_name": name})

    @property
    def prompt_sha(self) -> str:
        """First 16 hex digits of sha256(template with every field but the class filled in)."""
        return hashlib.sha256(self.template.encode("utf-8")).hexdigest()[:16]

    def parse(self, text: str) -> tuple[list[str], list[str] | None, bool]:
        """(descriptors, kinds or None, whether the answer had no "- " lines: the loose parser read it, or
        under ``strict`` nothing did)."""
        if self.parser == "cbd":
            descs = parse_cbd(text)
            if descs or self.strict:
                return descs, None, not descs
            return parse_lines(text), None, True
        if self.parser == "background":
            descs, kinds = parse_background(text)
            return descs, kinds, False
        if self.parser == "structured":
            return parse_structured(text, self.fields), None, False
        return parse_lines(text), None, False


PARSERS = {"cbd": "cbd", "domain": "cbd", "background": "background", "structured": "structured"}


def needs_exemplars(template: str) -> bool:
    return "exemplars" in template_fields(template)


def build_plan(style: str, template: str, *, exemplars: list[Exemplar] | None = None, domain: str | None = None,
               fields: list[str] | None = None, count: int = 10, temperature: float | None = None,
               max_tokens: int | None = None, strict: bool = False) -> Plan:
    """Fill a template's run-wide fields. ``exemplars`` is required when the template uses {exemplars} and
    the style has no defaults (domain). Background with inline exemplars is read with the cbd parser."""
    if style not in LLM_STYLES:
        raise BadInput(f"--style {style!r}: expected one of {', '.join(STYLES)}")
    used = template_fields(template)
    values: dict[str, str] = {}
    if "exemplars" in used:
        if exemplars is None:
            if style == "domain":
                raise BadInput("--style domain needs worked examples from the target domain: "
                               "--exemplars FILE or --domain TEXT")
            exemplars = default_exemplars(style)
        values["exemplars"] = "\n\n".join(exemplar_block(ex, style == "background") for ex in exemplars)
    if "domain" in used:
        if not domain:
            raise BadInput("the prompt template uses {domain}: pass --domain TEXT")
        values["domain"] = domain
    fields = list(fields) if fields else list(DEFAULT_FIELDS)
    if "fields" in used:
        values["fields"] = fields_block(fields)
    if count < 1:
        raise BadInput(f"--count {count}: must be at least 1")
    values["count"] = str(count)
    defaults = STYLE_DEFAULTS[style]
    return Plan(style=style, template=render(template, values),
                temperature=defaults.temperature if temperature is None else temperature,
                max_tokens=defaults.max_tokens if max_tokens is None else max_tokens,
                fields=fields, parser="cbd" if style == "background" and inline_background(exemplars) else "",
                strict=strict)

