"""Progress where there is no terminal: plain lines with count, rate, ETA and errors; a loading line
before a model load."""

import io

import pytest

from typer.testing import CliRunner

from vlmtools import console
from vlmtools.cli.app import app

runner = CliRunner()


@pytest.fixture
def captured(monkeypatch):
    buf = io.StringIO()
    from rich.console import Console

    monkeypatch.setattr(console, "console", Console(file=buf, force_terminal=False, width=200))
    monkeypatch.setattr(console, "_quiet", False)
    return buf


def test_plain_progress_lines_when_stderr_is_no_terminal(captured, monkeypatch):
    monkeypatch.setenv("VLMTOOLS_PROGRESS_INTERVAL", "0")
    with console.progress("embed images -> s", total=4, unit="img") as bar:
        bar.advance(1)
        bar.advance(2, errors=1)
        bar.start -= 10  # as if 10 s had passed: a final line is due, with a rate and an ETA
        bar.advance(0)
    lines = captured.getvalue().splitlines()
    assert lines[0].startswith("embed images -> s: 1/4 (25%)")
    assert "3/4 (75%)" in lines[1] and "1 error" in lines[1]
    assert "img/s" in lines[-1] and "ETA" in lines[-1] and "elapsed" in lines[-1]
    assert "\x1b" not in captured.getvalue() and "\r" not in captured.getvalue()  # plain text for logs


def test_progress_lines_are_spaced_and_quiet_silences_them(captured, monkeypatch):
    monkeypatch.setenv("VLMTOOLS_PROGRESS_INTERVAL", "3600")
    with console.progress("work", total=100) as bar:
        for _ in range(100):
            bar.advance(1)
    assert captured.getvalue() == ""  # quick work under a long interval: no line at all
    monkeypatch.setattr(console, "_quiet", True)
    monkeypatch.setenv("VLMTOOLS_PROGRESS_INTERVAL", "0")
    with console.progress("work", total=2) as bar:
        bar.advance(2)
    assert captured.getvalue() == ""


def test_embed_says_what_it_loads_and_logs_progress(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMTOOLS_PROGRESS_INTERVAL", "0")
    monkeypatch.setattr(console, "_quiet", False)  # restored after the test: the -q run below sets it
    args = ["embed", "text", "-", "-m", "vlmtools-tiny", "-p", "none", "-b", "1"]
    result = runner.invoke(app, [*args, "-o", str(tmp_path / "s")], input="a red bird\na grey gull\n")
    assert result.exit_code == 0, result.output
    err = result.stderr.splitlines()
    loading = next(i for i, line in enumerate(err) if line.startswith("loading model vlmtools-tiny"))
    progress = [i for i, line in enumerate(err) if "embed text" in line and "/2 (" in line]
    assert progress and loading < progress[0]
    quiet = runner.invoke(app, [*args, "-o", str(tmp_path / "q"), "-q"], input="x\n")  # -q after the command
    assert quiet.exit_code == 0 and quiet.stderr == ""
