"""The one stderr console and progress helper. Library code reports through here, never print()."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.markup import escape

# stdout carries data only: every human-facing message goes to stderr.
console = Console(stderr=True, highlight=False)

_quiet = os.environ.get("VLMTOOLS_QUIET", "") not in ("", "0")


def set_quiet(value: bool) -> None:
    global _quiet
    _quiet = value


def info(message, *, markup: bool = False) -> None:
    """A progress/summary line (or a rich renderable such as a Table). Text is printed as is: user-supplied
    strings (paths with ``[``, class names) never reach rich's markup parser unless ``markup=True``."""
    if not _quiet:
        console.print(message, soft_wrap=True, markup=markup)


def warn(message: str) -> None:
    console.print(f"[yellow]warning:[/yellow] {escape(message)}", soft_wrap=True)


def error(message: str) -> None:
    console.print(f"[bold red]error:[/bold red] {escape(message)}", soft_wrap=True)


class _Task:
    """A handle on one progress bar; a no-op when quiet or stderr is not a terminal-like sink."""

    def __init__(self, progress, task_id):
        self._progress = progress
        self._task_id = task_id

    def advance(self, n: int = 1, **fields) -> None:
        if self._progress is not None:
            self._progress.update(self._task_id, advance=n, **fields)

    def update(self, **fields) -> None:
        if self._progress is not None:
            self._progress.update(self._task_id, **fields)


@contextmanager
def progress(description: str, total: int | None = None, unit: str = "items") -> Iterator[_Task]:
    """A rich progress bar on stderr showing count, rate (``unit``/s) and ETA."""
    if _quiet:
        yield _Task(None, None)
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
    with Progress(*columns, console=console, transient=False,
                  disable=not sys.stderr.isatty() and os.environ.get("VLMTOOLS_PROGRESS") != "1") as bar:
        task_id = bar.add_task(escape(description), total=total, rate="")
        handle = _RateTask(bar, task_id, unit)
        yield handle


class _RateTask(_Task):
    def __init__(self, progress, task_id, unit):
        super().__init__(progress, task_id)
        self._unit = unit

    def advance(self, n: int = 1, **fields) -> None:
        self._progress.update(self._task_id, advance=n, **fields)
        task = self._progress.tasks[self._task_id]
        # Average rate since the start: rich's windowed speed jumps wildly when work arrives in bursts.
        elapsed = task.elapsed or 0.0
        rate = f"{task.completed / elapsed:,.1f} {self._unit}/s" if elapsed > 0.5 else ""
        self._progress.update(self._task_id, rate=rate)
