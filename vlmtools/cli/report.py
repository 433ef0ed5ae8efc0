"""`vlmtools report RUN_DIR`: one static HTML page of a run's results, comparisons, plots and explained
wrong answers."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from vlmtools.cli.common import handle_errors


def register(app: typer.Typer) -> None:
    @app.command("report")
    @handle_errors
    def report_cmd(
        run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="Directory holding eval NDJSON, eval compare "
                                       "rows, predictions and PNG plots (e.g. a `vlmtools demo` directory)."),
        output: Optional[str] = typer.Option(None, "--output", "-o", help="The HTML page ('-' is stdout).",
                                             show_default="RUN_DIR/report.html"),
        gallery: int = typer.Option(12, "--gallery", min=0, help="Explained wrong answers drawn from the "
                                    "predictions files (0: none)."),
    ) -> None:
        """Write one static HTML page (tables, plots, a gallery of explained wrong answers with their
        images, everything embedded) from what `eval`, `eval compare`, `classify` and `explain` wrote."""
        from vlmtools.report import write_report

        write_report(run_dir, output, gallery=gallery)
