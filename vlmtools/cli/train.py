"""`vlmtools train`: trained heads on stored embeddings (probe, t2i, adapter; later issues add more).

The options of the one training loop (vlmtools.heads.loop.fit) are defined once here, as module-level
typer options, and turned into a FitOptions by ``fit_options``: every `train X` command reuses them.
"""

from __future__ import annotations

from enum import Enum
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
ProbeEpochsOpt = typer.Option(100, "--epochs", help="--solver lbfgs: the most L-BFGS iterations (scikit-learn's "
                              "max_iter); adamw: the most epochs (early stopping may end sooner).")
ProbeValFractionOpt = typer.Option(None, "--val-fraction", help="Share of each class's train rows held out "
                                   "(seeded) for val metrics (and early stopping with adamw); 0: none "
                                   "(default: 0 with --solver lbfgs, 0.1 with adamw).")
SolverOpt = typer.Option("lbfgs", "--solver", help="The probe's solver: lbfgs (full batch, scikit-learn's "
                         "LogisticRegression objective, last iterate kept) or adamw (mini-batches, --lr, "
                         "--batch-size, --patience; best val epoch kept).")
L2_HELP = "lbfgs: L2 penalty (l2/2)|W|^2 on the summed cross-entropy (scikit-learn's 1/C; bias unpenalised)."
L2Opt = typer.Option(1.0, "--l2", help=L2_HELP)
# The augmented probes scale it (ours): K extra rows per image are augmentations of one observation, so the
# prior keeps its weight against the images (heads/lare.py, heads/lads.py).
LareL2Opt = typer.Option(1.0, "--l2", help=L2_HELP + " LARE's probe uses l2 * (1 + K), K = --samples "
                         "(the head records l2 and probe_l2).")
LadsL2Opt = typer.Option(1.0, "--l2", help=L2_HELP + " LADS's probe uses l2 * 2 (one augmented row per "
                         "image; the head records l2 and probe_l2).")
HeadOutOpt = typer.Option(..., "--output", "-o", metavar="HEAD", help="The head to write: NAME (writes NAME.json and "
                          "NAME.safetensors).")
JsonOpt = typer.Option(False, "--json", help="Print the training summary as one JSON line on stdout.")
PlotsOpt = typer.Option(None, "--plots", metavar="DIR", help="Also write the training curve (loss and val "
                        "metric per epoch, the kept epoch marked) as DIR/NAME.curve.png.")


class Balance(str, Enum):
    class_ = "class"
    global_ = "global"


class Solver(str, Enum):
    lbfgs = "lbfgs"
    adamw = "adamw"


class Arch(str, Enum):
    mlp = "mlp"
    qformer = "qformer"


def fit_options(epochs: int, lr: float, weight_decay: float, batch_size: int, seed: int, patience: int,
                device: str, solver: "Solver | str" = "adamw", l2: float = 1.0):
    """The loop options as a FitOptions (checked: bad values are BadInput, exit 2)."""
    from vlmtools.heads.loop import FitOptions

    return FitOptions(epochs=epochs, lr=lr, weight_decay=weight_decay, batch_size=batch_size, seed=seed,
                      patience=patience, device=device, solver=getattr(solver, "value", solver), l2=l2).check()


def emit(summary: dict, json_: bool, plots: Optional[Path] = None) -> None:
    """The summary as one NDJSON line on stdout with --json (the human line went to stderr already), and
    with --plots the head's training curve."""
    if plots is not None:
        write_curves([summary["head"]], plots)
    if json_:
        from vlmtools.formats import dumps_line

        typer.echo(dumps_line(summary), nl=False)


def write_curves(heads, plots: Path) -> None:
    from vlmtools.console import info
    from vlmtools.heads.curves import write_curve

    for head in heads:
        info(f"wrote {write_curve(head, plots)}")


def register(app: typer.Typer) -> None:
    train = subgroup(app, "train", "Train heads on stored embeddings: `train probe` (linear probe), "
                     "`train t2i` (text -> image translator), `train adapter` (study 001's adapter on "
                     "images + text as images), `train lare` / `train lads` (study 004's box and "
                     "domain-description augmentation). Heads are NAME.json + NAME.safetensors; use them with "
                     "`vlmtools classify STORE --head NAME`.")

    @train.command("probe")
    @handle_errors
    def probe_cmd(
        image_store: Path = typer.Argument(..., help="Image store with labels (`vlmtools embed images`)."),
        output: str = HeadOutOpt,
        where: List[str] = WhereOpt,
        val_where: List[str] = ValWhereOpt,
        val_fraction: Optional[float] = ProbeValFractionOpt,
        solver: Solver = SolverOpt,
        l2: float = L2Opt,
        epochs: int = ProbeEpochsOpt,
        lr: float = LrOpt,
        weight_decay: float = WeightDecayOpt,
        batch_size: int = BatchSizeOpt,
        seed: int = SeedOpt,
        patience: int = PatienceOpt,
        device: str = DeviceOpt,
        model: Optional[str] = ModelOpt,
        pretrained: Optional[str] = PretrainedOpt,
        json_: bool = JsonOpt,
        plots: Optional[Path] = PlotsOpt,
    ) -> None:
        """Linear probe: one FC layer with cross-entropy on labelled image embeddings.

        By default scikit-learn's LogisticRegression (C = 1/--l2 = 1), solved full-batch by L-BFGS on every
        train row. Classes are the training labels in first-seen order. Writes NAME.json + NAME.safetensors
        (format vlmtools.head/1, see vlmtools-formats(5))."""
        from vlmtools.heads.probe import train_probe

        options = fit_options(epochs, lr, weight_decay, batch_size, seed, patience, device, solver, l2)
        emit(train_probe(image_store, output, options=options, where=where, val_where=val_where,
                         val_fraction=val_fraction, model=model, pretrained=pretrained), json_, plots)

    @train.command("t2i")
    @handle_errors
    def t2i_cmd(
        text_store: Path = typer.Argument(..., help="Text store of captions whose rows carry the \"image_id\" "
                                          "of an image (`vlmtools embed text` of {\"id\", \"image_id\", "
                                          "\"text\"} JSONL)."),
        images: Path = typer.Option(..., "--images", help="The image store the captions' image_id refer to."),
        output: str = HeadOutOpt,
        arch: Arch = typer.Option(Arch.mlp, "--arch", help="mlp: residual 2-layer MLP on the pooled text "
                                  "embedding; qformer: learned queries cross-attending to the text tower's "
                                  "token features (needs the model)."),
        contrastive_weight: float = typer.Option(0.5, "--contrastive-weight", help="Weight of the in-batch "
                                                 "text->image InfoNCE term (temperature 0.05) beside the "
                                                 "cosine loss (weight 1)."),
        where: List[str] = typer.Option([], "--where", help="Train only on images whose manifest KEY=VALUE "
                                        "(repeatable)."),
        val_where: List[str] = typer.Option([], "--val-where", help="Val images: those whose KEY=VALUE, "
                                            "instead of --val-fraction."),
        val_fraction: Optional[float] = typer.Option(None, "--val-fraction", help="Share of the images (with "
                                                     "all their captions) held out, seeded (default 0.1)."),
        epochs: int = EpochsOpt,
        lr: float = typer.Option(1e-3, "--lr", help="AdamW learning rate."),
        weight_decay: float = WeightDecayOpt,
        batch_size: int = BatchSizeOpt,
        seed: int = SeedOpt,
        patience: int = PatienceOpt,
        device: str = DeviceOpt,
        model: Optional[str] = ModelOpt,
        pretrained: Optional[str] = PretrainedOpt,
        json_: bool = JsonOpt,
        plots: Optional[Path] = PlotsOpt,
    ) -> None:
        """Text -> image translator on caption/image pairs (study 001's Q-Former step).

        Loss: (1 - cosine to the paired image embedding) + 0.5 x in-batch contrastive; early stopping on val
        text->image recall@1. Reports val recall@1/5 before (raw text embeddings) and after translation."""
        from vlmtools.heads.t2i import train_t2i

        options = fit_options(epochs, lr, weight_decay, batch_size, seed, patience, device)
        emit(train_t2i(text_store, output, images=images, options=options, arch=arch.value, where=where,
                       val_where=val_where, val_fraction=val_fraction, contrastive_weight=contrastive_weight,
                       model=model, pretrained=pretrained), json_, plots)

    @train.command("adapter")
    @handle_errors
    def adapter_cmd(
        image_store: Path = typer.Argument(..., help="Image store with labels (`vlmtools embed images`)."),
        text: Path = typer.Option(..., "--text", metavar="STORE", help="Text store of text samples: descriptor JSONL embedded "
                                  "with `embed text` (one sample per sentence, its \"class\"), or captions "
                                  "with \"image_id\" (the image's label)."),
        output: Optional[str] = typer.Option(None, "--output", "-o", metavar="HEAD", help="The head NAME (NAME.json + "
                                             "NAME.safetensors); with --sweep, a directory for all heads "
                                             "(optional there)."),
        image_ratio: float = typer.Option(1.0, "--image-ratio", help="Share R of each class's training "
                                          "images kept (round half up, at least 1 when R > 0); the other "
                                          "slots are that class's text samples."),
        balance: Balance = typer.Option(Balance.class_, "--balance", help="class: R per class (the study's "
                                        "fix); global: R of all images at random, texts at random (the "
                                        "earlier, imbalanced protocol)."),
        t2i: Optional[Path] = typer.Option(None, "--t2i", help="A t2i head (`train t2i`) to translate the "
                                           "text samples into the image space first."),
        image_only: bool = typer.Option(False, "--image-only", help="Train on the kept images alone (no "
                                        "text samples)."),
        sweep: Optional[str] = typer.Option(None, "--sweep", help="Comma-separated image ratios, e.g. "
                                            "1.0,0.9,...,0.0: one image-only and one image+text head per "
                                            "ratio; the table goes to stdout (TSV, or NDJSON with --json)."),
        plots: Optional[Path] = typer.Option(None, "--plots", metavar="DIR", help="Write the training curve "
                                             "as DIR/NAME.curve.png; with --sweep, adapter_sweep.png (accuracy "
                                             "vs image ratio) and, with -o, every head's curve."),
        test_where: List[str] = typer.Option([], "--test-where", help="Report accuracy on rows whose "
                                             "KEY=VALUE (e.g. split=test); --sweep's table uses them, else "
                                             "the val rows."),
        where: List[str] = WhereOpt,
        val_where: List[str] = ValWhereOpt,
        val_fraction: Optional[float] = typer.Option(None, "--val-fraction", help="Share of each class's train "
                                                     "rows held out (seeded); 0: none (default: 0 with "
                                                     "--solver lbfgs, 0.1 with adamw or when --sweep reports "
                                                     "on val rows)."),
        solver: Solver = SolverOpt,
        l2: float = L2Opt,
        epochs: int = ProbeEpochsOpt,
        lr: float = LrOpt,
        weight_decay: float = WeightDecayOpt,
        batch_size: int = BatchSizeOpt,
        seed: int = SeedOpt,
        patience: int = PatienceOpt,
        device: str = DeviceOpt,
        model: Optional[str] = ModelOpt,
        pretrained: Optional[str] = PretrainedOpt,
        json_: bool = typer.Option(False, "--json", help="The training summary (or --sweep's rows) as "
                                   "NDJSON on stdout."),
    ) -> None:
        """Study 001's adapter: one FC layer on image embeddings mixed with text embeddings as images.

        Each class keeps its number of training slots: R of them real images, the rest its text samples
        (raw text embeddings, or translated by --t2i). --sweep trains the study's whole table."""
        from vlmtools.errors import BadInput
        from vlmtools.heads.adapter import check_ratio, parse_ratios, sweep_adapter, train_adapter

        options = fit_options(epochs, lr, weight_decay, batch_size, seed, patience, device, solver, l2)
        check_ratio(image_ratio)
        if sweep is not None:
            if image_only:
                raise BadInput("--image-only and --sweep: a sweep trains both kinds already")
            sweep_adapter(image_store, text_store=text, options=options, ratios=parse_ratios(sweep),
                          balance=balance.value, t2i=t2i, where=where, val_where=val_where,
                          val_fraction=val_fraction, test_where=test_where, out_dir=output, json_lines=json_,
                          plots=plots, model=model, pretrained=pretrained)
            if plots is not None and output is not None:
                write_curves(sorted(Path(output).glob("*.json")), plots)
            return
        emit(train_adapter(image_store, output, text_store=text, options=options, image_ratio=image_ratio,
                           balance=balance.value, t2i=t2i, image_only=image_only, where=where,
                           val_where=val_where, val_fraction=val_fraction, test_where=test_where, model=model,
                           pretrained=pretrained), json_, plots)

    register_lare_lads(train)


# ----------------------------------------------------------------------------- lare, lads (study 004)

class VolumeLoss(str, Enum):
    log_side = "log-side"
    literal = "literal"


TemplatesOpt = typer.Option(None, "--templates", help="Class prompts for the class text embeddings T, as in "
                            "classify --templates (default: photo)")
ClassesOpt = typer.Option(None, "--classes", "-c", help="Class list to check the store against: every class "
                          "must have train rows and every train label must be listed (default: the labels).")
TextStoreOpt = typer.Option(None, "--text-store", help="Text store (`vlmtools embed text`, same model) to take "
                            "the prompt embeddings from (others are encoded with the store's model).")
AlphaOpt = typer.Option(0.5, "--alpha", help="Loss weight in [0, 1] (see the command's help).")
LogitScaleOpt = typer.Option(1.0, "--logit-scale", help="s in softmax(s * embedding . T) of the class "
                             "consistency losses (default 1: unscaled, as the study and the LADS code; CLIP "
                             "scales by 100).")
ShotsOpt = typer.Option(None, "--shots", help="Few-shot: keep N train rows per class (chosen with --seed, "
                        "after the val split).")
NoCacheOpt = typer.Option(False, "--no-cache", help="Do not read or write the text embedding cache.")


def register_lare_lads(train: typer.Typer) -> None:
    @train.command("lare")
    @handle_errors
    def lare_cmd(
        image_store: Path = typer.Argument(..., help="Image store with labels (`vlmtools embed images`)."),
        output: str = HeadOutOpt,
        where: List[str] = WhereOpt,
        samples: int = typer.Option(10, "--samples", help="K: points drawn uniformly in each train box "
                                    "(0: no boxes, the plain probe)."),
        alpha: float = AlphaOpt,
        volume_loss: VolumeLoss = typer.Option(VolumeLoss.log_side, "--volume-loss", help="L_BV: log-side "
                                               "(ours, the default: sum over dimensions of (log side - log b)^2, "
                                               "a finite optimum at side b) or literal (the study's X+ . X-, "
                                               "unbounded below)."),
        box_size: float = typer.Option(1.0, "--box-size", help="log-side: the side length b every box side is "
                                       "drawn to, in units of the train embeddings' mean per-dimension std."),
        box_epochs: int = typer.Option(10, "--box-epochs", help="Epochs of step 1 (f_Box, AdamW with --lr, "
                                       "--weight-decay, --batch-size)."),
        templates: Optional[str] = TemplatesOpt,
        descriptors: Optional[str] = typer.Option(None, "--descriptors", "-d", help="Descriptor JSONL: T(class) "
                                                  "= the mean of its \"{class}, which has {descriptor}\" "
                                                  "embeddings instead of class-name prompts."),
        classes: Optional[str] = ClassesOpt,
        text_store: Optional[Path] = TextStoreOpt,
        hidden: Optional[int] = typer.Option(None, "--hidden", help="Hidden width of f_Box (default 128)."),
        logit_scale: float = LogitScaleOpt,
        shots: Optional[int] = ShotsOpt,
        val_where: List[str] = ValWhereOpt,
        val_fraction: Optional[float] = ProbeValFractionOpt,
        solver: Solver = SolverOpt,
        l2: float = LareL2Opt,
        epochs: int = ProbeEpochsOpt,
        lr: float = LrOpt,
        weight_decay: float = WeightDecayOpt,
        batch_size: int = BatchSizeOpt,
        seed: int = SeedOpt,
        patience: int = PatienceOpt,
        device: str = DeviceOpt,
        model: Optional[str] = ModelOpt,
        pretrained: Optional[str] = PretrainedOpt,
        no_cache: bool = NoCacheOpt,
        json_: bool = JsonOpt,
        plots: Optional[Path] = PlotsOpt,
    ) -> None:
        """LARE (study 004): a box per image embedding, K samples per box, a linear probe on both.

        Step 1 trains f_Box (2 layers, d -> 2d: how far the box reaches below and above the image, so
        X- < x < X+) with L = (1-alpha) L_BV + (alpha/3)(L_CC+ + L_CC- + L_CC), the class-consistency
        terms being cross-entropies of the corners and the midpoint against the class text embeddings.
        Step 2 is `train probe` (same --solver) on the train rows + K samples per box (L2-normalized).
        The head keeps f_Box: `vlmtools explain box HEAD STORE`."""
        from vlmtools.heads.lare import train_lare

        options = fit_options(epochs, lr, weight_decay, batch_size, seed, patience, device, solver, l2)
        emit(train_lare(image_store, output, options=options, where=where, val_where=val_where,
                        val_fraction=val_fraction, model=model, pretrained=pretrained, templates=templates,
                        descriptors=descriptors, classes=classes, text_store=text_store, samples=samples, alpha=alpha,
                        volume=volume_loss.value, box_size=box_size, box_epochs=box_epochs, hidden=hidden,
                        logit_scale=logit_scale, shots=shots, use_cache=not no_cache), json_, plots)

    @train.command("lads")
    @handle_errors
    def lads_cmd(
        image_store: Path = typer.Argument(..., help="Image store with labels (`vlmtools embed images`)."),
        output: str = HeadOutOpt,
        where: List[str] = WhereOpt,
        source: str = typer.Option("a photo of a {}.", "--source", help="Prompt of the training domain, {} = "
                                   "class (the authors' CUB config: \"a photo of a {} bird.\")."),
        target: str = typer.Option("a painting of a {}.", "--target", help="Prompt of the unseen domain, {} = "
                                   "class (their CUB config: \"a painting of a {} bird.\")."),
        cc_template: str = typer.Option("a photo of a {}", "--cc-template", help="Class prompt of the class "
                                        "consistency term (the authors' code hard-codes this one)."),
        alpha: float = typer.Option(0.5, "--alpha", help="L = alpha L_dir + (1 - alpha) L_cc."),
        aug_epochs: int = typer.Option(200, "--aug-epochs", help="Epochs of step 1 (the augmenter); the "
                                       "epoch of the lowest val loss is kept."),
        ensemble: bool = typer.Option(False, "--ensemble", help="Predict with the mean of the probe's and CLIP "
                                      "zero-shot's probabilities (source + target prompts), as the authors' "
                                      "CUB config does."),
        classes: Optional[str] = ClassesOpt,
        text_store: Optional[Path] = TextStoreOpt,
        hidden: Optional[int] = typer.Option(None, "--hidden", help="Hidden width of the augmenter (default "
                                             "384, the authors')."),
        logit_scale: float = LogitScaleOpt,
        shots: Optional[int] = ShotsOpt,
        val_where: List[str] = ValWhereOpt,
        val_fraction: Optional[float] = ValFractionOpt,
        solver: Solver = typer.Option(Solver.adamw, "--solver", help="The probe's solver: adamw (the "
                                      "authors') or lbfgs (train probe's)."),
        l2: float = LadsL2Opt,
        epochs: int = typer.Option(400, "--epochs", help="Epochs of the probe (adamw; the best val epoch is "
                                   "kept) or its most L-BFGS iterations."),
        lr: float = typer.Option(1e-3, "--lr", help="AdamW learning rate of both steps."),
        weight_decay: float = typer.Option(0.05, "--weight-decay", help="AdamW weight decay of both steps."),
        batch_size: int = BatchSizeOpt,
        seed: int = SeedOpt,
        patience: int = typer.Option(0, "--patience", help="Stop the probe after this many epochs without a "
                                     "better val balanced accuracy (0: never, as the authors)."),
        device: str = DeviceOpt,
        model: Optional[str] = ModelOpt,
        pretrained: Optional[str] = PretrainedOpt,
        no_cache: bool = NoCacheOpt,
        json_: bool = JsonOpt,
        plots: Optional[Path] = PlotsOpt,
    ) -> None:
        """LADS (Dunlap et al., ICLR 2023), study 004's baseline, as its authors' code: text-guided
        augmentation, then a probe.

        Step 1 trains f_aug (Linear-ReLU-Linear, 384 wide) with L = alpha L_dir + (1-alpha) L_cc: L_dir =
        1 - cos(f_aug(x) - x, the class's text direction from --source to --target), L_cc = class-weighted
        cross-entropy of the unscaled cosines of f_aug(x) to the --cc-template class prompts; the epoch of
        the lowest val loss is kept. Step 2: one linear layer on the original + augmented rows, class-
        weighted, AdamW, the first epoch of the best val balanced accuracy kept. Defaults and their sources:
        man vlmtools-train."""
        from vlmtools.heads.lads import train_lads

        options = fit_options(epochs, lr, weight_decay, batch_size, seed, patience, device, solver, l2)
        emit(train_lads(image_store, output, options=options, where=where, val_where=val_where,
                        val_fraction=val_fraction, model=model, pretrained=pretrained, source=source,
                        target=target, cc_template=cc_template, classes=classes, text_store=text_store,
                        alpha=alpha, aug_epochs=aug_epochs, hidden=hidden, logit_scale=logit_scale,
                        ensemble=ensemble, shots=shots, use_cache=not no_cache), json_, plots)
