"""`vlmtools eval table`: methods x domains, mean ± std over runs (study 004's Table 1)."""

from __future__ import annotations

from typing import List, Optional

import typer

from vlmtools.cli.common import handle_errors, subgroup


def register(app: typer.Typer) -> None:
    eval_app = subgroup(app, "eval", "Evaluate predictions.")

    @eval_app.command("table")
    @handle_errors
    def table_cmd(
        runs: List[str] = typer.Argument(..., metavar="NAME=PRED", help="NAME=PREDICTIONS.jsonl, one per run; repeat NAME for each "
                                         "seed of a method (rows keep the order of first appearance)."),
        by: Optional[str] = typer.Option(None, "--by", help="Manifest key whose values are the columns "
                                         "(e.g. domain); default: one column, all images."),
        columns: List[str] = typer.Option([], "--column", help="LABEL=VALUE: a column named LABEL for the "
                                          "images with --by KEY=VALUE (repeatable, in order; e.g. "
                                          "in-domain=photo); default: every value of --by."),
        json_lines: bool = typer.Option(False, "--json", help="NDJSON, one object per method, accuracies as "
                                        "fractions, instead of the TSV."),
        output: str = typer.Option("-", "--output", "-o", help="Where the table goes (default stdout)."),
    ) -> None:
        """Top-1 of several methods across domains, mean (±std) over each method's runs, as TSV.

        Each NAME=FILE is one run (e.g. one seed) of method NAME; a cell is the mean top-1 % of that
        method's runs on the images of one column, "(±std)" the standard deviation over runs (ddof 0)
        when it has more than one. `examples/synth/lare.sh` prints study 004's Table 1 with it."""
        from vlmtools.tables import table_file

        table_file(runs, by=by, columns=columns, output=output, json_lines=json_lines)
