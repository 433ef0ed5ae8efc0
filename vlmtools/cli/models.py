"""`vlmtools models`: list model specs and whether their weights are available offline."""

from __future__ import annotations

import typer

from vlmtools.cli.common import handle_errors


def register(app: typer.Typer) -> None:
    @app.command("models")
    @handle_errors
    def models_cmd(
        all_: bool = typer.Option(False, "--all", "-a", help="Also list open_clip tags whose weights are not cached."),
        json_: bool = typer.Option(False, "--json", help="NDJSON rows instead of a table."),
    ) -> None:
        """List available model specs (packaged test/offline models and cached open_clip weights)."""
        from vlmtools.formats import dumps_line
        from vlmtools.models import available_models

        rows = [r for r in available_models() if all_ or r["cached"]]
        if json_:
            for r in rows:
                typer.echo(dumps_line(r), nl=False)
            return
        typer.echo("model\tpretrained\tavailable offline\tsource")
        for r in rows:
            flag = "yes" if r["cached"] else "no"
            typer.echo(f"{r['model']}\t{r['pretrained']}\t{flag}\t{r['source']}")
