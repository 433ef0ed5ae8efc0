"""`vlmtools store info|check|ls|export STORE`: look into an embedding store instead of `cat info.json`."""

from __future__ import annotations

import typer

from vlmtools.cli.common import handle_errors, subgroup

JsonOpt = typer.Option(False, "--json", help="Machine-readable NDJSON on stdout instead of the table.")


def register(app: typer.Typer) -> None:
    store_app = subgroup(app, "store", "Inspect, check and export embedding stores.")

    @store_app.command("info")
    @handle_errors
    def info_cmd(store: str = typer.Argument(..., help="Store directory."), json_: bool = JsonOpt) -> None:
        """Rows, model, dim, dtype, shards, failed inputs, missing shards: one line per field (or --json)."""
        from vlmtools.formats import dumps_line
        from vlmtools.store import store_summary

        summary = store_summary(store)
        if json_:
            typer.echo(dumps_line(summary), nl=False)
            return
        model = summary["model"]
        shown = {**summary, "model": f"{model.get('name')} (pretrained={model.get('pretrained')})",
                 "missing_shards": ", ".join(map(str, summary["missing_shards"])) or "none",
                 "problems": "; ".join(summary["problems"]) or "none"}
        for key, value in shown.items():
            typer.echo(f"{key}\t{value}")

    @store_app.command("check")
    @handle_errors
    def check_cmd(store: str = typer.Argument(..., help="Store directory."),
                  quick: bool = typer.Option(False, "--quick", help="Headers and counts only; skip reading "
                                             "every row (NaN/inf) and every id (duplicates)."),
                  json_: bool = JsonOpt) -> None:
        """Check a store the way every reader does, and more: info.json, each shard's header, dtype, dims,
        size, meta row counts, NaN/inf, zero and non-unit rows, duplicate ids, missing or stray shards,
        the content digest, the index files. Exit 2 when something is wrong, naming the file."""
        from vlmtools.console import error, info
        from vlmtools.formats import dumps_line
        from vlmtools.store import check_store

        report = check_store(store, deep=not quick)
        if json_:
            typer.echo(dumps_line({k: v for k, v in report.items() if k != "info"}), nl=False)
        for problem in report["problems"]:
            error(problem)
        if report["ok"]:
            info(f"{store}: ok ({report['rows']} rows in {report['shards']} shard(s), {report['errors']} "
                 f"failed input(s){'' if quick else ', no NaN/inf rows, no duplicate ids'})")
        else:
            raise typer.Exit(2)

    @store_app.command("ls")
    @handle_errors
    def ls_cmd(store: str = typer.Argument(..., help="Store directory."), json_: bool = JsonOpt) -> None:
        """One line per shard: file, rows, dim, dtype, bytes, meta rows, failed inputs, problem (TSV)."""
        from vlmtools.formats import dumps_line
        from vlmtools.store import list_shards

        rows = list_shards(store)
        if json_:
            typer.echo("".join(dumps_line(r) for r in rows), nl=False)
            return
        keys = ("shard", "rows", "dim", "dtype", "bytes", "meta_rows", "errors", "problem")
        typer.echo("\t".join(keys))
        for r in rows:
            typer.echo("\t".join("" if r[k] is None else str(r[k]) for k in keys))

    @store_app.command("export")
    @handle_errors
    def export_cmd(store: str = typer.Argument(..., help="Store directory."),
                   output: str = typer.Option(..., "--output", "-o", metavar="DIR", help="Directory for meta-XXXXX.parquet.")) -> None:
        """Metadata as Parquet, one file per shard, row-aligned with the emb-XXXXX.npy shards, so that
        embedding-reader (file_format="parquet_npy", embeddings_folder=STORE, metadata_folder=OUTPUT) and
        clip-retrieval's tools read the store. Needs pyarrow (pip install 'vlmtools[parquet]')."""
        from vlmtools.console import info
        from vlmtools.store import export_parquet

        written = export_parquet(store, output)
        info(f"wrote {len(written)} Parquet file(s) to {output}")
