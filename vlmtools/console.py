"""The one stderr console and progress helper. Library code reports through here, never print()."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from functools import lru_cache
from typing import Iterator

from vlmtools.redact import REDACTED, escape_controls, scrub

# rich loads on the first message (~20 ms): a command that prints nothing, such as a quiet classify from
# stores, never imports it. `console` and `SafeConsole` are module attributes made on first use.


def escape(text: str) -> str:
    from rich.markup import escape as rich_escape

    return rich_escape(text)


@lru_cache(maxsize=None)
def _safe_console_class():
    from rich.console import Console
    from rich.markup import escape as rich_escape
    from rich.segment import Segment

    class SafeConsole(Console):
        """A rich Console whose text never carries a registered secret (vlmtools.redact) nor a control
        character from the text it shows (an ANSI escape in a server's message, a descriptor, a file name):
        those are shown escaped. Rich's own styling and cursor control pass, as they are separate segments."""

        def render_str(self, text: str, **kwargs):
            # strings (messages, table cells) are cleaned before rich measures them, so columns fit; in markup
            # the replacement is escaped, or rich would take "[redacted]" for a style tag
            markup = kwargs.get("markup")
            replacement = rich_escape(REDACTED) if (self._markup if markup is None else markup) else REDACTED
            return super().render_str(escape_controls(scrub(text, replacement)), **kwargs)

        def render(self, renderable, options=None):
            for segment in super().render(renderable, options):
                if segment.control is None and segment.text:
                    text = escape_controls(scrub(segment.text))
                    if text is not segment.text:
                        segment = Segment(text, segment.style)
                yield segment

    return SafeConsole


def _console():
    """The stderr console (made on first use; a test may replace the module's ``console``)."""
    made = globals().get("console")
    if made is None:
        # stdout carries data only: every human-facing message goes to stderr.
        made = globals()["console"] = _safe_console_class()(stderr=True, highlight=False)
    return made


def __getattr__(name: str):
    if name == "console":
        return _console()
    if name == "SafeConsole":
        return _safe_console_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_quiet = os.environ.get("VLMTOOLS_QUIET", "") not in ("", "0")
_verbose = os.environ.get("VLMTOOLS_VERBOSE", "") not in ("", "0")


def set_quiet(value: bool) -> None:
    global _quiet
    _quiet = value


def set_verbose(value: bool) -> None:
    global _verbose
    _verbose = value


def is_verbose() -> bool:
    return _verbose


def is_quiet() -> bool:
    return _quiet


def info(message, *, markup: bool = False) -> None:
    """A progress/summary line (or a rich renderable such as a Table). Text is printed as is: user-supplied
    strings (paths with ``[``, class names) never reach rich's markup parser unless ``markup=True``."""
    if not _quiet:
        # lines of text are never broken (logs are grepped); a table is laid out to the console's width
        _console().print(message, soft_wrap=isinstance(message, str), markup=markup)


def debug(message: str) -> None:
    """A detail shown only with -v/--verbose (plain text, not markup)."""
    if _verbose:
        _console().print(f"[dim]{escape(message)}[/dim]", soft_wrap=True)


def warn(message: str) -> None:
    _console().print(f"[yellow]warning:[/yellow] {escape(message)}", soft_wrap=True)


def error(message: str) -> None:
    _console().print(f"[bold red]error:[/bold red] {escape(message)}", soft_wrap=True)


def loading(what: str) -> None:
    """Say what is about to load before a slow load (a model, an index), so a silent pause has a reason."""
    info(f"loading {what} ...")


def stderr_is_terminal() -> bool:
    return _console().is_terminal


def data_to_terminal(output) -> bool:
    """Whether data for ``output`` ('-' is stdout) would land on a terminal. Commands that show a table
    of the same results on stderr then print only the table (the rule of man vlmtools, CONVENTIONS): the
    data goes to a pipe, a redirect or -o FILE."""
    import sys

    try:
        return str(output) == "-" and sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def hint_data_elsewhere(what: str = "the NDJSON rows") -> None:
    info(f"[dim]({escape(what)}: pipe the output or pass -o FILE; a terminal gets the table only)[/dim]",
         markup=True)


# ----------------------------------------------------------------------------- progress

def _interval() -> float:
    """Seconds between plain progress lines when stderr is no terminal ($VLMTOOLS_PROGRESS_INTERVAL)."""
    try:
        return max(0.0, float(os.environ.get("VLMTOOLS_PROGRESS_INTERVAL", "30")))
    except ValueError:
        return 30.0


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class _Task:
    """A handle on one progress display; a no-op when quiet."""

    def __init__(self, description: str = "", total: int | None = None, unit: str = "items"):
        self.description = description
        self.total = total
        self.unit = unit
        self.completed = 0
        self.errors = 0
        self.start = time.monotonic()

    def advance(self, n: int = 1, errors: int = 0, **fields) -> None:
        self.completed += n
        self.errors += errors
        self.update(**fields)

    def update(self, description: str | None = None, **fields) -> None:
        if description is not None:
            self.description = description

    def rate(self) -> float | None:
        elapsed = time.monotonic() - self.start
        # Average rate since the start: a windowed speed jumps wildly when work arrives in bursts.
        return self.completed / elapsed if elapsed > 0.5 else None

    def status(self) -> str:
        """'1,200/5,000 (24%), 35.2 img/s, ETA 1m48s, 3 errors' — the plain line's text."""
        done = f"{self.completed:,}" + (f"/{self.total:,} ({100 * self.completed / self.total:.0f}%)"
                                        if self.total else "")
        parts = [done]
        rate = self.rate()
        if rate:
            parts.append(f"{rate:,.1f} {self.unit}/s")
            if self.total and self.completed < self.total:
                parts.append(f"ETA {_duration((self.total - self.completed) / rate)}")
        parts.append(f"elapsed {_duration(time.monotonic() - self.start)}")
        if self.errors:
            parts.append(f"{self.errors:,} error{'s' if self.errors != 1 else ''}")
        return ", ".join(parts)


class _LineTask(_Task):
    """Where stderr is no terminal (nohup, SLURM, CI logs): one plain line every few seconds, and at the end."""

    def __init__(self, description, total, unit, interval):
        super().__init__(description, total, unit)
        self._interval = interval
        self._last = self.start

    def update(self, description: str | None = None, **fields) -> None:
        super().update(description)
        now = time.monotonic()
        if now - self._last >= self._interval:
            self._last = now
            self.emit()

    def emit(self) -> None:
        _console().print(f"{escape(self.description)}: {self.status()}", soft_wrap=True, markup=True)


class _RichTask(_Task):
    def __init__(self, bar, description, total, unit):
        super().__init__(description, total, unit)
        self._bar = bar
        self._id = bar.add_task(escape(description), total=total, rate="")

    def update(self, description: str | None = None, **fields) -> None:
        super().update(description)
        rate = self.rate()
        errors = f", {self.errors:,} errors" if self.errors else ""
        self._bar.update(self._id, completed=self.completed, description=escape(self.description),
                         rate=(f"{rate:,.1f} {self.unit}/s" if rate else "") + errors)


@contextmanager
def progress(description: str, total: int | None = None, unit: str = "items") -> Iterator[_Task]:
    """Progress of long work on stderr: a rich bar (count, rate in ``unit``/s, ETA) on a terminal; plain
    lines every $VLMTOOLS_PROGRESS_INTERVAL seconds (default 30) and one at the end elsewhere, so logs
    of nohup/SLURM/CI jobs show how far a run got. ``advance(n, errors=k)`` counts failures too."""
    if _quiet:
        yield _Task(description, total, unit)
        return
    if not stderr_is_terminal() and os.environ.get("VLMTOOLS_PROGRESS") != "1":
        task = _LineTask(description, total, unit, _interval())
        yield task
        if task.completed and time.monotonic() - task.start >= 2:  # a final line, but not for quick work
            task.emit()
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn,
                               TextColumn, TimeElapsedColumn, TimeRemainingColumn)

    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=_console(), transient=False) as bar:
        yield _RichTask(bar, description, total, unit)
