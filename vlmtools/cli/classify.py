"""`vlmtools classify`, `vlmtools eval [compare]`, `vlmtools explain text`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Literal, Optional

import typer

from vlmtools.cli.common import (DeviceOpt, ModelOpt, Precision, PrecisionOpt, PretrainedOpt, choices, handle_errors,
                                 plain, require_stdout, store_argument, store_option, subgroup)
from vlmtools.prompts import EMPTY_RULES, WRAPS

Empty = choices("Empty", EMPTY_RULES)
Wrap = choices("Wrap", WRAPS)


def register(app: typer.Typer) -> None:
    @app.command("classify")
    @handle_errors
    def classify_cmd(
        image_store: Path = store_argument("Image store written by `vlmtools embed images`."),
        method: Optional[Literal["clip", "cbd"]] = typer.Option(None, "--method", help="clip (class names in templates) or cbd "
                                             "(descriptors) (default: cbd with --descriptors, else clip)"),
        classes: Optional[str] = typer.Option(None, "--classes", "-c", help="Class list: one per line, a manifest "
                                              "(its labels) or descriptor JSONL (clip default: the store's "
                                              "labels; cbd default: the descriptors' classes)"),
        templates: Optional[str] = typer.Option(None, "--templates", help="clip: bare | photo | birds "
                                                "(\"a photo of a {}, a type of bird.\") | openai80 | FILE (one "
                                                "template per line, {} = class) (default: photo)"),
        descriptors: Optional[str] = typer.Option(None, "--descriptors", "-d", help="cbd: descriptor JSONL "
                                                  "(from `vlmtools describe`), or - for stdin"),
        wrap: Optional[Wrap] = typer.Option(None, "--wrap", callback=plain, help="cbd: 'cbd' embeds \"{class}, "
                                            "which is/has {descriptor}\", 'waffle' \"A photo of a {class}, which "
                                            "is/has {descriptor}.\" (WaffleCLIP's form), 'none' the descriptor as "
                                            "written (default: cbd, or the text store's)"),
        aggregate: Literal["mean", "max", "sum"] = typer.Option("mean", "--aggregate", help="cbd: class score over its descriptors: "
                                      "mean | max | sum"),
        background: Literal["include", "exclude", "only"] = typer.Option("include", "--background", help="cbd: descriptors of kind background: "
                                       "include | exclude | only"),
        allow_empty: bool = typer.Option(False, "--allow-empty", help="cbd: score classes with no descriptors "
                                         "(missing, empty list) by their name instead of refusing them"),
        empty: Empty = typer.Option("menon", "--empty", callback=plain, help="cbd: how a class with no descriptors is scored: "
                                  "menon (\"{class}, which has \", as Menon & Vondrick) | name (the bare name)"),
        text_store: Optional[Path] = store_option("--text-store", help="Text store from `vlmtools embed "
                                                  "text` to take text embeddings from (others are encoded)"),
        k: int = typer.Option(5, "-k", "--top-k", help="Classes listed per image in \"topk\"."),
        explain: bool = typer.Option(True, "--explain/--no-explain", help="cbd: write the predicted class's "
                                     "descriptor scores"),
        explain_true: bool = typer.Option(False, "--explain-true", help="cbd: also the true class's"),
        where: List[str] = typer.Option([], "--where", help="Only images whose manifest KEY=VALUE "
                                        "(repeatable, e.g. --where split=test)"),
        output: str = typer.Option("-", "--output", "-o", help="Predictions JSONL (default stdout)."),
        no_cache: bool = typer.Option(False, "--no-cache", help="Do not read or write the text embedding "
                                      "cache ($VLMTOOLS_CACHE_DIR/text, else $XDG_CACHE_HOME/vlmtools/text, else "
                                      "~/.cache/vlmtools/text)."),
        head: Optional[Path] = typer.Option(None, "--head", help="A trained head (NAME from `vlmtools train`): "
                                            "classify with it instead of zero-shot; topk scores are its "
                                            "softmax probabilities."),
        model: Optional[str] = ModelOpt,
        pretrained: Optional[str] = PretrainedOpt,
        device: str = DeviceOpt,
        precision: Precision = PrecisionOpt,
    ) -> None:
        """Classify stored image embeddings zero-shot: CLIP prompts or descriptors (CBD); NDJSON per image.

        --method clip scores each image against class-name prompts (templates averaged as open_clip
        does); --method cbd against "{class}, which has {descriptor}" sentences, the class score being
        the mean over its descriptors, whose similarities are written as the explanation. With --head,
        a head trained by `vlmtools train` scores them (same output contract, no explanation)."""
        from vlmtools.classify import classify_store

        if head is not None:
            from vlmtools.errors import BadInput
            from vlmtools.heads.predict import classify_with_head

            zero_shot = {"--method": method, "--classes": classes, "--templates": templates,
                         "--descriptors": descriptors, "--wrap": wrap, "--text-store": text_store,
                         "--model": model, "--pretrained": pretrained}
            for opt, value in zero_shot.items():
                if value is not None:
                    raise BadInput(f"{opt} applies to zero-shot classify, not --head (the head has its "
                                   f"classes and model)")
            classify_with_head(image_store, head, output, k=k, where=where, device=device)
            return

        require_stdout(output)
        # the model is the image store's; --model/--pretrained may name it, and must match it
        classify_store(image_store, output, model=model, pretrained=pretrained, method=method, classes=classes,
                       templates=templates, descriptors=descriptors, wrap=wrap, aggregate=aggregate,
                       background=background, allow_empty=allow_empty, empty=empty, text_store=text_store, k=k,
                       explain=explain, explain_true=explain_true, where=where, device=device,
                       use_cache=not no_cache, precision=precision)

    eval_app = subgroup(app, "eval", "Evaluate predictions: `vlmtools eval PRED.jsonl` (accuracy tables), "
                        "`vlmtools eval compare A.jsonl B.jsonl` (paired, with McNemar's test). Options of the first "
                        "(--by, --where, -o, --per-class, --csv, --plots): `vlmtools eval predictions --help`.",
                        default_command="predictions")

    @eval_app.command("predictions")
    @handle_errors
    def eval_cmd(
        predictions: str = typer.Argument(..., help="Predictions JSONL from `vlmtools classify` (or -)."),
        by: List[str] = typer.Option([], "--by", help="Also tabulate by this manifest key (domain, split, "
                                     "...); repeatable."),
        output: str = typer.Option("-", "--output", "-o", help="NDJSON rows: the summary (acc1, acc5, "
                                   "mean_per_class_recall, provenance), then one per --by group ('-' is stdout)."),
        per_class: bool = typer.Option(False, "--per-class", help="Also one NDJSON row per class."),
        csv_out: Optional[str] = typer.Option(None, "--csv", help="Write per-class accuracy as CSV."),
        plots: Optional[Path] = typer.Option(None, "--plots", metavar="DIR",
                                             help="Write NAME.confusion.png and NAME.per_class.png here (NAME: "
                                             "the predictions file's), titled with method, model and n."),
        where: List[str] = typer.Option([], "--where", help="Only predictions whose manifest KEY=VALUE "
                                        "(repeatable, e.g. --where split=test)."),
    ) -> None:
        """Top-1 (acc1), top-5 (acc5), mean per-class recall and per-class accuracy (the default eval
        command): tables on stderr; the NDJSON rows to a pipe or -o FILE (a terminal gets the table only)."""
        from vlmtools.evaluate import evaluate_file

        evaluate_file(predictions, by=by, output=output, csv_out=csv_out, plot_dir=plots, per_class=per_class,
                      where=where)

    @eval_app.command("compare")
    @handle_errors
    def compare_cmd(
        a: str = typer.Argument(..., help="Predictions A (e.g. clip)."),
        b: str = typer.Argument(..., help="Predictions B (e.g. cbd)."),
        output: str = typer.Option("-", "--output", "-o", help="The summary as one NDJSON row ('-' is stdout)."),
        diff_out: Optional[str] = typer.Option(None, "--diff", help="Write the images where the predictions "
                                               "differ as JSONL."),
        show: int = typer.Option(10, "--show", help="Disagreements listed on stderr."),
        names: Optional[str] = typer.Option(None, "--names", help="Display names 'A,B' (default: file names)"),
        where: List[str] = typer.Option([], "--where", help="Only images whose manifest KEY=VALUE "
                                        "(repeatable, e.g. --where split=test)."),
    ) -> None:
        """Side-by-side top-1 of two predictions files on the same images, with McNemar's test."""
        from vlmtools.errors import BadInput
        from vlmtools.evaluate import compare_files

        pair = None
        if names is not None:
            parts = [p.strip() for p in names.split(",")]
            if len(parts) != 2 or not all(parts):
                raise BadInput(f"--names {names!r}: expected two names, 'A,B'")
            pair = (parts[0], parts[1])
        compare_files(a, b, output=output, diff_out=diff_out, show=show, names=pair, where=where)

    explain_app = subgroup(app, "explain", "Explain predictions.")

    @explain_app.command("text")
    @handle_errors
    def explain_text_cmd(
        predictions: str = typer.Argument(..., help="Predictions JSONL from `vlmtools classify --method cbd`."),
        ids: List[str] = typer.Option([], "--id", help="Image id to explain (repeatable)."),
        wrong: bool = typer.Option(False, "--wrong", help="Only misclassified images."),
        limit: int = typer.Option(10, "--limit", help="At most this many images (0: all)."),
        top: Optional[int] = typer.Option(None, "--top", help="At most this many descriptors per class."),
        plots: Optional[Path] = typer.Option(None, "--plots", metavar="DIR", help="Also write one PNG per image "
                                             "here: the image beside bars of descriptor scores."),
        width: int = typer.Option(30, "--width", help="Bar width in characters."),
    ) -> None:
        """Per-descriptor scores of the predicted (and, with classify --explain-true, the true) class."""
        from vlmtools import formats
        from vlmtools.console import SafeConsole, info
        from vlmtools.errors import BadInput
        from vlmtools.explain.textual import save_figures, select, terminal_view

        if limit < 0 or (top is not None and top < 1) or width < 1:
            raise BadInput("--limit must be >= 0, --top and --width >= 1")
        records = formats.read_predictions(predictions)
        source = formats.source_name(predictions)
        chosen = select(records, ids=ids, wrong=wrong, limit=limit or None, source=source)
        if not chosen:
            info("no misclassified image to explain" if wrong else "no image to explain")
            return
        # the view is this command's output, so it goes to stdout (pipe to `less -R` for colour)
        out = SafeConsole(highlight=False)
        for rec in chosen:
            out.print(terminal_view(rec, width=width, max_descriptors=top, total_width=out.width))
            out.print()
        if plots is not None:
            paths = save_figures(chosen, plots, max_descriptors=top)
            info(f"wrote {len(paths)} figure(s) to {plots}")
