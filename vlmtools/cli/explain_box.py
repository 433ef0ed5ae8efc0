"""`vlmtools explain box`: the boxes of a LARE head (study 004) over stored images."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import List

import typer

from vlmtools.cli.common import DeviceOpt, handle_errors, subgroup


class Per(str, Enum):
    cls = "class"
    image = "image"


def register(app: typer.Typer) -> None:
    explain_app = subgroup(app, "explain", "Explain predictions.")

    @explain_app.command("box")
    @handle_errors
    def box_cmd(
        head: Path = typer.Argument(..., help="A LARE head (NAME from `vlmtools train lare`)."),
        image_store: Path = typer.Argument(..., help="Image store embedded with the head's model."),
        where: List[str] = typer.Option([], "--where", help="Only images whose manifest KEY=VALUE "
                                        "(repeatable, e.g. --where split=test)."),
        per: Per = typer.Option(Per.cls, "--per", help="One row per class (means) or per image."),
        output: str = typer.Option("-", "--output", "-o", help="NDJSON rows ('-' is stdout)."),
        device: str = DeviceOpt,
    ) -> None:
        """Box volume and side lengths of each image's LARE box, per class or per image.

        log volume = the sum of the log side lengths of [X-, X+] (f_Box of the head); mean, min and
        max side. Per class, each is the mean over the class's images. A table on stderr (per image: up to
        50 rows), NDJSON rows on stdout or -o FILE."""
        from vlmtools.explain.boxes import explain_boxes

        explain_boxes(head, image_store, where=where, per=per.value, output=output,
                      device=device)
