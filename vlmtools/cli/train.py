"""`vlmtools train`: trained heads on stored embeddings (probe, t2i, adapter; later issues add more).

The options of the one training loop (vlmtools.heads.loop.fit) are defined once here, as module-level
typer options, and turned into a FitOptions by ``fit_options``: every `train X` command reuses them.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from vlmtools.cli.common import DeviceOpt, ModelOpt, PretrainedOpt, handle_errors, subgroup

# ----------------------------------------------------------------------------- shared options

EpochsOpt = typer.Option(100, "--epochs", help="Most epochs to train (early stopping may end sooner).")
LrOpt = typer.Option(1e-2, "--lr", help="AdamW learning rate.")
WeightDecayOpt = typer.Option(1e-4, "--weight-decay", help="AdamW weight decay.")
BatchSizeOpt = typer.Option(256, "--batch-size", help="Rows per step (0: full batch).")
SeedOpt = typer.Option(0, "--seed", help="Seed of the initial weights, the batches and the val split.")
PatienceOpt = typer.Option(10, "--patience", help="Stop after this many epochs without a better val metric "
                           "(0: never stop early); the best epoch's weights are kept.")
WhereOpt = typer.Option([], "--where", help="Train only on rows whose manifest KEY=VALUE (repeatable, "
                        "e.g. --where split=train).")
ValWhereOpt = typer.Option([], "--val-where", help="Val rows: those whose KEY=VALUE (repeatable, e.g. "
                           "split=val), instead of --val-fraction.")
ValFractionOpt = typer.Option(None, "--val-fraction", help="Share of each class's train rows held out "
                              "(seeded) for early stopping and val metrics; 0: none (default 0.1).")
HeadOutOpt = typer.Option(..., "--output", "-o", help="The head to write: NAME (writes NAME.json and "
                          "NAME.safetensors).")
JsonOpt = typer.Option(False, "--json", help="Print the training summary as one JSON line on stdout.")


def fit_options(epochs: int, lr: float, weight_decay: float, batch_size: int, seed: int, patience: int,
                device: str):
    """The loop options as a FitOptions (checked: bad values are BadInput, exit 2)."""
    from vlmtools.heads.loop import FitOptions

    return FitOptions(epochs=epochs, lr=lr, weight_decay=weight_decay, batch_size=batch_size, seed=seed,
                      patience=patience, device=device).check()


def emit(summary: dict, json_: bool) -> None:
    """The summary as one NDJSON line on stdout with --json (the human line went to stderr already)."""
    if json_:
        from vlmtools.formats import dumps_line

        typer.echo(dumps_line(summary), nl=False)


def register(app: typer.Typer) -> None:
    train = subgroup(app, "train", "Train heads on stored embeddings: `train probe` (linear probe), "
                     "`train t2i` (text -> image translator), `train adapter` (study 001's adapter on "
                     "images + text as images). Heads are NAME.json + NAME.safetensors; use them with "
                     "`vlmtools classify STORE --head NAME`.")

    @train.command("probe")
    @handle_errors
    def probe_cmd(
        image_store: Path = typer.Argument(..., help="Image store with labels (`vlmtools embed images`)."),
        output: str = HeadOutOpt,
        where: List[str] = WhereOpt,
        val_where: List[str] = ValWhereOpt,
        val_fraction: Optional[float] = ValFractionOpt,
        epochs: int = EpochsOpt,
        lr: float = LrOpt,
        weight_decay: float = WeightDecayOpt,
        batch_size: int = BatchSizeOpt,
        seed: int = SeedOpt,
        patience: int = PatienceOpt,
        device: str = DeviceOpt,
        model: Optional[str] = ModelOpt,
        pretrained: Optional[str] = PretrainedOpt,
        json_: bool = JsonOpt,
    ) -> None:
        """Linear probe: one FC layer with cross-entropy on labelled image embeddings.

        Classes are the training labels in first-seen order. Writes NAME.json + NAME.safetensors
        (format vlmtools.head/1, see vlmtools-formats(5))."""
        from vlmtools.heads.linear import train_probe

        options = fit_options(epochs, lr, weight_decay, batch_size, seed, patience, device)
        emit(train_probe(image_store, output, options=options, where=where, val_where=val_where,
                         val_fraction=val_fraction, model=model, pretrained=pretrained), json_)
