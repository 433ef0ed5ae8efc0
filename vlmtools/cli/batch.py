"""`vlmtools batch FILE`: many vlmtools command lines in one process, so torch and open_clip are imported
once and each model is loaded once (the reproduction scripts run tens of commands per model)."""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import typer

from vlmtools.cli.common import handle_errors
from vlmtools.errors import BadInput

KEPT_MODELS = 2  # models kept loaded at once (the least recently used is dropped)


@dataclass
class Line:
    number: int
    args: list[str]
    stdout: str | None  # `> FILE` at the end of the line
    heading: str = ""   # the last '# ==' comment line above it

    def __str__(self) -> str:
        shown = "vlmtools " + shlex.join(self.args)
        return shown + (f" > {shlex.quote(self.stdout)}" if self.stdout else "")


def parse_lines(text: str, source: str) -> list[Line]:
    """Shell words per line (POSIX quoting, '#' comments, a trailing backslash continues the line);
    `> FILE` as the last two words sends that command's stdout to FILE; a comment line starting with
    '# ==' is a heading of the lines below it. BadInput names file:line."""
    lines, pending, start, heading = [], "", 0, ""
    for number, raw in enumerate(text.split("\n"), 1):
        if not pending:
            start = number
            if raw.startswith("# =="):
                heading = raw[4:].strip()
                continue
        if raw.endswith("\\") and not raw.endswith("\\\\"):
            pending += raw[:-1] + " "
            continue
        logical, pending = pending + raw, ""
        try:
            words = shlex.split(logical, comments=True)
        except ValueError as exc:
            raise BadInput(f"{source}:{start}: {exc}") from None
        if not words:
            continue
        if words[0] == "vlmtools":
            words = words[1:]
        stdout = None
        if len(words) >= 2 and words[-2] == ">":
            words, stdout = words[:-2], words[-1]
        if not words or ">" in words:
            raise BadInput(f"{source}:{start}: expected a vlmtools command, optionally ending in '> FILE'")
        if words[0] == "batch":
            raise BadInput(f"{source}:{start}: a batch cannot run another batch")
        lines.append(Line(start, words, stdout, heading))
    if pending:
        raise BadInput(f"{source}: the last line ends in a backslash")
    return lines


@contextlib.contextmanager
def _stdout_to(path: str | None):
    """The block's stdout into PATH, atomically: PATH appears only if the block succeeds."""
    if path is None:
        yield
        return
    tmp = Path(f"{path}.tmp{os.getpid()}")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    ok = False
    try:
        with open(tmp, "w", encoding="utf-8") as fh, contextlib.redirect_stdout(fh):
            yield
            ok = True
    finally:
        if ok:
            os.replace(tmp, path)
        else:
            tmp.unlink(missing_ok=True)


def run_line(line: Line) -> int:
    """One command line in this process: its exit code (0 on success)."""
    import click

    from vlmtools import console
    from vlmtools.cli.app import app

    quiet, verbose = console.is_quiet(), console.is_verbose()  # a line's -q/-v holds for that line only
    code = 0
    try:
        with _stdout_to(line.stdout):
            code = app(line.args, prog_name="vlmtools", standalone_mode=False) or 0
            if not isinstance(code, int):
                code = 0
            if code:
                raise click.exceptions.Exit(code)  # leaves no half-written > FILE
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.ClickException as exc:  # usage errors: typer's message, exit 2
        exc.show()
        code = exc.exit_code
    except click.exceptions.Abort:
        code = 130
    finally:
        console.set_quiet(quiet)
        console.set_verbose(verbose)
        sys.stdout.flush()
    return code


def run_batch(lines: list[Line], source: str) -> int:
    from vlmtools.console import debug, error, info
    from vlmtools.models import keep_loaded

    t0 = time.perf_counter()
    heading = ""
    with keep_loaded(KEPT_MODELS):
        for i, line in enumerate(lines, 1):
            if line.heading != heading:
                heading = line.heading
                info(f"== {heading}")
            info(f"[{i}/{len(lines)}] {line}")
            started = time.perf_counter()
            code = run_line(line)
            debug(f"[{i}/{len(lines)}] exit {code} in {time.perf_counter() - started:.1f} s")
            if code:
                where = f" (in: {heading})" if heading else ""
                error(f"{source}:{line.number}{where}: exit {code}: {line}")
                return code
    info(f"batch: {len(lines)} commands in {time.perf_counter() - t0:.1f} s")
    return 0


def register(app: typer.Typer) -> None:
    @app.command("batch")
    @handle_errors
    def batch_cmd(
        file: str = typer.Argument(..., metavar="FILE", help="Command lines: one vlmtools command per line "
                                   "(shell quoting, # comments, '> FILE' for its stdout); '-' for stdin."),
    ) -> None:
        """Run vlmtools commands in one process: torch loads once and each model once.

        Lines run in order and stop at the first that fails, with its exit code. A line may start with
        `vlmtools` or not; `> FILE` at its end writes its stdout to FILE (only if it succeeds). -q/-v on a
        line hold for that line. A comment line starting with '# ==' is a heading, shown when reached.
        With FILE '-', no line may read stdin."""
        from vlmtools.formats import read_text

        text = read_text(file)
        lines = parse_lines(text, "stdin" if file == "-" else file)
        if not lines:
            raise BadInput(f"{file}: no command lines")
        code = run_batch(lines, "stdin" if file == "-" else file)
        if code:
            raise typer.Exit(code)
