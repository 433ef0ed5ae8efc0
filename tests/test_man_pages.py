"""The man pages against `--help`: each page documents every option of the commands in its SYNOPSIS, names
no option that no command has, and lists the same choices; the pages render without glued words."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.test_cli_conventions import COMMANDS, ROOT

MAN = Path(__file__).resolve().parents[1] / "man"
PAGES = sorted(MAN.glob("*.[15]"))
BY_NAME = dict(COMMANDS)
GLOBAL = {"--quiet", "--verbose", "--help", "--version", "--install-completion", "--show-completion"}
# Options of the example scripts the pages point to (not of a vlmtools command).
SCRIPT_OPTIONS = {"--seeds"}


def _options(command, hidden: bool = False) -> list:
    return [p for p in command.params
            if getattr(p, "param_type_name", "") == "option" and (hidden or not p.hidden)]


def _spellings(param) -> list[str]:
    return [*param.opts, *param.secondary_opts]


def _plain(text: str) -> str:
    """roff source with the escapes that matter here undone (\\- is a hyphen, \\(dq a quote, fonts)."""
    text = re.sub(r"\\f[BIRP]", "", text).replace("\\-", "-").replace("\\(dq", '"').replace("\\e", "\\")
    return text


def _synopsis_blocks(text: str) -> list[tuple[str, str]]:
    """(command name, its synopsis text) for each `.B vlmtools CMD` in SYNOPSIS; a block ends at the next
    one, at .br or at .PP."""
    if ".SH SYNOPSIS" not in text:
        return []
    synopsis = text.split(".SH SYNOPSIS", 1)[1].split("\n.SH", 1)[0]
    blocks = []
    for chunk in re.split(r"^\.(?:br|PP)\s*$", synopsis, flags=re.M):
        match = re.search(r"^\.B vlmtools((?: [a-z0-9]+)*)\s*$", chunk, re.M)
        if not match:
            continue
        words = match.group(1).split()
        name = next((" ".join(words[:n]) for n in (2, 1) if " ".join(words[:n]) in BY_NAME), None)
        if name is None and words[:1] == ["eval"]:
            name = "eval predictions"  # `vlmtools eval PRED.jsonl` is the group's default command
        if name is None and not words:
            name = ""
        assert name is not None, f"SYNOPSIS names an unknown command: vlmtools {' '.join(words)}"
        blocks.append((name, _plain(chunk)))
    return blocks


def _mentioned(text: str) -> set[str]:
    plain = _plain(text)
    longs = re.findall(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*)", plain)
    shorts = re.findall(r"(?<![\w/.-])(-[a-zA-Z])(?![\w-])", plain)
    return set(longs) | set(shorts)


def _command(name: str):
    return ROOT if name == "" else BY_NAME[name]


def _choices(param) -> list[str] | None:
    desc = getattr(param, "type_descriptor", None)
    if desc is None or not desc.is_choice:
        return None
    return [str(getattr(c, "value", c)) for c in desc.choices or ()]


def test_every_command_has_a_page():
    covered = {name for page in PAGES for name, _ in _synopsis_blocks(page.read_text())}
    missing = sorted(set(BY_NAME) - covered)
    assert not missing, f"commands in no man page's SYNOPSIS: {missing}"


@pytest.mark.parametrize("page", [p for p in PAGES if p.suffix == ".1"], ids=lambda p: p.name)
def test_page_documents_the_options_of_its_commands(page):
    text = page.read_text()
    blocks = _synopsis_blocks(text)
    assert blocks, f"{page.name}: no SYNOPSIS naming a vlmtools command"
    mentioned = _mentioned(text)
    problems = []
    for name, _ in blocks:
        for param in _options(_command(name)):
            spellings = [s for s in _spellings(param) if s not in GLOBAL and s != "-h"]
            if spellings and not set(spellings) & mentioned:
                problems.append(f"{name}: {'/'.join(spellings)} is in --help but not in {page.name}")
    assert not problems, "\n".join(problems)


def test_pages_name_only_options_that_exist():
    every = set(GLOBAL) | SCRIPT_OPTIONS
    for _, command in [("", ROOT), *COMMANDS]:
        for param in _options(command, hidden=True):
            every.update(s for s in _spellings(param) if s.startswith("--"))
    problems = []
    for page in PAGES:
        for option in sorted(o for o in _mentioned(page.read_text()) if o.startswith("--")):
            if option not in every:
                problems.append(f"{page.name}: {option} is no option of any command")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", [p for p in PAGES if p.suffix == ".1"], ids=lambda p: p.name)
def test_synopsis_options_and_choices_match_help(page):
    problems = []
    for name, block in _synopsis_blocks(page.read_text()):
        command = _command(name)
        params = {s: p for p in _options(command, hidden=True) for s in _spellings(p)}
        for option in sorted(_mentioned(block)):
            if option not in params and option not in GLOBAL | {"-h", "-q", "-v"}:
                problems.append(f"{page.name}: vlmtools {name}: {option} is in the SYNOPSIS, not in --help")
        choice = r"[\w-]+(?:\[:?\w+\])?"  # cpu, cuda[:N]
        for option, values in re.findall(rf"(--?[a-z0-9][a-z0-9-]*)[\s\"]+({choice}(?:\|{choice})+)", block):
            param = params.get(option)
            shown = _choices(param) if param is not None else None
            if shown is not None and sorted(values.split("|")) != sorted(shown):
                problems.append(f"{page.name}: vlmtools {name} {option}: SYNOPSIS {values}, --help "
                                f"{'|'.join(shown)}")
    assert not problems, "\n".join(problems)


# The alternating-font macros join their arguments without spaces: `.BR "--wrap none" ). This is` renders
# as "--wrap none).Thisis". Two plain words in a row among the arguments are that mistake.
ALTERNATING = re.compile(r"^\.(BR|RB|IR|RI|BI|IB)\s+(.*)$")


def _macro_arguments(line: str) -> list[tuple[str, bool]]:
    """(argument, was quoted) of a roff request line."""
    return [(m.group(1), True) if m.group(1) is not None else (m.group(2), False)
            for m in re.finditer(r'"((?:[^"]|"")*)"|(\S+)', line)]


def test_alternating_font_macros_glue_no_prose():
    problems = []
    for page in PAGES:
        for number, line in enumerate(page.read_text().splitlines(), 1):
            match = ALTERNATING.match(line)
            if not match:
                continue
            args = _macro_arguments(match.group(2))
            words = [not quoted and re.fullmatch(r"[A-Za-z]{2,}[,.;:]?", arg) is not None for arg, quoted in args]
            if any(a and b for a, b in zip(words, words[1:])):
                problems.append(f"{page.name}:{number}: {line}")
    assert not problems, "words glued together when rendered:\n" + "\n".join(problems)


def test_lint_catches_the_glued_words_it_is_for():
    line = '.BR "\\-\\-wrap none" ). This is the default method when'
    args = _macro_arguments(ALTERNATING.match(line).group(2))
    assert [a for a, _ in args][:3] == ["\\-\\-wrap none", ").", "This"]


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff is not installed")
def test_pages_render_without_groff_warnings():
    for page in PAGES:
        proc = subprocess.run(["groff", "-k", "-man", "-Tutf8", "-ww", "-z", str(page)], capture_output=True, text=True)
        assert proc.returncode == 0 and not proc.stderr.strip(), (page.name, proc.stderr)


def test_every_page_is_installed_with_the_package():
    """pyproject's data-files put every page into share/man/manN of the environment (`man vlmtools` in
    an activated venv); a page left out of those globs would be missing after `pip install .`."""
    import fnmatch
    import tomllib

    config = tomllib.loads((MAN.parent / "pyproject.toml").read_text())
    data_files = config["tool"]["setuptools"]["data-files"]
    for page in PAGES:
        section = page.suffix[1:]
        globs = data_files.get(f"share/man/man{section}", [])
        assert any(fnmatch.fnmatch(f"man/{page.name}", g) for g in globs), (page.name, data_files)
