"""The command-line conventions of man/vlmtools.1 (CONVENTIONS), checked on every registered command,
including commands added after this test was written: it walks the app's whole command tree."""

from __future__ import annotations

import re

import pytest
import typer
from typer.testing import CliRunner

from vlmtools.cli.app import app, split_global_flags

runner = CliRunner()

# One meaning per short flag, across all commands: short flag -> its long name.
SHORT_FLAGS = {
    "-o": "--output", "-k": "--top-k", "-m": "--model", "-p": "--pretrained", "-h": "--help",
    "-q": "--quiet", "-v": "--verbose", "-b": "--batch-size", "-j": "--workers", "-c": "--classes",
    "-d": "--descriptors", "-t": "--text", "-i": "--image", "-s": "--style", "-a": "--all",
}
# ... and one kind of value: a number, a flag, or text (a file, a name), as the help names it.
SHORT_FLAG_VALUES = {"-k": "N", "-b": "N", "-j": "N", "-c": "FILE", "-d": "FILE", "-m": "MODEL", "-p": "TAG"}
# Long names that other spellings replaced: --plots DIR for plots, -o/--output for outputs.
RETIRED = {"--plot": "--plots", "--png": "--plots", "--out": "--output", "--output-dir": "--output",
           "--json-out": "--output", "--limit-n": "--limit"}


def _commands(command, path=()):
    subs = getattr(command, "commands", None)
    if subs is None:
        yield " ".join(path), command
        return
    for name, sub in subs.items():
        yield from _commands(sub, (*path, name))


ROOT = typer.main.get_command(app)
COMMANDS = sorted(_commands(ROOT))


def _options(command):
    return [p for p in command.params if getattr(p, "param_type_name", "") == "option"]


def test_walks_every_command():
    names = {name for name, _ in COMMANDS}
    assert {"embed images", "search", "classify", "eval predictions", "explain text", "describe"} <= names


def test_short_flags_have_one_meaning_everywhere():
    from vlmtools.cli.help import option_metavar

    problems = []
    for name, command in COMMANDS:
        visible = {o for opt in _options(command) if not opt.hidden for o in opt.opts + opt.secondary_opts}
        for opt in _options(command):
            if opt.hidden:  # an old spelling kept for one release: it must say what replaced it
                help_ = opt.help or ""
                instead = help_.removeprefix("Deprecated: use ").rstrip(".")
                if not help_.startswith("Deprecated: ") or (help_.startswith("Deprecated: use ")
                                                            and instead not in visible):
                    problems.append(f"{name}: hidden option {opt.opts} is no deprecated alias of a visible one")
                continue
            longs = [o for o in opt.opts + opt.secondary_opts if o.startswith("--")]
            for short in (o for o in opt.opts if re.fullmatch(r"-[A-Za-z]", o)):
                expected = SHORT_FLAGS.get(short)
                if expected is None:
                    problems.append(f"{name}: {short} is no agreed short flag (use a long name, or add it to "
                                    f"man/vlmtools.1 CONVENTIONS and SHORT_FLAGS)")
                elif not longs or longs[0] != expected:
                    problems.append(f"{name}: {short} means {longs[:1]}, not {expected}")
                elif short in SHORT_FLAG_VALUES and option_metavar(opt) != SHORT_FLAG_VALUES[short]:
                    problems.append(f"{name}: {short} takes {option_metavar(opt)}, not {SHORT_FLAG_VALUES[short]}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("args,value,old", [
    (["synth", "make", "{tmp}/w", "-c", "2", "--per-class", "2"], '"classes": 2', "-c"),
    (["describe", "-", "--print-prompts", "-m", "some-llm"], '"class": "cat"', "--model/-m"),
])
def test_old_spellings_still_work_with_a_deprecation_line(tmp_path, args, value, old):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = runner.invoke(app, args, input="cat\n")
    assert result.exit_code == 0, result.output
    assert value in result.stdout
    assert f"{old} is deprecated here, use" in " ".join(result.stderr.split())
    assert old.split("/")[-1] not in runner.invoke(app, [*args[:args.index(old.split("/")[-1])], "--help"],
                                                   terminal_width=200).output.split()


def test_help_is_plain_and_names_values():
    """At 80 columns: capitals for arguments, values named (no `<list[str]>`, `<int range>`, `x>=1`), every
    option explained, brackets of the help text kept (rich markup used to eat `[parquet]`)."""
    for name, command in COMMANDS:
        text = runner.invoke(app, [*name.split(), "--help"], terminal_width=80).output
        usage = text.split("\n", 1)[0]
        assert usage.startswith(f"Usage: vlmtools {name} [OPTIONS]"), usage
        for arg in usage.split("[OPTIONS]", 1)[1].split():
            assert arg.strip("[].") == arg.strip("[].").upper(), (name, usage)
        assert not re.search(r"<(str|int|float|path|bool|list\[|\w+ range)|x[<>]=|\\\[|default: \(", text), (name, text)
        assert all(len(line) <= 80 for line in text.splitlines()), name
        for opt in _options(command):
            assert opt.hidden or opt.help, f"{name}: {opt.opts} has no help"
    assert "'vlmtools[parquet]'" in runner.invoke(app, ["store", "export", "--help"], terminal_width=80).output
    text = runner.invoke(app, ["eval", "explanations", "--help"], terminal_width=80).output
    assert "MAPS_DIR..." in text.split("\n", 1)[0]
    text = runner.invoke(app, ["demo", "--help"], terminal_width=80).output
    assert "at least 2" in text


def test_conventions_of_common_options():
    problems = []
    for name, command in COMMANDS:
        assert getattr(command.callback, "handles_errors", False), f"{name}: not wrapped in handle_errors"
        for opt in _options(command):
            for o in opt.opts + opt.secondary_opts:
                if o in RETIRED:
                    problems.append(f"{name}: {o} is spelled {RETIRED[o]}")
                if o in ("-q", "--quiet", "-v", "--verbose"):
                    problems.append(f"{name}: {o} belongs to the whole command line")
            if "--json" in opt.opts and not opt.is_flag:
                problems.append(f"{name}: --json is a switch (NDJSON on stdout); write files with -o/--output")
            if "--plots" in opt.opts and opt.is_flag:
                problems.append(f"{name}: --plots takes a directory")
            if "--where" in opt.opts and not opt.multiple:
                problems.append(f"{name}: --where is repeatable")
            if "--seed" in opt.opts and opt.type_descriptor.annotation is not int:
                problems.append(f"{name}: --seed takes an integer")
            if "--device" in opt.opts and opt.default != "auto":
                problems.append(f"{name}: --device defaults to auto")
            if "-k" in opt.opts and opt.type_descriptor.annotation is not int:
                problems.append(f"{name}: -k takes an integer")
    assert not problems, "\n".join(problems)


def test_help_shows_choices_and_no_flag_types():
    for name, command in COMMANDS:
        result = runner.invoke(app, [*name.split(), "--help"], terminal_width=200)
        assert result.exit_code == 0, (name, result.output)
        assert "<bool>" not in result.output, name
    text = runner.invoke(app, ["classify", "--help"], terminal_width=200).output
    assert "clip|cbd" in text and "mean|max|sum" in text


def test_styles_in_help_match_the_library():
    import typing

    from vlmtools.cli.describe import Style
    from vlmtools.describe.styles import STYLES

    assert list(typing.get_args(Style)) == list(STYLES)


@pytest.mark.parametrize("args,kept,found", [
    (["-q", "eval", "p.jsonl"], ["eval", "p.jsonl"], {"quiet"}),
    (["eval", "p.jsonl", "--by", "domain", "-q"], ["eval", "p.jsonl", "--by", "domain"], {"quiet"}),
    (["search", "S", "--text", "-v", "-v"], ["search", "S", "--text", "-v"], {"verbose"}),  # a value stays
    (["embed", "images", "-v", "m.jsonl", "-o", "s"], ["embed", "images", "m.jsonl", "-o", "s"], {"verbose"}),
    (["search", "S", "--", "-q"], ["search", "S", "--", "-q"], set()),
])
def test_quiet_and_verbose_anywhere(args, kept, found):
    assert split_global_flags(ROOT, args) == (kept, found)


def test_bad_choice_is_exit_2_before_work(tmp_path):
    result = runner.invoke(app, ["classify", str(tmp_path), "--method", "clipp"])
    assert result.exit_code == 2 and "clip" in result.output


def test_unknown_model_did_you_mean_before_loading(tmp_path):
    from vlmtools.errors import BadInput
    from vlmtools.models import ModelSpec

    with pytest.raises(BadInput, match="did you mean ViT-B-32"):
        ModelSpec.parse("ViT-B32")
    result = runner.invoke(app, ["embed", "text", "-", "-o", str(tmp_path / "s"), "-m", "vlmtools-micr"],
                           input="a\n")
    assert result.exit_code == 2 and "did you mean vlmtools-micro" in result.output
    assert not (tmp_path / "s").exists()


def test_completion(monkeypatch):
    from vlmtools.cli.common import complete_models, complete_stores

    assert "--install-completion" in runner.invoke(app, ["--help"]).output
    assert "vlmtools-micro" in complete_models("vlmtools-m")
    result = runner.invoke(app, [], prog_name="vlmtools", env={
        "_VLMTOOLS_COMPLETE": "complete_bash", "COMP_WORDS": "vlmtools classify S --method c", "COMP_CWORD": "4"})
    assert set(result.output.split()) >= {"clip", "cbd"}
    result = runner.invoke(app, [], prog_name="vlmtools", env={
        "_VLMTOOLS_COMPLETE": "complete_bash", "COMP_WORDS": "vlmtools describe C --style s", "COMP_CWORD": "4"})
    assert result.output.split() == ["structured", "sentences"]
    assert complete_stores("/nonexistent/x") == []


def test_internal_error_is_exit_3_with_a_hint(monkeypatch, tmp_path):
    import vlmtools.evaluate

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(vlmtools.evaluate, "evaluate_file", broken)
    result = runner.invoke(app, ["eval", str(tmp_path / "p.jsonl")])
    assert result.exit_code == 3 and "internal error: ZeroDivisionError: a bug" in result.output
    assert "-v" in result.output and "Traceback" not in result.output
