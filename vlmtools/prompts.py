"""Text prompts shared by `embed text` and `classify`: CLIP templates and the CBD descriptor sentence."""

from __future__ import annotations

from pathlib import Path

from vlmtools.errors import BadInput

TEMPLATE_SETS = ("bare", "photo", "birds", "openai80")
# How a (class, descriptor) pair is written for the text encoder: cbd "{c}, which has {d}" (Menon &
# Vondrick), waffle "A photo of a {c}, which has {d}." (WaffleCLIP's default builder), none "{d}".
WRAPS = ("cbd", "waffle", "none")
# A class with no descriptors: menon scores it by descriptor_sentence(c, "") ("{c}, which has ", as Menon
# & Vondrick's and WaffleCLIP's loaders do with their [''] fill-in), name by the bare class name.
EMPTY_RULES = ("menon", "name")


def cbd_clause(descriptor: str) -> str:
    """The CBD paper's rule (Menon & Vondrick's code, make_descriptor_sentence), kept literally:
    note that startswith('a') also catches 'angular ...', as theirs does; published numbers depend on it."""
    if descriptor.startswith("a") or descriptor.startswith("an"):
        return f"which is {descriptor}"
    if descriptor.startswith(("has", "often", "typically", "may", "can")):
        return f"which {descriptor}"
    if descriptor.startswith("used"):
        return f"which is {descriptor}"
    return f"which has {descriptor}"


def wordify(name: str) -> str:
    return name.replace("_", " ")


def descriptor_sentence(cls: str, descriptor: str, wrap: str = "cbd") -> str:
    """The text embedded for one (class, descriptor): "{class}, which has {descriptor}" under ``cbd``,
    "A photo of a {class}, which has {descriptor}." under ``waffle``, the descriptor as written under
    ``none``."""
    if wrap == "cbd":
        return f"{wordify(cls)}, {cbd_clause(descriptor)}"
    if wrap == "waffle":
        return f"A photo of a {wordify(cls)}, {cbd_clause(descriptor)}."
    if wrap == "none":
        return descriptor
    raise BadInput(f"--wrap {wrap!r}: expected one of {'|'.join(WRAPS)}")


def empty_sentence(cls: str, wrap: str = "cbd", empty: str = "menon") -> str:
    """The text a class without descriptors is scored by (EMPTY_RULES); under --wrap none, its name."""
    if empty not in EMPTY_RULES:
        raise BadInput(f"--empty {empty!r}: expected one of {'|'.join(EMPTY_RULES)}")
    if empty == "name" or wrap == "none":
        return wordify(cls)
    return descriptor_sentence(cls, "", wrap)


def load_templates(spec: str) -> list[str]:
    """Template strings with one ``{}`` slot: bare | photo | birds | openai80 | a file (one template per
    line, ``{}`` or ``{c}`` marks the class name). birds is CLIP's CUB prompt ("a photo of a {}, a type of
    bird.", from CLIP's prompt list for Birdsnap)."""
    if spec == "bare":
        return ["{}"]
    if spec == "photo":
        return ["a photo of a {}."]
    if spec == "birds":
        return ["a photo of a {}, a type of bird."]
    if spec == "openai80":
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

        return [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
    path = Path(spec)
    if not path.exists():
        raise BadInput(f"--templates {spec!r}: expected {', '.join(TEMPLATE_SETS)} or a file of templates")
    templates = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        line = line.replace("{c}", "{}")
        if line.count("{}") != 1:
            raise BadInput(f"{path}:{lineno}: a template needs exactly one {{}} (or {{c}}) for the class name")
        templates.append(line)
    if not templates:
        raise BadInput(f"{path}: no templates")
    return templates
