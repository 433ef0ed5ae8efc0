"""`vlmtools data folder|cub|csv`: turn a dataset layout into a manifest (JSONL on stdout or -o FILE)."""

from __future__ import annotations

from typing import Literal, Optional

import typer

from vlmtools.cli.common import handle_errors

OutputOpt = typer.Option(None, "--output", "-o", help="Write the manifest to FILE (atomically) instead of stdout.")
DomainOpt = typer.Option(None, "--domain", help="Record this domain on every line (e.g. photo, painting).")
NoCheckOpt = typer.Option(False, "--no-check", help="Do not check that every listed file exists.")


def _write(records: list[dict], output: Optional[str]) -> None:
    from vlmtools.console import info
    from vlmtools.datasets import summary
    from vlmtools.formats import write_jsonl

    write_jsonl(output, records)
    info(summary(records) + (f" -> {output}" if output and output != "-" else ""))


def register(app: typer.Typer) -> None:
    data_app = typer.Typer(help="Make manifests (JSONL, one image per line) from dataset layouts.",
                           no_args_is_help=True)
    app.add_typer(data_app, name="data")

    @data_app.command("folder")
    @handle_errors
    def folder_cmd(
        root: str = typer.Argument(..., help="ImageFolder root: ROOT/<class>/<image>, or ROOT/<split>/<class>/"
                                   "<image> when its folders are train, val, test, ..."),
        split: Optional[str] = typer.Option(None, "--split", help="Record this split name on every line."),
        names: Literal["raw", "cub"] = typer.Option("raw", "--names", help="Class names: raw (folder names) or cub "
                                  "(clean '001.Black_footed_Albatross' as `data cub` does)."),
        domain: Optional[str] = DomainOpt,
        output: Optional[str] = OutputOpt,
    ) -> None:
        """Manifest of an ImageFolder tree: the label is the class folder, the id the relative path; split
        folders (ROOT/train/<class>, ROOT/test/<class>, ...) give each image's split."""
        from vlmtools.datasets import folder_records

        _write(folder_records(root, split=split, domain=domain, names=names), output)

    @data_app.command("cub")
    @handle_errors
    def cub_cmd(
        root: str = typer.Argument(..., help="CUB_200_2011 directory (or the folder holding it)."),
        segmentations: Optional[str] = typer.Option(None, "--segmentations", help="Segmentation root; "
                                                    "each mask is DIR/<image path with .png>."),
        only: Optional[Literal["train", "test"]] = typer.Option(None, "--only", help="Keep one split: train or test."),
        domain: Optional[str] = DomainOpt,
        no_check: bool = NoCheckOpt,
        output: Optional[str] = OutputOpt,
    ) -> None:
        """Manifest of CUB-200-2011 with its train/test split and CBD-style class names."""
        from vlmtools.datasets import cub_records

        _write(cub_records(root, segmentations=segmentations, only=only, domain=domain, check=not no_check), output)

    @data_app.command("csv")
    @handle_errors
    def csv_cmd(
        file: str = typer.Argument(..., help="CSV or TSV file with a header line."),
        path_col: str = typer.Option("path", "--path-col", help="Column holding image paths."),
        label_col: Optional[str] = typer.Option(None, "--label-col", help="Column holding class labels "
                                                "(default: label, if present)."),
        no_check: bool = NoCheckOpt,
        output: Optional[str] = OutputOpt,
    ) -> None:
        """Manifest of a table with path and label columns (optional id, split, domain, mask)."""
        from vlmtools.datasets import csv_records

        _write(csv_records(file, path_col=path_col, label_col=label_col, check=not no_check), output)
