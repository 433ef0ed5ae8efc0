"""`vlmtools synth`: the offline world, a procedural benchmark with known truth."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import typer

from vlmtools.cli.common import deprecated_alias, handle_errors


def register(app: typer.Typer) -> None:
    synth = typer.Typer(help="The offline world: generated images with known attributes, masks and oracle "
                             "descriptors, for tests and demos without real data or pretrained weights.",
                        no_args_is_help=True)

    @synth.command("make")
    @handle_errors
    def make_cmd(
        out: Path = typer.Argument(..., help="Directory to create (must not exist or be empty)."),
        classes: int = typer.Option(20, "--classes", help="Number of made-up classes."),
        classes_alias: Optional[int] = deprecated_alias("-c", instead="--classes",
                                                        why=" (-c is a class list FILE in other commands)"),
        per_class: int = typer.Option(50, "--per-class", help="Images per class."),
        domain: Literal["photo", "painting", "both"] = typer.Option("photo", "--domain", help="photo, painting, or both (random per image)."),
        seed: int = typer.Option(0, "--seed", help="Random seed; the same seed gives byte-identical files."),
        image_size: int = typer.Option(64, "--image-size", help="Image side in pixels."),
        test_fraction: float = typer.Option(0.3, "--test-fraction", help="Share of each class in split test."),
        force: bool = typer.Option(False, "--force", help="Replace OUT if it holds a previous world."),
    ) -> None:
        """Generate a world of made-up classes with known attributes, masks and oracle descriptors.

        Writes images/, masks/, manifest.jsonl, attributes.jsonl, classes.txt, descriptors.jsonl (oracle),
        captions.jsonl and world.json into OUT, atomically, and prints a one-line JSON summary on stdout."""

        from vlmtools.console import info
        from vlmtools.formats import dumps_line
        from vlmtools.synth.make import make_world

        classes = classes_alias if classes_alias is not None else classes
        summary = make_world(out, classes=classes, per_class=per_class, domain=domain, seed=seed,
                             image_size=image_size, test_fraction=test_fraction, force=force)
        info(f"wrote {summary['images']} images of {summary['classes']} classes to {out}")
        typer.echo(dumps_line(summary), nl=False)

    app.add_typer(synth, name="synth")
