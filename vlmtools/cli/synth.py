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
        classes: Optional[int] = typer.Option(None, "--classes", help="Number of made-up classes "
                                              "[default: 20, or the preset's]."),
        classes_alias: Optional[int] = deprecated_alias("-c", instead="--classes",
                                                        why=" (-c is a class list FILE in other commands)"),
        per_class: Optional[int] = typer.Option(None, "--per-class", help="Images per class [default: 50, "
                                                "or the preset's]."),
        domain: Literal["photo", "painting", "both"] = typer.Option("photo", "--domain", help="photo, painting, or both (random per image)."),
        seed: int = typer.Option(0, "--seed", help="Random seed; the same seed gives byte-identical files."),
        image_size: int = typer.Option(64, "--image-size", help="Image side in pixels."),
        test_fraction: float = typer.Option(0.3, "--test-fraction", help="Share of each class in split test."),
        preset: Optional[str] = typer.Option(None, "--preset", help="Settings of the options below (and of "
                                             "--classes, --per-class) for a harder world: cub-like. Options "
                                             "given beside it override it."),
        names: Optional[str] = typer.Option(None, "--names", help="made-up (say nothing) or informative (a "
                                            "made-up name after one attribute word: 'Red Vobrine Skipper') "
                                            "[default: made-up]."),
        fine: Optional[float] = typer.Option(None, "--fine", help="Share of classes in fine-grained families "
                                             "(one object attribute differs) [default: 0.3]."),
        family: Optional[int] = typer.Option(None, "--family", help="Classes per fine-grained family [default: 2]."),
        overlap: Optional[float] = typer.Option(None, "--overlap", help="Confusable siblings: probability that "
                                                "an image shows a sibling's value of the differing attribute "
                                                "[default: 0]."),
        clutter: Optional[int] = typer.Option(None, "--clutter", help="Up to this many neutral pebbles and "
                                              "twigs per image [default: 0]."),
        occlusion: Optional[float] = typer.Option(None, "--occlusion", help="Up to this share of the object "
                                                  "hidden behind a branch; masks keep what stays visible "
                                                  "[default: 0]."),
        object_scale: Optional[float] = typer.Option(None, "--object-scale", help="Object size factor "
                                                     "(smaller objects below 1) [default: 1]."),
        noise: Optional[float] = typer.Option(None, "--noise", help="Extra pixel and blotch noise sigma "
                                              "[default: 0]."),
        label_noise: Optional[float] = typer.Option(None, "--label-noise", help="Share of train-split labels "
                                                    "replaced by another class; test labels stay true "
                                                    "[default: 0]."),
        force: bool = typer.Option(False, "--force", help="Replace OUT if it holds a previous world."),
    ) -> None:
        """Generate a world of made-up classes with known attributes, masks and oracle descriptors.

        Writes images/, masks/, manifest.jsonl, attributes.jsonl, classes.txt, descriptors.jsonl (oracle),
        captions.jsonl and world.json into OUT, atomically, and prints a one-line JSON summary on stdout."""

        from vlmtools.console import info
        from vlmtools.formats import dumps_line
        from vlmtools.synth.make import make_world, resolve_preset

        classes = classes_alias if classes_alias is not None else classes
        options = resolve_preset(preset, classes=classes, per_class=per_class, names=names, fine=fine,
                                 family=family, overlap=overlap, clutter=clutter, occlusion=occlusion,
                                 object_scale=object_scale, noise=noise, label_noise=label_noise)
        summary = make_world(out, classes=options.pop("classes", 20), per_class=options.pop("per_class", 50),
                             domain=domain, seed=seed, image_size=image_size, test_fraction=test_fraction,
                             force=force, **options)
        if preset:
            summary["preset"] = preset
        info(f"wrote {summary['images']} images of {summary['classes']} classes to {out}")
        typer.echo(dumps_line(summary), nl=False)

    app.add_typer(synth, name="synth")
