"""`vlmtools search STORE`: nearest store rows to text, image or stored queries, as NDJSON on stdout."""

from __future__ import annotations

from typing import List, Optional

import typer

from vlmtools.cli.common import DeviceOpt, ModelOpt, Precision, PrecisionOpt, PretrainedOpt, handle_errors, require_stdout


def register(app: typer.Typer) -> None:
    @app.command("search")
    @handle_errors
    def search_cmd(
        store: str = typer.Argument(..., help="Store directory to search."),
        text: Optional[List[str]] = typer.Option(None, "--text", "-t", help="Text query (repeatable)."),
        image: Optional[List[str]] = typer.Option(None, "--image", "-i", help="Image query (repeatable)."),
        query_store: Optional[str] = typer.Option(None, "--store", "-s", help="Use every row of this store "
                                                  "(same model) as a query."),
        k: int = typer.Option(10, "-k", "--top-k", help="Hits per query."),
        files: bool = typer.Option(False, "--files", "-f", help="Print hit paths only, one per line."),
        exact: bool = typer.Option(False, "--exact", help="Ignore the index; score every row."),
        nprobe: Optional[int] = typer.Option(None, "--nprobe", help="IVF lists searched per query (default: "
                                             "the one saved by `vlmtools index`)."),
        rerank: Optional[int] = typer.Option(None, "--rerank", help="Fetch N*k candidates from the index and "
                                             "rescore them exactly from the store (0 = off; default: saved "
                                             "by `vlmtools index`)."),
        model: Optional[str] = ModelOpt,
        pretrained: Optional[str] = PretrainedOpt,
        device: str = DeviceOpt,
        precision: Precision = PrecisionOpt,
    ) -> None:
        """Search a store; rows {rank, score, id, path|text, label, ...} (+ query when there are several)."""
        from vlmtools.errors import BadInput
        from vlmtools.formats import dumps_line
        from vlmtools.search import search

        require_stdout()
        hits = search(store, texts=text or (), images=image or (), query_store=query_store, k=k, model=model,
                      pretrained=pretrained, device=device, exact=exact,
                      precision=precision, nprobe=nprobe, rerank=rerank)
        if files:
            if any("path" not in h for h in hits):
                raise BadInput(f"{store}: its rows have no paths (a text store?); drop -f/--files")
            typer.echo("".join(h["path"] + "\n" for h in hits), nl=False)
            return
        typer.echo("".join(dumps_line(h) for h in hits), nl=False)
