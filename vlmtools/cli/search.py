"""`vlmtools search STORE`: nearest store rows to text, image or stored queries, as NDJSON on stdout;
`vlmtools serve STORE`: the same as a small HTTP JSON API on localhost (one model load, many queries)."""

from __future__ import annotations

from typing import List, Optional

import typer

from vlmtools.cli.common import (DeviceOpt, ModelOpt, Precision, PrecisionOpt, PretrainedOpt, handle_errors,
                                 require_stdout, store_argument, store_option)


def register(app: typer.Typer) -> None:
    @app.command("search")
    @handle_errors
    def search_cmd(
        store: str = store_argument("Store directory to search."),
        text: Optional[List[str]] = typer.Option(None, "--text", "-t", help="Text query (repeatable); '-' reads "
                                                 "one query per line from stdin."),
        text_file: Optional[str] = typer.Option(None, "--text-file", metavar="FILE", help="Text queries, one per "
                                                "line ('-' is stdin); all in one run, one model load."),
        image: Optional[List[str]] = typer.Option(None, "--image", "-i", help="Image query (repeatable)."),
        ids: Optional[List[str]] = typer.Option(None, "--id", help="Use the stored row with this id as the "
                                                "query (repeatable; no model is loaded)."),
        query_store: Optional[str] = store_option("--store", help="Use every row of this store (same model) "
                                                  "as a query."),
        where: List[str] = typer.Option([], "--where", help="Only hits whose metadata KEY=VALUE (repeatable, "
                                        "e.g. --where split=test; searched exactly)."),
        k: int = typer.Option(10, "-k", "--top-k", help="Hits per query."),
        files: bool = typer.Option(False, "--files", help="Print hit paths only, one per line."),
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
        from vlmtools.search import read_query_lines, search

        require_stdout()
        texts = list(text or ())
        if "-" in texts:
            if text_file == "-":
                raise BadInput("--text - and --text-file - both read stdin; give one")
            texts = [t for t in texts if t != "-"] + read_query_lines("-", "--text")
        if text_file is not None:
            texts += read_query_lines(text_file)
        hits = search(store, texts=texts, images=image or (), query_store=query_store, k=k, model=model,
                      pretrained=pretrained, device=device, exact=exact, ids=ids or (), where=where,
                      precision=precision, nprobe=nprobe, rerank=rerank)
        if files:
            if any("path" not in h for h in hits):
                raise BadInput(f"{store}: its rows have no paths (a text store?); drop --files")
            typer.echo("".join(h["path"] + "\n" for h in hits), nl=False)
            return
        typer.echo("".join(dumps_line(h) for h in hits), nl=False)

    @app.command("serve")
    @handle_errors
    def serve_cmd(
        store: str = store_argument("Store directory to serve."),
        host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (localhost by default: "
                                 "there is no authentication)."),
        port: int = typer.Option(1234, "--port", min=0, max=65535, help="TCP port (0: any free one; the "
                                 "address is printed on stderr)."),
        max_k: int = typer.Option(1000, "--max-k", min=1, help="Largest k a request may ask for."),
        request_timeout: float = typer.Option(10.0, "--request-timeout", help="Seconds a client may take to "
                                              "send a whole request (then 408)."),
        exact: bool = typer.Option(False, "--exact", help="Ignore the index; score every row."),
        model: Optional[str] = ModelOpt,
        pretrained: Optional[str] = PretrainedOpt,
        device: str = DeviceOpt,
        precision: Precision = PrecisionOpt,
    ) -> None:
        """Serve a store as a small HTTP JSON API on localhost; the store, its index and its model load once.

        POST /search with {"text"|"id"|"image_base64"|"embedding", "k", "where"} answers the hits that
        `vlmtools search` prints; GET / the store's summary; POST /knn-service is clip-retrieval's. ^C or
        SIGTERM stops it once the requests in flight are answered. See `man vlmtools-search`."""
        from vlmtools.serve import serve

        serve(store, host=host, port=port, max_k=max_k, model=model, pretrained=pretrained, device=device,
              exact=exact, precision=precision, request_deadline=request_timeout)
